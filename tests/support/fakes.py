"""
Test doubles: a process reactor that records spawns and lets a test play the child's part, a
TabbyAPI stand-in resource, an in-memory agent over a whole site, and the whole proxy wired in
memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, AnyStr, Callable, Mapping, Sequence, cast

import yaml
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessProtocol, IProcessTransport, IReactorProcess
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tabbyproxy.config import Catalog, Keys, Profile, TabbyInstall
from tabbyproxy.gpus import GpuProbe
from tabbyproxy.memory import MemoryEstimate
from tabbyproxy.routes.common import ProxyState
from tabbyproxy.routes.root import makeSite
from tabbyproxy.server import DEFAULT_MAX_BODY
from tabbyproxy.scheduler import Lease, Scheduler, SchedulerSettings
from tabbyproxy.upstream import BytesProducer, Upstream


class FakeProcess:
    """
    The transport of a spawned child that never runs: the test decides what it prints, which
    signals it obeys, and when it exits.

    @ivar signals: every signal sent to it, in order.
    @ivar obeys: the signals that make it exit at once.
    """

    def __init__(self, protocol: IProcessProtocol, args: list[str], path: str, pid: int,
                 env: Mapping[str, str] | None = None) -> None:
        self.protocol = protocol
        self.args = args
        self.path = path
        self.pid = pid
        self.env = dict(env or {})
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


@implementer(IReactorProcess)
class FakeProcessReactor(MemoryReactorClock):
    """
    A memory reactor with a clock whose C{spawnProcess} records a L{FakeProcess}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcess] = []

    def spawnProcess(self, processProtocol: IProcessProtocol, executable: bytes | str, args: Sequence[bytes | str],
                     env: Mapping[AnyStr, AnyStr] | None = None, path: None | bytes | str = None,
                     uid: int | None = None, gid: int | None = None, usePTY: bool = False,
                     childFDs: Mapping[int, int | str] | None = None) -> IProcessTransport:
        process = FakeProcess(processProtocol, [os.fsdecode(arg) for arg in args],
                              os.fsdecode(path) if path else "", 1000 + len(self.spawned),
                              {os.fsdecode(name): os.fsdecode(value) for name, value in (env or {}).items()})
        self.spawned.append(process)
        transport = cast(IProcessTransport, process)
        processProtocol.makeConnection(transport)
        return transport

    @property
    def alive(self) -> list[FakeProcess]:
        return [process for process in self.spawned if not process.exited]


class FakeTabby(Resource):
    """
    Answers as a ready TabbyAPI would, for C{StubTreq}: C{/health} (200 while C{healthy}),
    and every other request is recorded and answered by L{respond}.

    @ivar requests: (path, parsed JSON body) of each request but health checks.
    @ivar pending: requests whose answer the test writes itself when C{hold} is set.
    @ivar healthAsked: how many C{/health} requests came.
    @ivar heldHealth: the C{/health} requests left unanswered while C{healthHangs} is set, as a
        hung TabbyAPI leaves them.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.healthy = True
        self.hold = False
        self.healthHangs = False
        self.healthAsked = 0
        self.heldHealth: list[Request] = []
        self.requests: list[tuple[str, Any, dict[str, list[str]]]] = []
        self.pending: list[Request] = []
        self.chunks = [b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\r\n\r\n', b"data: [DONE]\r\n\r\n"]

    def render(self, request: Request) -> Any:
        path = request.path.decode("utf-8")
        if path == "/health":
            self.healthAsked += 1
            if self.healthHangs:
                self.heldHealth.append(request)
                return NOT_DONE_YET
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
        return json.dumps({"object": "chat.completion", "model": "Folder-exl3", "path": path}).encode()


def writeProfiles(directory: Path, profiles: dict[str, dict[str, Any]]) -> Catalog:
    """
    Write C{directory/<id>.yml} for each profile and load them.
    """
    for profileId, document in profiles.items():
        path = directory / f"{profileId}.yml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(document))
    return Catalog.load(directory)


def fakeChildsListener(port: int, pid: int) -> bool:
    """
    The listener check for fake children, whose ports nobody listens on: every one is theirs.
    """
    return True


def fakeInstall(directory: Path, keys: Keys = Keys(enabled=False)) -> TabbyInstall:
    """
    A TabbyAPI install that is never really run.
    """
    directory.mkdir(parents=True, exist_ok=True)
    return TabbyInstall(directory=directory, command=("python", "main.py"), baseConfig={}, keys=keys)


@implementer(IAgent)
class SiteAgent:
    """
    An agent whose every request is served in memory by C{site}, through its channels and
    requests (treq's C{RequestTraversalAgent} serves a resource through a plain C{Site}).

    @ivar clock: the clock of the client side's connections.
    """

    def __init__(self, site: Site) -> None:
        self.site = site
        self.clock = MemoryReactorClock()
        self._agent = Agent(self.clock)
        self._pumps: list[iosim.IOPump] = []

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        response: Deferred[IResponse] = self._agent.request(method, uri, headers, bodyProducer)
        host, port, factory, timeout, bindAddress = self.clock.tcpClients.pop()
        serverAddress = IPv4Address("TCP", "127.0.0.1", port)
        clientAddress = IPv4Address("TCP", "127.0.0.1", 31337)
        server = self.site.buildProtocol(clientAddress)
        client = factory.buildProtocol(serverAddress)
        self._pumps.append(iosim.connect(
            server, iosim.FakeTransport(server, isServer=True, hostAddress=serverAddress, peerAddress=clientAddress),
            client, iosim.FakeTransport(client, isServer=False, hostAddress=clientAddress, peerAddress=serverAddress),
        ))
        return response

    def flush(self) -> None:
        """
        Deliver everything written on either side of every open connection.
        """
        pumps, self._pumps = self._pumps, []
        for pump in pumps:
            pump.flush()
            if not (pump.clientIO.disconnected and pump.serverIO.disconnected):
                self._pumps.append(pump)


class InMemoryClient(HTTPClient):
    """
    treq's API over a L{SiteAgent}, with its C{flush}.
    """

    def __init__(self, agent: SiteAgent) -> None:
        super().__init__(agent, data_to_body_producer=BytesProducer)
        self.siteAgent = agent

    def flush(self) -> None:
        self.siteAgent.flush()


class RunningScheduler:
    """
    A started scheduler on a fake process reactor and clock, whose children answer as
    L{FakeTabby} does (ports 7001 and up), with the profiles in C{directory}/config.

    @param ownsListener: the check of who listens on a child's port (see L{Scheduler}).
    """

    def __init__(self, directory: Path, profiles: dict[str, dict[str, Any]], keys: Keys = Keys(enabled=False),
                 settings: SchedulerSettings = SchedulerSettings(), tabby: FakeTabby | None = None,
                 ownsListener: Callable[[int, int], bool] = fakeChildsListener, gpus: GpuProbe | None = None,
                 estimate: Callable[[Profile], MemoryEstimate] | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.catalog = writeProfiles(directory / "config", profiles)
        self.reactor = FakeProcessReactor()
        self.tabby = FakeTabby() if tabby is None else tabby
        self.tabbyAgent = RequestTraversalAgent(self.tabby)
        self.runtime = directory / "runtime"
        self.runtime.mkdir()
        ports = iter(range(7001, 8000))
        self.scheduler = Scheduler(fakeInstall(directory / "tabby", keys), self.reactor, self.reactor,
                                   self.tabbyAgent, self.runtime, settings, pickPort=lambda: next(ports),
                                   ownsListener=ownsListener, gpus=gpus, estimate=estimate)
        self.scheduler.startService()

    def acquire(self, name: str, keepAlive: float | None = None) -> Deferred[Lease]:
        return self.scheduler.acquire(self.catalog.profiles[name], keepAlive)


class InMemoryProxy:
    """
    The whole proxy wired in memory: its site behind C{client}, the scheduler on a fake process
    reactor, and L{FakeTabby} as every child's HTTP server, reached by the production relay over a
    C{RequestTraversalAgent}.
    """

    def __init__(self, directory: Path, profiles: dict[str, dict[str, Any]], keys: Keys = Keys(enabled=False),
                 settings: SchedulerSettings = SchedulerSettings(), maxBodySize: int = DEFAULT_MAX_BODY,
                 tabby: FakeTabby | None = None, openModelList: bool = False,
                 currentKeys: Callable[[], Keys] | None = None) -> None:
        """
        @param currentKeys: the keys as they are now, when a test changes them (else C{keys}).
        """
        running = RunningScheduler(directory, profiles, keys, settings, tabby)
        self.catalog = running.catalog
        self.reactor = running.reactor
        self.tabby = running.tabby
        self.tabbyAgent = running.tabbyAgent
        self.scheduler = running.scheduler
        install = running.scheduler.install
        keysNow = currentKeys if currentKeys is not None else (lambda: keys)
        self.scheduler.currentKeys = keysNow
        self.state = ProxyState(
            catalog=lambda: self.catalog,
            install=install,
            scheduler=self.scheduler,
            upstream=Upstream(self.tabbyAgent, lambda: keysNow().upstreamHeaders, self.reactor),
            clock=self.reactor,
            maxBodySize=maxBodySize,
            openModelList=openModelList,
            currentKeys=currentKeys,
        )
        self.site = makeSite(self.state)
        self.site.reactor = self.reactor
        self.client: Any = InMemoryClient(SiteAgent(self.site))

    def flush(self) -> None:
        """
        Deliver everything written on either side: the proxy's client and TabbyAPI's.
        """
        for _ in range(3):
            self.tabbyAgent.flush()
            self.client.flush()
