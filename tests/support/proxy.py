"""
The real proxy service for integration tests: built by C{makeService} from command-line options,
listening on a loopback port, spawning the simulator as a real child process.  Blocking clients
(the C{openai} and C{ollama} packages) run in a thread so the reactor keeps serving.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from tabbyproxy.supervisor import Supervisor, pickFreePort
from tabbyproxy.tap import Options, makeService
from tests.support.fakes import writeProfiles

T = TypeVar("T")

DEADLINE = 30.0


class RunningProxy:
    """
    A started proxy service and a treq client for it; stopped (child included) at test cleanup.
    """

    def __init__(self, testCase: TestCase, profiles: dict[str, dict[str, Any]], *arguments: str) -> None:
        configDir = Path(testCase.mktemp()) / "config"
        writeProfiles(configDir, profiles)
        self.port = pickFreePort()
        self.options = Options()
        self.options.parseOptions(
            ["--simulate", "--config-dir", str(configDir), "--listen", f"tcp:{self.port}:interface=127.0.0.1",
             *arguments]
        )
        self.service = makeService(self.options)
        self.service.startService()
        testCase.addCleanup(self.service.stopService)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        testCase.addCleanup(self.pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=self.pool))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def supervisor(self) -> Supervisor:
        [supervisor] = [s for s in self.service if isinstance(s, Supervisor)]  # type: ignore[attr-defined]
        return supervisor


def inThread(function: Callable[[], T]) -> Deferred[T]:
    """
    Run a blocking client call in a thread, bounded by L{DEADLINE}.
    """
    d: Deferred[T] = deferToThread(function)
    d.addTimeout(DEADLINE, reactor)
    return d


async def waitUntil(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """
    Check C{condition} after each short turn of the reactor until it holds; fail after
    C{timeout} seconds rather than hang.
    """
    waited = 0.0
    while not condition():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await deferLater(reactor, 0.02)
        waited += 0.02


class TwistdProxy(ProcessProtocol):
    """
    The proxy as users run it: C{twistd -n tabbyproxy --simulate ...} in its own process, on a
    free loopback port.  At test cleanup a proxy still running is SIGKILLed, and so is every
    TabbyAPI child it reported, so no process outlives the test.

    @ivar childPids: the pid of each child the proxy started, as far as a test looked it up
        with L{childPid}.
    """

    def __init__(self, testCase: TestCase, profiles: dict[str, dict[str, Any]], *arguments: str) -> None:
        self.root = Path(testCase.mktemp()).absolute()
        configDir = self.root / "config"
        writeProfiles(configDir, profiles)
        self.port = pickFreePort()
        self.output = bytearray()
        self.childPids: set[int] = set()
        self.exitReason: Failure | None = None
        self._ended: Deferred[None] = Deferred()
        self._watches: list[tuple[bytes, Deferred[None]]] = []
        # twisted.scripts.twistd has no __main__ guard, so `-m twisted.scripts.twistd` would do
        # nothing: call its run() the way the twistd script does.
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logfile=-", "tabbyproxy", "--simulate",
                "--config-dir", str(configDir), "--listen", f"tcp:{self.port}:interface=127.0.0.1", *arguments]
        self.process = reactor.spawnProcess(self, sys.executable, argv, env=dict(os.environ), path=str(self.root))
        self.pid: int = self.process.pid
        testCase.addCleanup(self._cleanUp)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=self.pool))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- ProcessProtocol

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data
        for watch in list(self._watches):
            fragment, d = watch
            if fragment in self.output:
                self._watches.remove(watch)
                d.callback(None)

    def processEnded(self, reason: Failure) -> None:
        self.exitReason = reason
        for _, d in self._watches:
            d.errback(AssertionError(f"twistd exited before printing what was awaited:\n{self.text}"))
        self._watches = []
        self._ended.callback(None)

    # -- what tests use

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    @property
    def running(self) -> bool:
        return self.exitReason is None

    def printed(self, fragment: str, timeout: float = DEADLINE) -> Deferred[None]:
        """
        Fires once twistd's log holds C{fragment}; fails after C{timeout} seconds.
        """
        raw = fragment.encode("utf-8")
        d: Deferred[None] = Deferred()
        if raw in self.output:
            d.callback(None)
        elif self.exitReason is not None:
            d.errback(AssertionError(f"twistd already exited:\n{self.text}"))
        else:
            self._watches.append((raw, d))
            d.addTimeout(timeout, reactor)
        return d

    async def started(self) -> None:
        """
        Wait until the proxy listens.
        """
        await self.printed(f" starting on {self.port}")

    def ended(self, timeout: float = DEADLINE) -> Deferred[None]:
        """
        Fires when twistd has exited; fails after C{timeout} seconds.
        """
        d: Deferred[None] = Deferred()
        if self.exitReason is not None:
            d.callback(None)
            return d
        self._ended.addBoth(lambda result: d.callback(None) if not d.called else None)
        d.addTimeout(timeout, reactor)
        return d

    async def status(self) -> dict[str, Any]:
        response = await self.http.get(self.url + "/status")
        document: dict[str, Any] = await response.json()
        return document

    async def childPid(self) -> int | None:
        """
        The pid of the running TabbyAPI child (from C{/status}), remembered for cleanup.
        """
        pid: int | None = (await self.status())["pid"]
        if pid is not None:
            self.childPids.add(pid)
        return pid

    def signal(self, name: str) -> None:
        self.process.signalProcess(name)

    def rss(self) -> int:
        """
        The proxy process's resident memory in bytes, from C{/proc/PID/status}.
        """
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def runtimeDirectories(self) -> set[Path]:
        """
        The private directories of the children twistd started, from its log.
        """
        return {Path(match) for match in re.findall(r"--config (\S+)/tabby-\d+\.yml", self.text)}

    async def _cleanUp(self) -> None:
        await self.pool.closeCachedConnections()
        if self.exitReason is None:
            self.signal("KILL")
            await self.ended()
        for pid in self.childPids:
            if pidAlive(pid):
                os.kill(pid, signal.SIGKILL)
        # A SIGKILLed twistd cannot remove its runtime directory; the test does.
        for directory in self.runtimeDirectories():
            shutil.rmtree(directory, ignore_errors=True)


def pidAlive(pid: int) -> bool:
    """
    Whether a process with this pid exists and is not a zombie.
    """
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def waitForExit(pid: int, timeout: float) -> float:
    """
    Wait until the process C{pid} is gone (it is not ours to reap, so its exit is watched, not
    awaited); fail after C{timeout} seconds.

    @return: how long it took, in seconds.
    """
    started = reactor.seconds()
    await waitUntil(lambda: not pidAlive(pid), timeout)
    return reactor.seconds() - started
