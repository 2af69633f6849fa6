"""
No TabbyAPI child outlives the proxy: SIGTERM and SIGINT to a real C{twistd -n tabbyproxy}
process while streams run, while a model starts, and with a child that ignores SIGTERM; and
SIGKILL to twistd, after which the child dies with it.  Every check is by pid.
"""

from __future__ import annotations

import json
from signal import SIGINT, SIGTERM
from typing import Any, cast

import treq
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IReactorTime
from twisted.trial.unittest import TestCase

from tests.support.processes import pidAlive, reactor, waitForExit, waitUntil
from tests.support.proxy import TwistdProxy

clock = cast(IReactorTime, reactor)

GRACE = 1.5
# twistd's own shutdown after the child is gone takes well under a second; this leaves room for a
# busy CI machine.
MARGIN = 4.0


def streamingProfile(tokenDelay: float = 0.05, **simulator: Any) -> dict[str, dict[str, Any]]:
    return {"alpha": {"model": {"model_name": "Alpha"}, "simulator": {"token_delay": tokenDelay, **simulator}}}


async def openStream(proxy: TwistdProxy, received: list[bytes]) -> Deferred[Any]:
    """
    Start a long streaming chat; return the Deferred of its body, which collects into C{received}.
    """
    response = await proxy.http.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "alpha", "stream": True, "max_tokens": 100000,
              "messages": [{"role": "user", "content": "Tell me everything."}]},
        unbuffered=True,
    )
    assert response.code == 200, response.code
    body: Deferred[Any] = treq.collect(response, received.append)
    return body


class SignalTests(TestCase):
    timeout = 60

    async def startWithStreams(self, proxy: TwistdProxy, count: int) -> tuple[int, list[list[bytes]], list[Deferred[Any]]]:
        await proxy.started()
        received: list[list[bytes]] = [[] for _ in range(count)]
        bodies = [await openStream(proxy, chunks) for chunks in received]
        await waitUntil(lambda: all(b"".join(chunks).count(b"data: ") >= 3 for chunks in received))
        pid = await proxy.childPid()
        assert pid is not None
        self.assertEqual((await proxy.status())["in_flight"], count)
        return pid, received, bodies

    async def assertStopsWithin(self, proxy: TwistdProxy, childPid: int, signal: int, limit: float) -> None:
        """
        twistd, just sent C{signal}, shuts down cleanly within C{limit} seconds, and its child
        C{childPid} is gone by then.
        """
        started = clock.seconds()
        await proxy.exited(timeout=limit)
        self.assertLess(clock.seconds() - started, limit)
        self.assertFalse(pidAlive(childPid), "the TabbyAPI child outlived twistd")
        self.assertIn("Server Shut Down.", proxy.text)
        # After a clean shutdown twistd ends itself with the signal it got, as the shell expects.
        assert proxy.exitReason is not None
        self.assertTrue(proxy.exitReason.check(ProcessTerminated), proxy.exitReason)
        self.assertEqual(proxy.exitReason.value.signal, signal)

    async def test_sigtermWhileStreaming(self) -> None:
        """
        SIGTERM to twistd while three streams run: twistd exits within the grace period plus a
        margin, the child's pid is gone, and every stream ends (none hangs) without a [DONE].
        """
        proxy = TwistdProxy(self, streamingProfile(), "--stop-grace", str(GRACE))
        pid, received, bodies = await self.startWithStreams(proxy, 3)
        proxy.signalProcess("TERM")
        await self.assertStopsWithin(proxy, pid, SIGTERM, GRACE + MARGIN)
        await DeferredList(bodies, consumeErrors=True)
        for chunks in received:
            self.assertNotIn(b"[DONE]", b"".join(chunks))

    async def test_sigintWhileStreaming(self) -> None:
        """
        SIGINT (Ctrl-C) to twistd behaves as SIGTERM: twistd and its child are gone in time.
        """
        proxy = TwistdProxy(self, streamingProfile(), "--stop-grace", str(GRACE))
        pid, _, bodies = await self.startWithStreams(proxy, 1)
        proxy.signalProcess("INT")
        await self.assertStopsWithin(proxy, pid, SIGINT, GRACE + MARGIN)
        await DeferredList(bodies, consumeErrors=True)

    async def test_sigtermWhileModelStarts(self) -> None:
        """
        SIGTERM while the model is still loading: the waiting request is answered with a 503 (the
        proxy is shutting down), twistd exits in time, and the loading child is gone.
        """
        proxy = TwistdProxy(self, streamingProfile(load_time=30), "--stop-grace", str(GRACE))
        await proxy.started()
        waiting = proxy.http.post(proxy.url + "/v1/completions", json={"model": "alpha", "prompt": "x"})
        await proxy.printed("Loading model:")
        pid = await proxy.childPid()
        assert pid is not None
        self.assertEqual((await proxy.status())["state"], "starting")
        proxy.signalProcess("TERM")
        await self.assertStopsWithin(proxy, pid, SIGTERM, GRACE + MARGIN)
        response = await waiting
        self.assertEqual(response.code, 503)
        self.assertIn("shutting down", json.loads(await response.content())["error"]["message"])

    async def test_sigintWhileModelStarts(self) -> None:
        """
        SIGINT while the model is loading stops twistd and the loading child in time.
        """
        proxy = TwistdProxy(self, streamingProfile(load_time=30), "--stop-grace", str(GRACE))
        await proxy.started()
        waiting = proxy.http.post(proxy.url + "/v1/completions", json={"model": "alpha", "prompt": "x"})
        waiting.addErrback(lambda failure: None)
        await proxy.printed("Loading model:")
        pid = await proxy.childPid()
        assert pid is not None
        proxy.signalProcess("INT")
        await self.assertStopsWithin(proxy, pid, SIGINT, GRACE + MARGIN)
        await waiting

    async def test_sigtermWithChildIgnoringSigterm(self) -> None:
        """
        A child that ignores SIGTERM is SIGKILLed after the grace period, and twistd still exits
        within the grace period plus a margin, leaving no process behind.
        """
        proxy = TwistdProxy(self, streamingProfile(ignore_sigterm=True), "--stop-grace", str(GRACE))
        pid, _, bodies = await self.startWithStreams(proxy, 1)
        proxy.signalProcess("TERM")
        await self.assertStopsWithin(proxy, pid, SIGTERM, GRACE + MARGIN)
        self.assertIn("sending SIGKILL", proxy.text)
        await DeferredList(bodies, consumeErrors=True)


class ParentDeathTests(TestCase):
    timeout = 60

    async def test_sigkillToTwistdTakesTheChildAlong(self) -> None:
        """
        When twistd itself is SIGKILLed (no chance to stop anything), Linux kills its TabbyAPI
        child too (the child is spawned with PR_SET_PDEATHSIG), even mid-stream and even when the
        child ignores SIGTERM.
        """
        proxy = TwistdProxy(self, streamingProfile(ignore_sigterm=True))
        await proxy.started()
        received: list[bytes] = []
        body = await openStream(proxy, received)
        await waitUntil(lambda: b"".join(received).count(b"data: ") >= 3)
        pid = await proxy.childPid()
        assert pid is not None
        proxy.signalProcess("KILL")
        await proxy.exited()
        await waitForExit(pid, timeout=5)
        await DeferredList([body], consumeErrors=True)

    async def test_sigkillWhileModelStarts(self) -> None:
        """
        A child still loading its model dies with a SIGKILLed twistd as well.
        """
        proxy = TwistdProxy(self, streamingProfile(load_time=30))
        await proxy.started()
        waiting = proxy.http.post(proxy.url + "/v1/completions", json={"model": "alpha", "prompt": "x"})
        waiting.addErrback(lambda failure: None)
        await proxy.printed("Loading model:")
        pid = await proxy.childPid()
        assert pid is not None
        proxy.signalProcess("KILL")
        await proxy.exited()
        await waitForExit(pid, timeout=5)
        await waiting

