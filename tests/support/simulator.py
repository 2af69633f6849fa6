"""
Helpers for tests that run the TabbyAPI simulator (L{tabbyproxy.simulator}) as a real child.

They build a TabbyAPI-like working directory (config.yml, api_tokens.yml, models/<name>/), spawn
the simulator in it with the reactor, wait for readiness by polling /health with a deadline, and
stop and reap the child so no process or reactor state outlives a test.  The simulator's own
tests use them, and so can the proxy's integration tests.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml
from twisted.internet import reactor as _globalReactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from treq.client import HTTPClient

REPO_ROOT = Path(__file__).resolve().parents[2]

# The default reactor, typed loosely: it provides process, TCP and time interfaces at once.
reactor: Any = _globalReactor


def findFreePorts(count: int = 2) -> int:
    """
    Return a loopback port C{p} such that C{p} .. C{p+count-1} all look free right now.

    Two ports by default, because TabbyAPI (and so the simulator) moves to port+1 when its port
    is busy; a test that owns both knows which one it will be served on.
    """
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        if all(_portFree(base + i) for i in range(count)):
            return int(base)
    raise RuntimeError("no run of free loopback ports found")


def _portFree(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def makeTabbyDirectory(
    base: Path,
    *,
    port: int,
    models: Sequence[str] = (),
    emptyModels: Sequence[str] = (),
    modelName: str | None = None,
    apiKey: str | None = "A" * 32,
    adminKey: str = "K" * 32,
    disableAuth: bool = False,
    simulator: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    maxPositionEmbeddings: int = 4096,
) -> Path:
    """
    Create a TabbyAPI working directory at C{base} and return it.

    It holds C{config.yml} (network on 127.0.0.1:C{port}, C{model_dir: models}, optional
    C{model_name}, the C{simulator:} knobs, and any C{extra} sections merged in per section),
    C{models/<name>/config.json} for each of C{models}, an empty C{models/<name>/} for each of
    C{emptyModels} (a folder TabbyAPI lists but cannot load), and C{api_tokens.yml} with
    C{apiKey}/C{adminKey} unless C{apiKey} is None (then the server generates the file).
    """
    base.mkdir(parents=True, exist_ok=True)
    for name in models:
        folder = base / "models" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(
            json.dumps({"max_position_embeddings": maxPositionEmbeddings,
                        "architectures": ["SimulatedForCausalLM"]})
        )
    for name in emptyModels:
        (base / "models" / name).mkdir(parents=True, exist_ok=True)
    (base / "models").mkdir(exist_ok=True)
    config: dict[str, Any] = {
        "network": {"host": "127.0.0.1", "port": port, "disable_auth": disableAuth},
        "model": {"model_dir": "models"},
    }
    if modelName is not None:
        config["model"]["model_name"] = modelName
    if simulator:
        config["simulator"] = dict(simulator)
    for section, values in (extra or {}).items():
        config.setdefault(section, {}).update(values)
    (base / "config.yml").write_text(yaml.safe_dump(config))
    if apiKey is not None:
        (base / "api_tokens.yml").write_text(
            yaml.safe_dump({"api_key": apiKey, "admin_key": adminKey}))
    return base


class SimulatorProcess(ProcessProtocol):
    """
    A spawned simulator: collects its stdout and stderr and records how it ended.

    C{ended} fires with the exit code (or C{-signal} when a signal killed it) once the process
    has exited and its pipes are closed.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.output = b""
        self.transport: IProcessTransport | None = None
        self.exitCode: int | None = None
        self.signal: int | None = None
        self.finished = False
        self.ended: Deferred[int] = Deferred()
        self._waiters: list[tuple[bytes, Deferred[None]]] = []

    @property
    def text(self) -> str:
        return self.output.decode("utf8", "replace")

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data
        for needle, waiter in list(self._waiters):
            if needle in self.output:
                self._waiters.remove((needle, waiter))
                waiter.callback(None)

    def processEnded(self, reason: Failure) -> None:
        self.finished = True
        value = reason.value
        if isinstance(value, ProcessTerminated):
            self.exitCode = value.exitCode
            self.signal = value.signal
        elif isinstance(value, ProcessDone):
            self.exitCode = 0
        waiters, self._waiters = self._waiters, []
        for needle, waiter in waiters:
            waiter.errback(AssertionError(
                f"simulator exited before printing {needle!r}; output:\n{self.text}"))
        code = self.exitCode if self.exitCode is not None else -(self.signal or 0)
        self.ended.callback(code)

    def url(self, path: str = "", port: int | None = None) -> str:
        return f"http://127.0.0.1:{port if port is not None else self.port}{path}"

    def waitForOutput(self, needle: str, timeout: float = 10.0) -> Deferred[None]:
        """
        Fire once C{needle} has appeared in the combined output; fail after C{timeout} seconds
        or as soon as the process exits without printing it.
        """
        encoded = needle.encode()
        waiter: Deferred[None] = Deferred()
        if encoded in self.output:
            waiter.callback(None)
        elif self.finished:
            waiter.errback(AssertionError(f"simulator exited without printing {needle!r}"))
        else:
            self._waiters.append((encoded, waiter))
            waiter.addTimeout(timeout, reactor)
        return waiter

    def signalProcess(self, name: str) -> None:
        """
        Send a signal (C{"TERM"}, C{"KILL"}, ...) unless the process is already gone.
        """
        if self.transport is not None and not self.finished:
            try:
                self.transport.signalProcess(name)
            except ProcessExitedAlready:
                pass

    def stop(self) -> Deferred[int]:
        """
        SIGKILL the process if it still runs and fire with its exit code once it is reaped.
        Tests add this as a cleanup so no child outlives them.
        """
        self.signalProcess("KILL")
        return self.ended if not self.ended.called else _succeeded(self.exitCode)


def _succeeded(code: int | None) -> Deferred[int]:
    done: Deferred[int] = Deferred()
    done.callback(code if code is not None else -1)
    return done


def spawnSimulator(
    directory: Path,
    port: int,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> SimulatorProcess:
    """
    Start C{python -m tabbyproxy.simulator *args} with C{directory} as its working directory,
    the way the proxy starts TabbyAPI, and return its protocol.  C{port} is where callers expect
    it to serve (used by L{SimulatorProcess.url}).
    """
    process = SimulatorProcess(port)
    childEnv = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONUNBUFFERED": "1",
    }
    childEnv.update(env or {})
    process.transport = reactor.spawnProcess(
        process,
        sys.executable,
        [sys.executable, "-m", "tabbyproxy.simulator", *args],
        env=childEnv,
        path=str(directory),
    )
    return process


def makeHTTPClient(testCase: Any) -> HTTPClient:
    """
    A treq client whose connections are not kept alive, closed again in the test's cleanup,
    so no socket is left in the reactor when the test ends.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    testCase.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))


async def waitForHealth(
    client: HTTPClient,
    process: SimulatorProcess,
    timeout: float = 10.0,
    port: int | None = None,
) -> None:
    """
    Poll C{GET /health} every 50 ms until it answers 200, as a supervisor should; fail when
    C{timeout} passes or the process exits first.
    """
    clock: IReactorTime = reactor
    deadline = clock.seconds() + timeout
    while True:
        if process.finished:
            raise AssertionError(
                f"simulator exited ({process.exitCode}) before becoming healthy:\n{process.text}")
        try:
            response = await client.get(process.url("/health", port), timeout=1)
            await response.content()
            if response.code == 200:
                return
        except Exception:
            # Connection refused while the simulated model loads: keep polling.
            pass
        if clock.seconds() > deadline:
            raise AssertionError(f"simulator not healthy after {timeout}s:\n{process.text}")
        await deferLater(clock, 0.05)
