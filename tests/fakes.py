"""
Test doubles: a process reactor that records spawns and lets a test play the child's part, and
a TabbyAPI stand-in resource for C{StubTreq}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from treq.testing import StubTreq
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tabbyproxy.routes.admin import AdminRoutes
from tabbyproxy.config import Catalog, Keys, TabbyInstall
from tabbyproxy.routes.ollama import OllamaRoutes
from tabbyproxy.routes.openai import OpenAIRoutes
from tabbyproxy.supervisor import Supervisor, SupervisorSettings
from tabbyproxy.upstream import Upstream
from tabbyproxy.web import DEFAULT_MAX_BODY, ProxyState, Router


class FakeProcess:
    """
    The transport of a spawned child that never runs: the test decides what it prints, which
    signals it obeys, and when it exits.

    @ivar signals: every signal sent to it, in order.
    @ivar obeys: the signals that make it exit at once.
    """

    def __init__(self, protocol: ProcessProtocol, args: list[str], path: str, pid: int) -> None:
        self.protocol = protocol
        self.args = args
        self.path = path
        self.pid = pid
        self.signals: list[str] = []
        self.obeys = {"TERM", "KILL"}
        self.exited = False

    def signalProcess(self, signal: str) -> None:
        self.signals.append(signal)
        if signal in self.obeys:
            self.exit(signal=15 if signal == "TERM" else 9)

    def print(self, text: str) -> None:
        self.protocol.childDataReceived(1, text.encode("utf-8"))

    def exit(self, status: int = 0, signal: int | None = None) -> None:
        if self.exited:
            return
        self.exited = True
        if status == 0 and signal is None:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(None if signal else status, signal))
        self.protocol.processEnded(reason)

    @property
    def configPath(self) -> Path:
        return Path(self.args[self.args.index("--config") + 1])

    def config(self) -> Any:
        return yaml.safe_load(self.configPath.read_text())


class FakeProcessReactor(MemoryReactorClock):
    """
    A memory reactor with a clock whose C{spawnProcess} records a L{FakeProcess}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcess] = []

    def spawnProcess(self, processProtocol: ProcessProtocol, executable: str, args: list[str],
                     env: Any = None, path: str | None = None, uid: Any = None, gid: Any = None,
                     usePTY: bool = False, childFDs: Any = None) -> FakeProcess:
        process = FakeProcess(processProtocol, list(args), path or "", 1000 + len(self.spawned))
        self.spawned.append(process)
        processProtocol.makeConnection(process)
        return process

    @property
    def alive(self) -> list[FakeProcess]:
        return [process for process in self.spawned if not process.exited]


class FakeTabby(Resource):
    """
    Answers as a ready TabbyAPI would, for C{StubTreq}: C{/health} (200 while C{healthy}),
    and every other request is recorded and answered by L{respond}.

    @ivar requests: (path, parsed JSON body) of each request but health checks.
    @ivar pending: requests whose answer the test writes itself when C{hold} is set.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.healthy = True
        self.hold = False
        self.requests: list[tuple[str, Any, dict[str, list[str]]]] = []
        self.pending: list[Request] = []
        self.chunks = [b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\r\n\r\n', b"data: [DONE]\r\n\r\n"]

    def render(self, request: Request) -> Any:
        path = request.path.decode("utf-8")
        if path == "/health":
            request.setResponseCode(200 if self.healthy else 503)
            return b'{"status":"healthy","issues":[]}'
        raw = request.content.read() if request.content is not None else b""
        body = json.loads(raw) if raw else None
        headers = {name.decode().lower(): [v.decode() for v in values]
                   for name, values in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((path, body, headers))
        if self.hold:
            self.pending.append(request)
            return NOT_DONE_YET
        if isinstance(body, dict) and body.get("stream"):
            request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
            for chunk in self.chunks:
                request.write(chunk)
            request.finish()
            return NOT_DONE_YET
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"object": "chat.completion", "path": path}).encode()


def writeProfiles(directory: Path, profiles: dict[str, dict[str, Any]]) -> Catalog:
    """
    Write C{directory/<id>.yml} for each profile and load them.
    """
    for profileId, document in profiles.items():
        path = directory / f"{profileId}.yml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(document))
    return Catalog.load(directory)


def fakeInstall(directory: Path, keys: Keys = Keys(enabled=False)) -> TabbyInstall:
    """
    A TabbyAPI install that is never really run.
    """
    directory.mkdir(parents=True, exist_ok=True)
    return TabbyInstall(directory=directory, command=("python", "main.py"), baseConfig={}, keys=keys)


class InMemoryProxy:
    """
    The whole proxy wired in memory: its routes behind C{client} (a StubTreq), the supervisor on a
    fake process reactor, and L{FakeTabby} as every child's HTTP server.
    """

    def __init__(self, directory: Path, profiles: dict[str, dict[str, Any]], keys: Keys = Keys(enabled=False),
                 settings: SupervisorSettings = SupervisorSettings(), maxBodySize: int = DEFAULT_MAX_BODY) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.catalog = writeProfiles(directory / "config", profiles)
        self.reactor = FakeProcessReactor()
        self.tabby = FakeTabby()
        self.tabbyClient: Any = StubTreq(self.tabby)
        tabbyClient = self.tabbyClient
        runtime = directory / "runtime"
        runtime.mkdir()
        ports = iter(range(7001, 8000))
        install = fakeInstall(directory / "tabby", keys)
        self.supervisor = Supervisor(install, self.reactor, tabbyClient, runtime,
                                     settings, pickPort=lambda: next(ports))
        self.supervisor.startService()
        self.state = ProxyState(
            catalog=lambda: self.catalog,
            install=install,
            supervisor=self.supervisor,
            upstream=Upstream(tabbyClient, self.reactor, keys.upstreamHeaders),
            clock=self.reactor,
            maxBodySize=maxBodySize,
        )
        admin = AdminRoutes(self.state).app.resource()
        self.root = Router(openai=OpenAIRoutes(self.state).app.resource(),
                           ollama=OllamaRoutes(self.state).app.resource(), admin=admin)
        self.client: Any = StubTreq(self.root)

    def flush(self) -> None:
        """
        Deliver everything written on either side: the proxy's client and TabbyAPI's.
        """
        self.tabbyClient.flush()
        self.client.flush()
