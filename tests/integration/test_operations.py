"""
What the people who run the proxy see and use: metrics, request ids and logs, preloading and the
default model, reloading profiles on SIGHUP, and running as a daemon.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import treq
import yaml
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.http_headers import Headers

from tabbyproxy.keepalive import FOREVER
from tests.support.processes import ChildProcess, findFreePorts, killIfAlive, pidAlive, waitForExit, waitUntil
from tests.support.proxy import RunningProxy, StalledClient, TwistdProxy
from tests.support.wire import StreamedBody, sseDocuments

PROFILES: dict[str, dict[str, Any]] = {
    "alpha": {"model": {"model_name": "Alpha"}},
    "beta": {"model": {"model_name": "Beta"}},
}


async def chat(proxy: RunningProxy | TwistdProxy, model: str, **extra: Any) -> Any:
    response = await proxy.http.post(
        proxy.url + "/v1/chat/completions",
        json={"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}], **extra},
    )
    return response


class MetricsAndLogsTests(TestCase):
    timeout = 60

    async def test_metricsAfterARequest(self) -> None:
        """
        /metrics parses with Prometheus' parser and counts the request (route, model, status),
        the model's start and load time, and shows the loaded model and nothing in flight.
        """
        proxy = RunningProxy(self, PROFILES)
        response = await chat(proxy, "alpha")
        self.assertEqual(response.code, 200)
        await response.content()
        text = await (await proxy.http.get(proxy.url + "/metrics")).text()
        families = {family.name: family for family in text_string_to_metric_families(text)}

        def sample(family: str, suffix: str = "", **labels: str) -> float:
            for found in families[family].samples:
                if found.name == family + suffix and all(found.labels.get(k) == v for k, v in labels.items()):
                    return float(found.value)
            raise AssertionError(f"no {family}{suffix} sample with {labels}")

        self.assertEqual(sample("tabbyproxy_requests", "_total", route="/v1/chat/completions", model="alpha",
                                status="200"), 1)
        self.assertEqual(sample("tabbyproxy_model_starts", "_total", model="alpha"), 1)
        self.assertEqual(sample("tabbyproxy_model_load_seconds", "_count", model="alpha"), 1)
        self.assertEqual(sample("tabbyproxy_time_to_first_byte_seconds", "_count", model="alpha"), 1)
        self.assertEqual(sample("tabbyproxy_requests_in_flight"), 0)
        self.assertEqual(sample("tabbyproxy_model_loaded", model="alpha", state="ready"), 1)

    async def test_requestIdInHeaderAndLog(self) -> None:
        """
        Every answer carries X-Request-Id (the client's own when it sent one), and the access
        log event for the request carries the same id, its route, model and status.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        proxy = RunningProxy(self, PROFILES)
        response = await proxy.http.post(
            proxy.url + "/v1/completions", json={"model": "beta", "prompt": "x", "max_tokens": 2},
            headers=Headers({b"X-Request-Id": [b"trace-42"]}),
        )
        await response.content()
        self.assertEqual(response.headers.getRawHeaders("x-request-id"), ["trace-42"])
        generated = await proxy.http.get(proxy.url + "/status")
        await generated.content()
        [generatedId] = generated.headers.getRawHeaders("x-request-id")
        self.assertRegex(generatedId, "^[0-9a-f]{16}$")
        await waitUntil(lambda: any(e.get("request_id") == generatedId for e in events))
        [access] = [e for e in events if e.get("request_id") == "trace-42" and "route" in e]
        self.assertEqual((access["route"], access["model"], access["status"]), ("/v1/completions", "beta", 200))

    async def test_logsAndLiveStream(self) -> None:
        """
        /logs returns the recent proxy and TabbyAPI lines (filterable by source), and
        /logs/stream streams new ones as they happen, so a person can watch a model load.
        """
        proxy = RunningProxy(self, PROFILES)
        stream = await proxy.http.get(proxy.url + "/logs/stream?no-history&source=tabby", unbuffered=True)
        self.assertEqual(stream.headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
        body = StreamedBody.of(stream)
        response = await chat(proxy, "alpha")
        await response.content()
        await waitUntil(lambda: b"Model successfully loaded." in body.data)
        events = sseDocuments(body.data)
        self.assertTrue(events)
        self.assertEqual({event["source"] for event in events}, {"tabby"})
        self.assertEqual({event["model"] for event in events}, {"alpha"})
        body.hangUp()
        await self.assertFailure(body.ended, ResponseFailed)

        recent = await (await proxy.http.get(proxy.url + "/logs?source=proxy")).json()
        texts = [record["text"] for record in recent["logs"]]
        self.assertTrue(any(text.startswith("Starting alpha on port") for text in texts))
        self.assertEqual({record["source"] for record in recent["logs"]}, {"proxy"})

    async def test_liveStreamWithoutHistory(self) -> None:
        """
        /logs/stream sends the recent lines before its C{: live} mark, and nothing before it
        with the bare flag C{?no-history}.
        """
        proxy = RunningProxy(self, PROFILES)
        for query, expectHistory in (("", True), ("?no-history", False)):
            stream = await proxy.http.get(proxy.url + "/logs/stream" + query, unbuffered=True)
            body = StreamedBody.of(stream)
            await waitUntil(lambda: b": live\n\n" in body.data)
            body.hangUp()
            await self.assertFailure(body.ended, ResponseFailed)
            history = body.data.partition(b": live\n\n")[0]
            self.assertEqual(bool(sseDocuments(history)), expectHistory, (query, history))

    async def test_streamReaderThatNeverReadsHasBoundedMemory(self) -> None:
        """
        A /logs/stream client that never reads its socket costs the proxy a bounded amount of
        memory however much is logged: the connection's buffer stops growing (the stream is
        paused) and at most MAX_PENDING_LINES lines wait; once the client reads again it gets a
        line saying how many were dropped, then the latest lines.
        """
        from tabbyproxy.routes.admin import MAX_PENDING_LINES, LogFollower

        proxy = RunningProxy(self, PROFILES)
        stalled = await StalledClient.open(self, proxy, LogFollower, "/logs/stream?no-history&source=proxy")
        follower, client = stalled.producer, stalled.socket
        log = Logger(namespace="tests.logstream")
        line = "x" * 1000
        # The transport pauses its producer as soon as its buffer is full, within this loop.
        for number in range(1000):
            log.info("filler {number} {line}", number=number, line=line)
            if follower.paused:
                break
        for number in range(4 * MAX_PENDING_LINES):
            log.info("late filler {number} {line}", number=number, line=line)
        self.assertTrue(follower.paused)
        # Megabytes were logged; the connection holds about what it held when it paused.
        self.assertLess(stalled.buffered, 64 * 1024 + 100 * 1200)
        self.assertEqual(len(follower.pending), MAX_PENDING_LINES)
        self.assertGreaterEqual(follower.dropped, 3 * MAX_PENDING_LINES)
        response = await proxy.http.get(proxy.url + "/health")
        self.assertEqual(response.code, 200)
        await response.content()

        client.setblocking(False)
        received = bytearray()

        lastLine = f"late filler {4 * MAX_PENDING_LINES - 1} ".encode()

        def readSome() -> bool:
            try:
                while True:
                    received.extend(client.recv(1 << 16))
            except BlockingIOError:
                pass
            return lastLine in received

        await waitUntil(readSome)
        [marker] = [json.loads(event.removeprefix(b"data: ")) for event in received.split(b"\n")
                    if b"log lines dropped" in event]
        self.assertGreaterEqual(marker["dropped"], 3 * MAX_PENDING_LINES)
        self.assertEqual((marker["level"], marker["source"]), ("warn", "proxy"))
        self.assertGreater(received.count(b"late filler"), MAX_PENDING_LINES - 10)


class ModelsAtStartTests(TestCase):
    timeout = 60

    async def test_preload(self) -> None:
        """
        --preload starts the model with the proxy, before any request.
        """
        proxy = RunningProxy(self, PROFILES, "--preload", "beta")
        await waitUntil(lambda: proxy.scheduler.status()["state"] == "ready")
        self.assertEqual(proxy.scheduler.status()["model"], "beta")

    async def test_preloadSeveralThenUnloadOneOrAll(self) -> None:
        """
        --preload takes several ids: on fake GPUs with room for both, both run at once.
        C{POST /unload} with C{?model=} or a body naming one stops that one only; without one,
        every model; each answer lists what it unloaded.
        """
        proxy = RunningProxy(self, PROFILES, "--simulate-gpus", "1x24GiB", "--preload", "alpha,beta")
        await waitUntil(lambda: [m.state.value for m in proxy.scheduler.snapshot()] == ["ready", "ready"])
        self.assertEqual(proxy.scheduler.starts, 2)
        response = await proxy.http.post(proxy.url + "/unload?model=alpha")
        self.assertEqual(await response.json(), {"status": "success", "unloaded": ["alpha"]})
        self.assertEqual([m.profile.id for m in proxy.scheduler.snapshot()], ["beta"])
        response = await proxy.http.post(proxy.url + "/unload", json={"model": "alpha"})
        self.assertEqual(await response.json(), {"status": "success", "unloaded": []})
        response = await proxy.http.post(proxy.url + "/unload", json={"model": "nope"})
        self.assertEqual(response.code, 404)
        self.assertIn("nope", (await response.json())["error"])
        await chat(proxy, "alpha")
        response = await proxy.http.post(proxy.url + "/unload")
        self.assertEqual(await response.json(), {"status": "success", "unloaded": ["alpha", "beta"]})
        self.assertEqual(proxy.scheduler.snapshot(), ())

    async def test_defaultModelReturnsAfterIdleUnload(self) -> None:
        """
        --default-model loads its model at start and keeps it loaded; after another model was
        used and unloaded when idle, the default model is started again.
        """
        proxy = RunningProxy(self, PROFILES, "--default-model", "alpha")
        await waitUntil(lambda: proxy.scheduler.status()["state"] == "ready")
        self.assertEqual([m.keepAlive for m in proxy.scheduler.snapshot()], [FOREVER])
        response = await chat(proxy, "beta", keep_alive=0)
        self.assertIn("Beta ", (await response.json())["choices"][0]["message"]["content"])
        await waitUntil(lambda: proxy.scheduler.status()["model"] == "alpha"
                        and proxy.scheduler.status()["state"] == "ready")
        self.assertEqual(proxy.scheduler.starts, 3)

    def test_unknownModelOptionsAreRefused(self) -> None:
        """
        --preload and --default-model must name a profile; the error lists the ones there are.
        """
        from twisted.python.usage import UsageError

        from tabbyproxy.tap import Options

        config = Path(self.mktemp())
        config.mkdir()
        (config / "alpha.yml").write_text("model: {model_name: Alpha}\n")
        for option in ("--preload", "--default-model"):
            error = self.assertRaises(UsageError, Options().parseOptions,
                                      ["--simulate", "--config-dir", str(config), option, "gamma"])
            self.assertIn("no such profile", str(error))
            self.assertIn("alpha", str(error))
            error = self.assertRaises(UsageError, Options().parseOptions,
                                      ["--simulate", "--config-dir", str(config), option, "alpha, gamma"])
            self.assertIn(f"{option} gamma: no such profile", str(error))
        error = self.assertRaises(UsageError, Options().parseOptions,
                                  ["--simulate", "--config-dir", str(config), "--preload", "alpha",
                                   "--default-model", "alpha"])
        self.assertIn("alpha: give a model to --default-model", str(error))


class ReloadTests(TestCase):
    timeout = 60

    async def test_sighupRereadsProfiles(self) -> None:
        """
        SIGHUP re-reads the profiles: a new one appears, a removed one disappears (and is unloaded
        when it runs), and a broken file keeps its previous profile and says why in the log.
        """
        proxy = TwistdProxy(self, {**PROFILES, "gamma": {"model": {"model_name": "Gamma"}}})
        await proxy.started()
        response = await chat(proxy, "beta")
        await response.content()
        await proxy.childPid()
        configDir = proxy.root / "config"
        (configDir / "beta.yml").unlink()
        (configDir / "gamma.yml").write_text("model: [\n")
        (configDir / "delta.yml").write_text(yaml.safe_dump({"model": {"model_name": "Delta"}}))
        proxy.signalProcess("HUP")
        await proxy.printed("Reloaded the profiles")
        await proxy.printed("Unloading beta: its profile was removed")
        models = await (await proxy.http.get(proxy.url + "/v1/models")).json()
        self.assertEqual(sorted(card["id"] for card in models["data"]), ["alpha", "delta", "gamma"])
        self.assertIn("gamma.yml: not valid YAML", proxy.text)
        response = await chat(proxy, "delta")
        self.assertIn("Delta ", (await response.json())["choices"][0]["message"]["content"])
        await proxy.childPid()


class DaemonTests(TestCase):
    timeout = 60

    async def test_daemonWithPidfileAndLogfile(self) -> None:
        """
        `twistd tabbyproxy` without -n runs in the background with --pidfile and --logfile:
        it serves, logs to the file, and on SIGTERM stops its TabbyAPI child and exits.
        """
        root = Path(self.mktemp()).absolute()
        (root / "config").mkdir(parents=True)
        (root / "config" / "alpha.yml").write_text(yaml.safe_dump(PROFILES["alpha"]))
        port = findFreePorts()
        pidfile, logfile = root / "twistd.pid", root / "twistd.log"
        launcher = ChildProcess("twistd launcher")
        # Whatever happens below, the daemon (and its child) must not outlive the test.
        self.addCleanup(killDaemon, pidfile)
        reactor.spawnProcess(
            launcher, sys.executable,
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "--pidfile", str(pidfile), "--logfile", str(logfile), "tabbyproxy", "--simulate",
             "--config-dir", str(root / "config"), "--listen", f"tcp:{port}:interface=127.0.0.1"],
            env=dict(os.environ), path=str(root),
        )
        # The launcher returns once the daemon has forked off.
        await launcher.exited()
        await waitUntil(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
        daemonPid = int(pidfile.read_text())
        client = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        url = f"http://127.0.0.1:{port}"

        await waitUntil(lambda: logfile.exists() and f"starting on {port}" in logfile.read_text())
        response = await client.post(url + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2})
        self.assertEqual(response.code, 200)
        await response.content()
        childPid = (await (await client.get(url + "/status")).json())["pid"]
        self.addCleanup(killIfAlive, childPid)
        os.kill(daemonPid, signal.SIGTERM)
        await waitForExit(daemonPid, 20)
        self.assertFalse(pidAlive(childPid))
        self.assertFalse(pidfile.exists())
        log = logfile.read_text()
        self.assertIn("Starting alpha on port", log)
        self.assertIn("alpha stopped", log)


def killDaemon(pidfile: Path) -> None:
    """
    Cleanup for a daemon known only by its pidfile.
    """
    if pidfile.exists():
        killIfAlive(int(pidfile.read_text().strip() or 0))
