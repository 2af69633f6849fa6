"""
Faults of the TabbyAPI child and of clients, each made a test (issue 4, fault tests 1-5, 7, 8):
a child that crashes, fails to load, hangs at start, ignores SIGTERM or turns unhealthy, clients
that leave at every stage, and the unload timer racing a request.  (Load and slow clients are in
L{tests.integration.test_load}; signals to twistd in L{tests.integration.test_shutdown}.)

The scheduling races run on a fake clock and a fake process reactor; the rest use the real
service with the simulator as a real child process on loopback ports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import treq
from twisted.internet.defer import Deferred, DeferredList, fail, gatherResults
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from tabbyproxy.child import ChildSettings, pickFreePort
from tabbyproxy.scheduler import Lease, SchedulerSettings
from tests.support.fakes import RunningScheduler
from tests.support.processes import findFreePorts, pidAlive, waitForExit, waitUntil
from tests.support.processes import reactor as _reactor
from tests.support.proxy import RunningProxy
from tests.support.logs import CapturedEvents
from tests.support.wire import StreamedBody, ssePayloads, streamedText

# The global reactor, typed as what these tests use of it.
reactor: Any = _reactor

GRACE = 10.0


# ------------------------------------------------------------------------------------------------
# Fault 5 (and 8) on the fake clock


class UnhealthyChildTests(SynchronousTestCase):
    """
    TabbyAPI turns its C{/health} to 503 for good after a generation fails inside it; the
    scheduler notices and replaces the child, without cutting requests in flight.
    """

    def setUp(self) -> None:
        self.fake = RunningScheduler(
            Path(self.mktemp()),
            {"a": {"model": {"model_name": "A", "unload_timer": 60}}},
            settings=SchedulerSettings(unloadTimer=300, child=ChildSettings(loadTimeout=100, stopGrace=GRACE)),
        )
        self.reactor, self.tabby, self.scheduler = self.fake.reactor, self.fake.tabby, self.fake.scheduler

    def acquire(self) -> Deferred[Lease]:
        return self.fake.acquire("a")

    def test_unhealthyWhenIdleIsStoppedAndReplaced(self) -> None:
        """
        When the last request in flight ends and C{/health} answers 503, the child is stopped at
        once, the status says why, and the next request gets a fresh child.
        """
        lease = self.successResultOf(self.acquire())
        first = self.reactor.spawned[0]
        self.tabby.healthy = False
        lease.release()
        self.assertEqual(first.signals, ["TERM"])
        status = self.scheduler.status()
        self.assertEqual(status["state"], "stopped")
        self.assertIn("is unhealthy: GET /health answered 503", status["last_error"])

        self.tabby.healthy = True
        self.successResultOf(self.acquire()).release()
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.reactor.spawned[1].signals, [])

    def test_healthyWhenIdleIsKept(self) -> None:
        """
        A healthy child is left alone when it becomes idle: its idle timer runs as usual.
        """
        self.successResultOf(self.acquire()).release()
        self.assertEqual(self.reactor.spawned[0].signals, [])
        self.assertEqual(self.scheduler.status()["unload"]["fires_in_seconds"], 60)

    def test_suspectWaitsForRequestsInFlight(self) -> None:
        """
        A request that reports a suspect answer (L{Lease.suspect}) makes the scheduler check
        C{/health}; an unhealthy child keeps serving its requests in flight, new requests wait,
        and once the last one ends the child is replaced and they are served by the new one.
        """
        first, second = self.successResultOf(self.acquire()), self.successResultOf(self.acquire())
        old = self.reactor.spawned[0]
        self.tabby.healthy = False
        first.suspect()
        waiting = self.acquire()
        self.assertNoResult(waiting)
        first.release()
        self.assertEqual(old.signals, [])
        self.tabby.healthy = True
        second.release()
        self.assertEqual(old.signals, ["TERM"])
        lease = self.successResultOf(waiting)
        self.assertIsNot(lease.child.protocol, old.protocol)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_unansweredHealthCheckCounts(self) -> None:
        """
        A child whose C{/health} does not answer at all (its port closed) is asked once more a
        moment later, and replaced when it still does not answer.
        """
        lease = self.successResultOf(self.acquire())
        lease.child.agent = _Refusing()
        lease.release()
        self.assertEqual(self.reactor.spawned[0].signals, [])
        self.reactor.advance(0.2)
        self.assertEqual(self.reactor.spawned[0].signals, ["TERM"])
        self.assertIn("GET /health failed", self.scheduler.status()["last_error"])

    def test_dyingChildIsReportedAsACrash(self) -> None:
        """
        When C{/health} does not answer because the child is dying (it exits with status 1
        before the second try), the status reports the exit, and nothing else is signalled.
        """
        lease = self.successResultOf(self.acquire())
        process = self.reactor.spawned[0]
        lease.child.agent = _Refusing()
        lease.release()
        process.exit(1)
        self.reactor.advance(0.2)
        self.assertEqual(process.signals, [])
        self.assertEqual(self.scheduler.status()["last_error"], "TabbyAPI for a (pid 1000) exited with status 1 unexpectedly")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_crashWhileBeingReplacedIsReported(self) -> None:
        """
        When the failing health check was only a symptom of the child dying (killed by a signal
        the scheduler never sent), the status reports the death, not just "unhealthy".
        """
        lease = self.successResultOf(self.acquire())
        process = self.reactor.spawned[0]
        process.obeys = set()
        self.tabby.healthy = False
        lease.release()
        self.assertEqual(process.signals, ["TERM"])
        process.exit(signal=9)
        self.assertEqual(self.scheduler.status()["last_error"], "TabbyAPI for a (pid 1000) was killed by signal 9 unexpectedly")

    def test_timerFiringJustAfterARequestArrives(self) -> None:
        """
        A request that arrives a moment before the idle timer would fire is served by the running
        child, and the timer is stopped: the child is not stopped under it (llama-swap #946).
        """
        self.successResultOf(self.acquire()).release()
        self.reactor.advance(59.999)
        lease = self.successResultOf(self.acquire())
        self.reactor.advance(0.001)
        self.reactor.advance(1000)
        self.assertEqual(self.reactor.spawned[0].signals, [])
        self.assertEqual(len(self.reactor.spawned), 1)
        lease.release()
        self.reactor.advance(60)
        self.assertEqual(self.reactor.spawned[0].signals, ["TERM"])


@implementer(IAgent)
class _Refusing:
    """
    An HTTP client for a TabbyAPI whose port is closed: every request fails to connect.
    """

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        return fail(ConnectionRefusedError())


# ------------------------------------------------------------------------------------------------
# Faults 1-5 and 7 with the simulator as a real child


class ChildFaultTests(TestCase):
    timeout = 60

    async def test_killNineMidStream(self) -> None:
        """
        A child killed with SIGKILL mid-stream: the client's stream ends with an SSE error event
        (no [DONE]), GET /status names the signal, and the next request starts a fresh child.
        """
        proxy = RunningProxy(self, {"alpha": {"model": {"model_name": "Alpha"}, "simulator": {"token_delay": 0.02}}})
        response = await proxy.http.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "alpha", "stream": True, "max_tokens": 10000, "messages": [{"role": "user", "content": "x"}]},
            unbuffered=True,
        )
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        await waitUntil(lambda: b"".join(received).count(b"data: ") >= 3)
        pid = proxy.scheduler.status()["pid"]
        os.kill(pid, signal.SIGKILL)
        await done
        text, events = streamedText(b"".join(received))
        self.assertTrue(text.startswith("Alpha "))
        self.assertNotIn("[DONE]", events)
        self.assertIn("connection to TabbyAPI broke", json.loads(events[-1])["error"]["message"])

        await waitUntil(lambda: not proxy.scheduler.snapshot())
        status = await (await proxy.http.get(proxy.url + "/status")).json()
        self.assertEqual(status["state"], "stopped")
        self.assertIn(f"(pid {pid}) was killed by signal 9 unexpectedly", status["last_error"])

        response = await proxy.http.post(proxy.url + "/v1/completions", json={"model": "alpha", "prompt": "x"})
        self.assertEqual(response.code, 200)
        self.assertTrue((await response.json())["choices"][0]["text"].startswith("Alpha "))
        self.assertNotEqual(proxy.scheduler.status()["pid"], pid)

    async def test_failedLoadFailsEveryWaiter(self) -> None:
        """
        Requests waiting together for a model that fails to load all get a 503 carrying the exit
        status and TabbyAPI's traceback, from one start; the next request tries again.
        """
        proxy = RunningProxy(self, {"broken": {"model": {"model_name": "Broken"}, "simulator": {"fail_load": True}}})
        responses = await gatherResults([
            proxy.http.post(proxy.url + "/v1/completions", json={"model": "broken", "prompt": str(i)})
            for i in range(4)
        ])
        for response in responses:
            self.assertEqual(response.code, 503)
            message = (await response.json())["error"]["message"]
            self.assertIn("exited with status 1 while loading the model", message)
            self.assertIn("ValueError: Failed to load config.json", message)
        self.assertEqual(proxy.scheduler.starts, 1)
        self.assertEqual(proxy.scheduler.status()["waiting"], 0)

        response = await proxy.http.post(proxy.url + "/v1/completions", json={"model": "broken", "prompt": "again"})
        await response.content()
        self.assertEqual((response.code, proxy.scheduler.starts), (503, 2))

    async def test_hangAtStartTimesOutAndIsKilled(self) -> None:
        """
        A child that never answers /health (and ignores SIGTERM, too): after the load timeout the
        waiting requests get a 503 that names the timeout, the child gets SIGTERM, then SIGKILL
        after the grace period, and its pid is gone.
        """
        events = CapturedEvents(self)
        # The load timeout counts from the child's "Loading model:" line, which the simulator
        # (like TabbyAPI) prints after installing its SIGTERM handler: however slowly its
        # interpreter starts, the SIGTERM comes to a child that ignores it, so SIGKILL follows.
        proxy = RunningProxy(
            self, {"stuck": {"model": {"model_name": "Stuck"}, "simulator": {"hang_at_start": True, "ignore_sigterm": True}}},
            "--load-timeout", "5", "--stop-grace", "0.5",
        )
        waiting = [proxy.http.post(proxy.url + "/v1/completions", json={"model": "stuck", "prompt": "x"})
                   for _ in range(2)]
        await waitUntil(lambda: proxy.scheduler.status()["pid"] is not None)
        pid = proxy.scheduler.status()["pid"]
        port = proxy.scheduler.status()["port"]
        for response in await gatherResults(waiting):
            self.assertEqual(response.code, 503)
            self.assertIn("did not become ready within 5s (--load-timeout)", (await response.json())["error"]["message"])
        await waitForExit(pid, timeout=5)
        await waitUntil(lambda: not proxy.scheduler.snapshot())
        self.assertEqual(events.stops(), ["load timeout"])
        self.assertTrue(any("ignoring it (simulator.ignore_sigterm)" in line for line in events.childLines()))
        self.assertTrue(any("sending SIGKILL" in e.get("log_format", "") for e in events.events))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))

    async def test_childIgnoringSigtermIsKilledOnUnload(self) -> None:
        """
        A ready child that ignores SIGTERM is SIGKILLed after the grace period; /unload answers
        once it is gone, and no process is left.
        """
        profiles: dict[str, dict[str, Any]] = {
            "deaf": {"model": {"model_name": "Deaf"}, "simulator": {"ignore_sigterm": True}}}
        proxy = RunningProxy(self, profiles, "--stop-grace", "0.5")
        response = await proxy.http.post(proxy.url + "/v1/completions", json={"model": "deaf", "prompt": "x"})
        await response.content()
        pid = proxy.scheduler.status()["pid"]
        started = reactor.seconds()
        response = await proxy.http.post(proxy.url + "/unload")
        self.assertEqual((await response.json())["unloaded"], ["deaf"])
        self.assertGreaterEqual(reactor.seconds() - started, 0.5)
        self.assertFalse(pidAlive(pid))
        self.assertEqual(proxy.scheduler.status()["state"], "stopped")

    async def test_stickyUnhealthyChildIsReplaced(self) -> None:
        """
        After a generation fails inside TabbyAPI its /health stays 503 and every later generation
        would fail; the proxy sees that once the failed request is over, stops the child, and
        the next request is served by a fresh child.
        """
        proxy = RunningProxy(self, {"flaky": {"model": {"model_name": "Flaky"}, "simulator": {"fail_generation_after": 1}}})
        chat = {"model": "flaky", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}
        response = await proxy.http.post(proxy.url + "/v1/chat/completions", json=chat)
        self.assertTrue(streamedText(await response.content())[0].startswith("Flaky "))
        firstPid = proxy.scheduler.status()["pid"]

        response = await proxy.http.post(proxy.url + "/v1/chat/completions", json=chat)
        _, events = streamedText(await response.content())
        self.assertIn("error", json.loads(events[-1]))
        await waitUntil(lambda: not proxy.scheduler.snapshot())
        self.assertIn("is unhealthy: GET /health answered 503", proxy.scheduler.status()["last_error"])
        self.assertFalse(pidAlive(firstPid))

        # (The fresh child has the same knob, so only its first generation succeeds.)
        response = await proxy.http.post(proxy.url + "/v1/completions", json={"model": "flaky", "prompt": "x"})
        self.assertEqual(response.code, 200)
        self.assertTrue((await response.json())["choices"][0]["text"].startswith("Flaky "))
        self.assertEqual(proxy.scheduler.starts, 2)

    async def test_disconnectWhileQueued(self) -> None:
        """
        A client that leaves while its request waits for another model to drain leaves the
        queue: no swap happens for it, the in-flight count returns to zero, and the running
        model's unload timer still fires.
        """
        events = CapturedEvents(self)
        profiles: dict[str, dict[str, Any]] = {
            "alpha": {"model": {"model_name": "Alpha"}, "simulator": {"token_delay": 0.01}},
            "beta": {"model": {"model_name": "Beta"}}}
        proxy = RunningProxy(self, profiles, "--unload-timer", "0.3")
        response = await proxy.http.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "alpha", "stream": True, "max_tokens": 60, "messages": [{"role": "user", "content": "x"}]},
            unbuffered=True,
        )
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        queued = proxy.http.post(proxy.url + "/v1/completions", json={"model": "beta", "prompt": "x"})
        await waitUntil(lambda: proxy.scheduler.status()["waiting"] == 1)
        queued.cancel()
        await DeferredList([queued], consumeErrors=True)
        await waitUntil(lambda: proxy.scheduler.status()["waiting"] == 0)
        await done
        self.assertIn(b"[DONE]", b"".join(received))
        await waitUntil(lambda: not proxy.scheduler.snapshot())
        self.assertEqual(events.starts(), ["alpha"])
        self.assertEqual(len(events.stops()), 1)
        self.assertTrue(events.stops()[0].startswith("idle for"))

    async def test_disconnectWhileModelStarts(self) -> None:
        """
        A client that leaves while its model loads leaves the queue; the load completes, nothing
        is in flight, and the unload timer then stops the model.
        """
        events = CapturedEvents(self)
        proxy = RunningProxy(self, {"slow": {"model": {"model_name": "Slow"}, "simulator": {"load_time": 0.5}}},
                             "--unload-timer", "0.2")
        request = proxy.http.post(proxy.url + "/v1/completions", json={"model": "slow", "prompt": "x"})
        await waitUntil(lambda: any("Loading model:" in line for line in events.childLines()))
        self.assertEqual(proxy.scheduler.status()["state"], "starting")
        request.cancel()
        await DeferredList([request], consumeErrors=True)
        await waitUntil(lambda: proxy.scheduler.status()["waiting"] == 0)
        await waitUntil(lambda: not proxy.scheduler.snapshot())
        self.assertEqual(proxy.scheduler.status()["in_flight"], 0)
        self.assertEqual(len(events.stops()), 1)
        self.assertTrue(events.stops()[0].startswith("idle for"))


class HungChildTests(TestCase):
    """
    Issue 10, item 11: a child that hangs mid-stream (here stopped with SIGSTOP) does not hang
    its clients: the stream ends with an error event, the child is judged unhealthy and
    replaced.
    """

    timeout = 60

    def resumeAndKill(self, pid: int) -> None:
        """
        Cleanup for a stopped child: it must not outlive the test, stopped or not.
        """
        if pidAlive(pid):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)

    async def stopMidStream(self, *options: str) -> tuple[RunningProxy, StreamedBody, int]:
        """
        A proxy started with C{options} (and a short --stop-grace) serving a long stream, whose
        child is stopped with SIGSTOP once the stream is well under way.

        @return: the proxy, the stream's body as it arrives, and the stopped child's pid.
        """
        proxy = RunningProxy(self, {"slow": {"model": {"model_name": "Slow"}, "simulator": {"token_delay": 0.02}}},
                             *options, "--stop-grace", "0.5")
        response = await proxy.http.post(
            proxy.url + "/v1/chat/completions", unbuffered=True,
            json={"model": "slow", "stream": True, "max_tokens": 5000, "messages": [{"role": "user", "content": "x"}]})
        body = StreamedBody.of(response)
        await waitUntil(lambda: len(body.data) > 500)
        pid = proxy.scheduler.status()["pid"]
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(self.resumeAndKill, pid)
        return proxy, body, pid

    async def assertServedByAFreshChild(self, proxy: RunningProxy, pid: int) -> None:
        """
        The next request is answered, by a child other than C{pid}.
        """
        again = await proxy.http.post(proxy.url + "/v1/completions", json={"model": "slow", "prompt": "x", "max_tokens": 2})
        self.assertEqual(again.code, 200)
        await again.content()
        self.assertNotEqual(proxy.scheduler.status()["pid"], pid)

    async def test_stoppedChildEndsItsStreamAndIsReplaced(self) -> None:
        """
        SIGSTOP on the child mid-stream: after --chunk-timeout the stream ends with an error
        event that names it, /status reports the child unhealthy, it is killed, and the next
        request is served by a fresh child.
        """
        proxy, body, pid = await self.stopMidStream("--chunk-timeout", "1")

        await body.ended
        error = json.loads(ssePayloads(body.data)[-1])["error"]
        self.assertIn("TabbyAPI sent nothing for 1s (--chunk-timeout)", error["message"])
        await waitForExit(pid, timeout=30)
        self.assertIn("is unhealthy", proxy.scheduler.status()["last_error"])

        await self.assertServedByAFreshChild(proxy, pid)

    async def test_hungChildIsFoundByItsHealthAndReplaced(self) -> None:
        """
        SIGSTOP on the child mid-stream, with the read timeouts far away: the /health check of
        the busy child goes unanswered for --hang-timeout, so the stream ends with an error
        event that says the child hung, /status shows health "hung" and why, the stopped
        child (deaf to SIGTERM) is SIGKILLed after the grace period, and the next request is
        served by a fresh child.
        """
        proxy, body, pid = await self.stopMidStream("--health-interval", "0.2", "--hang-timeout", "2")

        await body.ended
        error = json.loads(ssePayloads(body.data)[-1])["error"]
        self.assertIn(f"TabbyAPI for slow (pid {pid}) hung: GET /health did not answer within 2s (--hang-timeout)",
                      error["message"])
        status = proxy.scheduler.status()
        self.assertEqual(status["health"], "hung")
        self.assertIn("hung: GET /health did not answer within 2s", status["last_error"])
        await waitForExit(pid, timeout=10)

        await self.assertServedByAFreshChild(proxy, pid)
        self.assertEqual(proxy.scheduler.status()["health"], "ok")


class PortMoveTests(TestCase):
    """
    Issue 10, item 12: TabbyAPI that finds its port busy serves on the next one, or gives up
    when that one is busy too; the proxy trusts neither and starts it again on a port it picked.
    """

    timeout = 60

    async def startPastBusyPorts(self, held: int) -> tuple[CapturedEvents, RunningProxy, int]:
        """
        Start a proxy whose first child gets a port that, with the C{held - 1} ports after it,
        another listener holds, and send it a completion: it must be answered by a child on a
        port the proxy picked.  Returns the events, the proxy and the first port.
        """
        events = CapturedEvents(self)
        proxy = RunningProxy(self, {"alpha": {"model": {"model_name": "Alpha"}}})
        busy = findFreePorts(2)
        for port in range(busy, busy + held):
            squatter = socket.socket()
            self.addCleanup(squatter.close)
            squatter.bind(("127.0.0.1", port))
            squatter.listen(8)
        picked = iter([busy])
        proxy.scheduler.pickPort = lambda: next(picked, None) or pickFreePort()

        response = await proxy.http.post(proxy.url + "/v1/completions", json={"model": "alpha", "prompt": "x"})
        self.assertEqual(response.code, 200)
        self.assertTrue((await response.json())["choices"][0]["text"].startswith("Alpha "))
        self.assertEqual(proxy.scheduler.starts, 2)
        self.assertNotIn(proxy.scheduler.status()["port"], (busy, busy + 1))
        return events, proxy, busy

    async def test_busyPortStartsTheChildAgainOnAFreshPort(self) -> None:
        """
        With the child's first port held by another listener, the simulator says it switches
        to the next port; the proxy stops that child and starts another on a fresh port, and
        the waiting request is answered by it, not by whatever listens on either port.
        """
        events, proxy, busy = await self.startPastBusyPorts(held=1)
        self.assertTrue(events.childSaid(f"Port {busy} is currently in use. Switching to {busy + 1}."))
        self.assertEqual(events.stops(), [f"its port {busy} was busy and it moved to port {busy + 1}"])
        [moved] = [e["pid"] for e in events.events if e.get("log_format", "").startswith("Stopping {model}")]
        await waitForExit(moved, timeout=10)

    async def test_bothPortsBusyStartTheChildAgainOnAFreshPort(self) -> None:
        """
        With the next port held too, the simulator says so and exits with status 0 without
        serving, as TabbyAPI does; the proxy starts another child at once instead of failing
        the waiting request.
        """
        events, proxy, busy = await self.startPastBusyPorts(held=2)
        self.assertTrue(events.childSaid(f"Ports {busy} and {busy + 1} are in use by other programs."))
        self.assertEqual(events.stops(), [f"its port {busy} was busy and so was port {busy + 1}"])
        self.assertIsNone(proxy.scheduler.status()["last_error"])
