"""
One TabbyAPI child (L{tabbyproxy.child}): its spawn, readiness, exit, stop and log lines, driven
through the scheduler on a fake process reactor, a fake clock and a fake TabbyAPI.
"""

from __future__ import annotations

import stat

from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs

from tabbyproxy.child import ChildSettings
from tabbyproxy.scheduler import Lease, ShuttingDown, StartFailed
from tests.support.fakes import FakeProcess
from tests.unit.test_scheduler import GRACE, _SchedulerTestCase


class ChildTests(_SchedulerTestCase):
    def test_firstRequestSpawnsTabbyWithGeneratedConfig(self) -> None:
        """
        The first request spawns C{main.py --config FILE} in the TabbyAPI directory; the file holds
        the profile's TabbyAPI sections and the chosen loopback port, without the proxy's own keys,
        and only its owner can read it.
        """
        lease = self.ready("b")
        [process] = self.reactor.spawned
        self.assertEqual(process.args[:2], ["python", "main.py"])
        self.assertEqual(process.path, str(self.scheduler.install.directory))
        config = process.config()
        self.assertEqual(config["model"], {"model_name": "B"})
        self.assertEqual(config["sampling"], {"override_preset": "x"})
        self.assertEqual(config["network"], {"host": "127.0.0.1", "port": 7001, "disable_auth": True})
        self.assertEqual(stat.S_IMODE(process.configPath.stat().st_mode), 0o600)
        self.assertEqual(lease.baseURL, "http://127.0.0.1:7001")

        profileA = self.profile("a")
        self.assertNotIn("unload_timer", self.scheduler.install.childConfig(profileA, 1)["model"])
        self.assertNotIn("template", self.scheduler.install.childConfig(profileA, 1))

    def test_exitDuringStartFailsWaitersWithLastLines(self) -> None:
        """
        When the child exits before it is ready, every request waiting for it fails with the
        exit status and the last lines it printed; the next request tries a fresh start.
        """
        self.tabby.healthy = False
        waiting = [self.acquire("a"), self.acquire("a")]
        process = self.reactor.spawned[0]
        process.print("Loading model: /models/A\nValueError: Failed to load config.json from /models/A\n")
        process.exit(1)
        for d in waiting:
            failure = self.failureResultOf(d, StartFailed)
            self.assertIn("exited with status 1", str(failure.value))
            self.assertIn("ValueError: Failed to load config.json", str(failure.value))
        self.assertIn("exited with status 1", self.scheduler.status()["last_error"])
        self.assertFalse(process.configPath.exists())

        self.tabby.healthy = True
        self.successResultOf(self.acquire("a"))
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_loadTimeoutFailsWaitersAndKillsStubbornChild(self) -> None:
        """
        A child that never becomes healthy is abandoned after the load timeout: waiters fail,
        it gets SIGTERM, and SIGKILL after the grace period if it ignores that.
        """
        self.tabby.healthy = False
        waiting = self.acquire("a")
        process = self.reactor.spawned[0]
        process.obeys = {"KILL"}
        self.reactor.advance(99)
        self.assertNoResult(waiting)
        self.reactor.advance(1)
        self.assertIn("did not become ready", str(self.failureResultOf(waiting, StartFailed).value))
        self.assertEqual(process.signals, ["TERM"])
        self.reactor.advance(GRACE)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        self.assertTrue(process.exited)
        self.assertEqual(self.scheduler.snapshot(), ())

    def test_crashWhileReadyIsReportedAndRecovered(self) -> None:
        """
        A child that dies while serving is recorded in the status, and the next request starts
        a fresh one; the dead child's leases can still be released.
        """
        lease = self.ready("a")
        self.reactor.spawned[0].exit(signal=9)
        self.assertIn("killed by signal 9", self.scheduler.status()["last_error"])
        self.assertEqual(self.scheduler.status()["state"], "stopped")
        lease.release()
        self.successResultOf(self.acquire("a"))
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stopServiceWaitsForChildExit(self) -> None:
        """
        Stopping the service fails waiting requests, sends SIGTERM, and fires only once the child
        has exited (after SIGKILL when it ignores SIGTERM).
        """
        lease = self.ready("a")
        process = self.reactor.spawned[0]
        process.obeys = {"KILL"}
        waiting = self.acquire("b")
        stopped = self.scheduler.stopService()
        self.failureResultOf(waiting, ShuttingDown)
        self.assertNoResult(stopped)
        self.reactor.advance(GRACE)
        self.successResultOf(stopped)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        self.failureResultOf(self.acquire("a"), ShuttingDown)
        lease.release()

    def test_childOutputIsLoggedWithModel(self) -> None:
        """
        Each line the child prints is logged with the model's id.
        """
        with capturedLogs() as events:
            self.ready("a")
            self.reactor.spawned[0].print("Model successfully loaded.\nUvicorn running")
            self.reactor.spawned[0].exit(0)
        lines = [e for e in events if e.get("model") == "a" and "line" in e]
        self.assertEqual([e["line"] for e in lines], ["Model successfully loaded.", "Uvicorn running"])

    def test_exitsAreLoggedWithTheirOwnFields(self) -> None:
        """
        A crash and a failed start are error events that carry the model, the pid, the exit
        status and the signal as fields, not only as text (issue 9, item 6).
        """
        with capturedLogs() as events:
            self.ready("a")
            self.reactor.spawned[0].exit(signal=9)
            self.tabby.healthy = False
            failing = self.acquire("b")
            self.reactor.spawned[1].exit(3)
        self.failureResultOf(failing, StartFailed)
        errors = [e for e in events if e.get("log_level") is not None and e["log_level"].name == "error"]
        self.assertEqual(
            [(e["model"], e["pid"], e["exitCode"], e["signal"]) for e in errors],
            [("a", 1000, None, 9), ("b", 1001, 3, None)],
        )

    def test_portHeldByAnotherProcessFailsTheStart(self) -> None:
        """
        When C{/health} answers 200 on the child's port but the listening socket is another
        process's (a local user bound the port first), the start fails with a message saying
        so, no request is granted (so none is sent there), the child is stopped, and the next
        start picks another port.
        """
        self.squatted.add(7001)
        waiting = self.acquire("a")
        process = self.reactor.spawned[0]
        message = str(self.failureResultOf(waiting, StartFailed).value)
        self.assertIn("port 7001 is held by a process that is not TabbyAPI for a", message)
        self.assertIn("sends it no request and no key", message)
        self.assertEqual(process.signals, ["TERM"])
        self.assertIn("port 7001 is held", self.scheduler.status()["last_error"])

        lease = self.ready("a")
        self.assertEqual(lease.baseURL, "http://127.0.0.1:7002")

    def switchPorts(self, process: FakeProcess, port: int) -> None:
        """
        Make C{process} say what TabbyAPI says when its port is busy.
        """
        process.print(f"2026-12-04 15:40:00.123 WARNING:  Port {port} is currently in use. Switching to {port + 1}.\n")

    def startOnPorts(self, *ports: int) -> tuple[Deferred[Lease], FakeProcess]:
        """
        Start model C{a} with the proxy picking C{ports} in turn, its children not ready yet;
        return the request waiting for it and the first child, which ignores SIGTERM.
        """
        picked = iter(ports)
        self.scheduler.pickPort = lambda: next(picked)
        self.tabby.healthy = False
        waiting = self.acquire("a")
        first = self.reactor.spawned[0]
        first.obeys = set()
        return waiting, first

    def test_portSwitchStartsAgainOnAFreshPort(self) -> None:
        """
        A child that says its port is busy and it switches to the next one is stopped before
        anything is sent to either port, and another child starts at once on a port the proxy
        picked; the request waiting for the model is served by that one, and the moved child's
        exit does not end the new start.
        """
        waiting, moved = self.startOnPorts(7001, 7101)
        with capturedLogs() as events:
            self.switchPorts(moved, 7001)
        self.assertEqual(moved.signals, ["TERM"])
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.reactor.spawned[1].config()["network"]["port"], 7101)
        self.assertNoResult(waiting)
        self.assertEqual([e["outcome"] for e in events if "outcome" in e],
                         ["TabbyAPI moved to port 7002, which the proxy did not pick"])

        moved.exit(signal=15)
        self.assertEqual(self.scheduler.status()["state"], "starting")
        self.tabby.healthy = True
        self.reactor.advance(ChildSettings().healthInterval)
        lease = self.successResultOf(waiting)
        self.assertEqual(lease.baseURL, "http://127.0.0.1:7101")
        self.assertIsNone(self.scheduler.status()["last_error"])

    def test_bothPortsBusyStartsAgainOnAFreshPort(self) -> None:
        """
        When the next port is busy too, TabbyAPI says so and exits with status 0 without
        serving: the proxy starts another child at once on a port it picks, and the request
        waiting for the model is served by it, not failed by the first child's exit.
        """
        waiting, first = self.startOnPorts(7001, 7101)
        first.print("2026-12-04 15:40:00.123 ERROR:    Ports 7001 and 7002 are in use by other programs. "
                    "Please free one of them or change the port in config.yml.\n")
        first.exit(status=0)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.reactor.spawned[1].config()["network"]["port"], 7101)
        self.assertNoResult(waiting)

        self.tabby.healthy = True
        self.reactor.advance(ChildSettings().healthInterval)
        self.assertEqual(self.successResultOf(waiting).baseURL, "http://127.0.0.1:7101")
        self.assertIsNone(self.scheduler.status()["last_error"])

    def test_threePortMovesFailTheStart(self) -> None:
        """
        When three children in a row of one start find their port busy, the requests waiting
        for the model fail with a message that says so; the next request starts afresh.
        """
        self.tabby.healthy = False
        waiting = [self.acquire("a"), self.acquire("a")]
        for attempt in range(3):
            self.assertNoResult(waiting[0])
            process = self.reactor.spawned[attempt]
            self.switchPorts(process, process.config()["network"]["port"])
            self.assertEqual(process.signals, ["TERM"])
        self.assertEqual(len(self.reactor.spawned), 3)
        for d in waiting:
            message = str(self.failureResultOf(d, StartFailed).value)
            self.assertIn("was busy (another process listens on it), and TabbyAPI moved to port", message)
            self.assertIn("3 starts in a row found their port busy", message)
        self.assertIn("3 starts in a row", self.scheduler.status()["last_error"])
        self.assertEqual(self.scheduler.snapshot(), ())

        self.tabby.healthy = True
        self.successResultOf(self.acquire("a"))
        self.assertEqual(len(self.reactor.spawned), 4)

    def test_switchLineOfAnotherPortOrAReadyChildIsOnlyLogged(self) -> None:
        """
        The port line counts only from a starting child about its own port: a ready child that
        prints it (a log replayed, a model's output) keeps serving.
        """
        self.tabby.healthy = False
        waiting = self.acquire("a")
        process = self.reactor.spawned[0]
        self.switchPorts(process, 9999)
        self.assertEqual(process.signals, [])
        self.tabby.healthy = True
        self.reactor.advance(ChildSettings().healthInterval)
        self.successResultOf(waiting)
        self.switchPorts(process, 7001)
        self.assertEqual(process.signals, [])
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_loadTimeoutCountsFromTheLoadingLine(self) -> None:
        """
        The load timeout counts again from TabbyAPI's "Loading model:" line: the time its
        interpreter took to get there (slow on a busy machine) does not shorten the load.
        """
        self.tabby.healthy = False
        waiting = self.acquire("a")
        process = self.reactor.spawned[0]
        self.reactor.advance(60)
        process.print("2026-12-04 16:00:00.000 INFO:     Loading model: /models/A\n")
        self.reactor.advance(99)
        self.assertNoResult(waiting)
        self.assertEqual(process.signals, [])
        self.reactor.advance(1)
        self.assertIn("did not become ready within", str(self.failureResultOf(waiting, StartFailed).value))
        self.assertEqual(process.signals, ["TERM"])
