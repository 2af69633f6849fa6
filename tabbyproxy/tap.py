"""
The twistd plugin's glue: the command-line options of C{twistd tabbyproxy} and the service they
build (the web site, the TabbyAPI scheduler, and the private runtime directory).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from twisted.application import strports
from twisted.application.service import IService, IServiceCollection, MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python import usage
from twisted.python.components import Componentized
from zope.interface import implementer

from tabbyproxy import channel
from tabbyproxy.auth import KeyWatcher
from tabbyproxy.config import Catalog, ConfigError, TabbyInstall
from tabbyproxy.gpus import chooseProbe, parseGpuMemory, parseSimulatedGpus
from tabbyproxy.history import RequestHistory
from tabbyproxy.keepalive import FOREVER, MAX_SECONDS, KeepAliveError, parseKeepAlive
from tabbyproxy.limits import DEFAULT_MAX_CONNECTIONS, connectionRoom, raiseFileLimit, systemBacklog, withBacklog
from tabbyproxy.logbuffer import LogBuffer, LogBufferService
from tabbyproxy.metrics import Metrics
from tabbyproxy.relaypool import RelayAgent
from tabbyproxy.routes.common import ProxyState
from tabbyproxy.routes.root import makeSite
from tabbyproxy.server import DEFAULT_CLIENT_TIMEOUT, DEFAULT_MAX_BODY, DEFAULT_REQUEST_TIMEOUT
from tabbyproxy.reloader import ProfileReloader
from tabbyproxy.simulator.install import simulatedInstall
from tabbyproxy.textlog import twistdLogObserver
from tabbyproxy.child import ChildSettings, diesWithParent
from tabbyproxy.scheduler import Scheduler, SchedulerSettings
from tabbyproxy.upstream import ReadTimeouts, Upstream

log = Logger()


def _duration(option: str) -> Callable[[str], float]:
    """
    The value of C{--option}: seconds or a duration like C{15m}; negative means never.
    """

    def coerce(text: str) -> float:
        try:
            return parseKeepAlive(text)
        except KeepAliveError:
            raise ValueError(f"--{option} {text!r}: give seconds, or a duration such as 15m or 1h30m "
                             f"(negative: never), at most {MAX_SECONDS:.0f} seconds") from None

    coerce.coerceDoc = "Seconds, or a duration like 15m; negative means never."  # type: ignore[attr-defined]
    return coerce


def _positiveSeconds(option: str) -> Callable[[str], float]:
    """
    The value of C{--option}: a positive number of seconds.
    """

    def coerce(text: str) -> float:
        try:
            seconds = float(text)
        except ValueError:
            seconds = 0.0
        if not seconds > 0 or seconds == float("inf"):
            raise ValueError(f"--{option} {text!r}: give a positive number of seconds")
        return seconds

    coerce.coerceDoc = "Seconds."  # type: ignore[attr-defined]
    return coerce


def _positiveInt(option: str) -> Callable[[str], int]:
    """
    The value of C{--option}: a positive whole number.
    """

    def coerce(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            number = 0
        if number <= 0:
            raise ValueError(f"--{option} {text!r}: give a positive whole number")
        return number

    return coerce


def _keptBodies(text: str) -> int:
    """
    The value of C{--keep-request-bodies}: how many requests keep their text, 0 for none.
    """
    try:
        number = int(text)
    except ValueError:
        number = -1
    if number < 0:
        raise ValueError(f"--keep-request-bodies {text!r}: give a whole number of requests (0: keep none)")
    return number


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run TabbyAPI models on demand behind one OpenAI- and Ollama-compatible endpoint. "
        "A request naming a model (a profile in the config directory) starts TabbyAPI with it, "
        "another model swaps in once the running one is idle, and an idle model is unloaded "
        "after its keep-alive time."
    )

    optParameters = [
        ["listen", "l", "tcp:9000:interface=127.0.0.1", "Endpoint to listen on (an endpoint string)."],
        ["tabby-dir", "t", None, "The TabbyAPI checkout (holds main.py, config.yml, api_tokens.yml)."],
        ["python", None, None,
         "Interpreter that runs TabbyAPI [default: TABBY-DIR/venv/bin/python if it exists, else this one]."],
        ["config-dir", "c", "config", "Directory of model profiles: DIR/<id>.yml, searched recursively."],
        ["unload-timer", None, 900.0,
         "Idle time before a model is unloaded, when neither the request's keep_alive nor the "
         "profile's model.unload_timer says otherwise.", _duration("unload-timer")],
        ["load-timeout", None, 600.0, "How long a model may take to load, counted from TabbyAPI's \"Loading model:\" line (and "
         "the start before that line, too), before its start is abandoned.",
         _positiveSeconds("load-timeout")],
        ["stop-grace", None, 10.0, "How long TabbyAPI has to exit after SIGTERM before SIGKILL.",
         _positiveSeconds("stop-grace")],
        ["max-waiting", None, 512, "How many requests may wait for a model; more get a 503.",
         _positiveInt("max-waiting")],
        ["max-body-size", None, DEFAULT_MAX_BODY, "Largest request body accepted, in bytes; larger gets a 413.",
         _positiveInt("max-body-size")],
        ["preload", None, None,
         "Start these models (profile ids, separated by commas) when the proxy starts; each then idles "
         "as usual."],
        ["default-model", None, None,
         "Keep these models (profile ids, separated by commas) loaded whenever there is room: they start "
         "with the proxy, and again after an idle unload when they fit beside what runs, and stay until "
         "placement needs their room for another model."],
        ["max-loaded-models", None, None,
         "How many models may run at once, whatever the memory [default: 3 per GPU when the GPUs' "
         "memory is known (nvidia-smi, --gpu-memory, --simulate-gpus), else 1: one model at a time, "
         "swapped on demand].", _positiveInt("max-loaded-models")],
        ["client-timeout", None, DEFAULT_CLIENT_TIMEOUT,
         "How long a client connection may stay silent while sending a request (a stalled body gets a 408) "
         "or between requests.", _positiveSeconds("client-timeout")],
        ["request-timeout", None, DEFAULT_REQUEST_TIMEOUT,
         "The most time a request may take to arrive, from its first byte to the end of its body, "
         "however steadily its bytes come (slower gets a 408).", _positiveSeconds("request-timeout")],
        ["max-connections", None, DEFAULT_MAX_CONNECTIONS,
         "How many client connections may be open at once; a request on one more gets a 503 and "
         "its connection is closed (lowered to what the open-file limit leaves room for).",
         _positiveInt("max-connections")],
        ["backlog", None, None,
         "Connections the kernel may queue before the proxy accepts them "
         "[default: the system's net.core.somaxconn, else 1024].", _positiveInt("backlog")],
        ["first-token-timeout", None, ReadTimeouts().firstToken,
         "How long TabbyAPI may take to send an answer's headers, and then the first piece of its body "
         "(a long prompt is read first; a non-streamed answer comes whole once generated), before the "
         "proxy ends the answer with an error.", _positiveSeconds("first-token-timeout")],
        ["chunk-timeout", None, ReadTimeouts().betweenChunks,
         "How long TabbyAPI may stay silent between two pieces of an answer before the proxy ends it "
         "with an error.", _positiveSeconds("chunk-timeout")],
        ["health-interval", None, ChildSettings().hangInterval,
         "While a model has requests in flight, how often its TabbyAPI's /health is asked, to find out "
         "whether it hangs.", _positiveSeconds("health-interval")],
        ["hang-timeout", None, ChildSettings().hangTimeout,
         "How long that /health may go unanswered before TabbyAPI is judged hung: its requests end with "
         "an error, it is killed, and the next request starts a fresh one.", _positiveSeconds("hang-timeout")],
        ["keep-request-bodies", None, 0,
         "Keep the prompt text of the last N requests for the dashboard's request list (prompts are "
         "private: none are kept by default).", _keptBodies],
        ["gpu-memory", None, None,
         "The GPUs' memory as INDEX=SIZE pairs (0=24GiB,1=24GiB), for a machine whose nvidia-smi the "
         "proxy cannot run [default: nvidia-smi's figures when it is on PATH].", parseGpuMemory],
        ["simulate-gpus", None, None,
         "With --simulate: pretend to have COUNT GPUs of SIZE each (2x24GiB), so that several "
         "models run at once.", parseSimulatedGpus],
    ]
    optFlags = [
        ["simulate", None,
         "Run the bundled TabbyAPI simulator instead of TabbyAPI (no GPU needed); auth is off."],
        ["simulate-auth", None, "With --simulate: turn auth on, with keys in the private directory's api_tokens.yml."],
        ["open-model-list", None,
         "Let /api/tags, /api/show and /v1/models answer without a key (VS Code Copilot's Ollama provider "
         "sends none): anyone who can reach the proxy then sees the profiles' names and details, but "
         "still cannot generate or load a model."],
    ]

    catalog: Catalog
    install: TabbyInstall | None
    # Whether reading the options may create files (a missing api_tokens.yml, as TabbyAPI would).
    createsFiles = True

    def __init__(self) -> None:
        super().__init__()
        self["cors-origin"] = []
        # usage takes an opt_ method's docstring as it is, its indentation included.
        self.docs["cors-origin"] = " ".join(self.docs["cors-origin"].split()) + " [default: local pages only]"

    def opt_cors_origin(self, origin: str) -> None:
        """
        Also let browser pages from ORIGIN (e.g. https://chat.example.org, or http://*.lan:8080
        with one * as a wildcard) call the proxy; repeat for more, or give * for any page.
        Pages on localhost, 127.0.0.1, [::1], app://, file://, vscode-webview:// and browser
        extensions are always allowed; any other origin gets a 403.
        """
        origin = origin.strip().rstrip("/")
        if origin != "*" and "://" not in origin:
            raise usage.UsageError(f"--cors-origin {origin!r}: give an origin such as https://chat.example.org, or *")
        self["cors-origin"].append(origin)

    def _profileIds(self, option: str) -> tuple[str, ...]:
        """
        The profile ids an option lists, separated by commas, each checked against the catalog.
        """
        if self[option] is None:
            return ()
        ids = tuple(dict.fromkeys(part.strip() for part in self[option].split(",") if part.strip()))
        for profileId in ids:
            if self.catalog.resolve(profileId) is None:
                raise usage.UsageError(
                    f"--{option} {profileId}: no such profile in {self['config-dir']} "
                    f"(there are: {', '.join(sorted(self.catalog.profiles))})"
                )
        return ids

    def postOptions(self) -> None:
        try:
            self.catalog = Catalog.load(Path(self["config-dir"]))
        except ConfigError as e:
            raise usage.UsageError(str(e)) from e
        if not self.catalog.profiles:
            raise usage.UsageError(f"{self['config-dir']}: no model profiles (*.yml) found")
        for option in ("preload", "default-model"):
            self[option] = self._profileIds(option)
        both = set(self["preload"]) & set(self["default-model"])
        if both:
            raise usage.UsageError(f"{', '.join(sorted(both))}: give a model to --default-model (which loads it at "
                                   "start) or to --preload, not to both")
        if self["simulate-auth"] and not self["simulate"]:
            raise usage.UsageError("--simulate-auth only makes sense with --simulate")
        if self["simulate-gpus"] is not None and not self["simulate"]:
            raise usage.UsageError("--simulate-gpus only makes sense with --simulate; give real GPUs' sizes with --gpu-memory")
        if self["simulate-gpus"] is not None and self["gpu-memory"] is not None:
            raise usage.UsageError("give either --simulate-gpus or --gpu-memory, not both")
        if self["simulate"]:
            if self["tabby-dir"]:
                raise usage.UsageError("give either --tabby-dir or --simulate, not both")
            self.install = None
            return
        if not self["tabby-dir"]:
            raise usage.UsageError(
                "--tabby-dir is required (the TabbyAPI checkout), or --simulate to try the proxy without one"
            )
        try:
            self.install = TabbyInstall.fromCheckout(Path(self["tabby-dir"]).absolute(), self["python"],
                                                     createKeys=self.createsFiles)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from e


class _RuntimeDirectory(Service):
    """
    The private directory (mode 0700) for generated TabbyAPI configs (and the simulator's working
    directory), removed when the proxy stops, once the scheduler's child, which reads them, has
    exited.
    """

    def __init__(self, path: Path, scheduler: Scheduler) -> None:
        self.path = path
        self.scheduler = scheduler

    def stopService(self) -> Deferred[None]:
        super().stopService()

        def remove(result: None) -> None:
            shutil.rmtree(self.path, ignore_errors=True)

        return self.scheduler.whenStopped().addCallback(remove)


class _ProxyService(MultiService):
    """
    The proxy's services.  A start that fails (a busy C{--listen} port fails the privileged
    start, before any service runs) removes the private runtime directory, as a stop does.

    @ivar logObserver: the observer twistd is to log to, given to twistd's application as its
        C{ILogObserver} (which twistd takes when no C{--logger} is given), or C{None} to leave
        twistd's own choice alone.
    """

    def __init__(self, runtime: Path, logObserver: ILogObserver | None = None) -> None:
        super().__init__()
        self.runtime = runtime
        self.logObserver = logObserver

    def setServiceParent(self, parent: IServiceCollection) -> None:
        if self.logObserver is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.logObserver)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except BaseException:
            shutil.rmtree(self.runtime, ignore_errors=True)
            raise


class _Preload(Service):
    """
    Loads a model when the proxy starts (C{--preload}, C{--default-model}).
    """

    def __init__(
        self, scheduler: Scheduler, profileId: str, profiles: ProfileReloader, keepAlive: float | None
    ) -> None:
        self.scheduler = scheduler
        self.profileId = profileId
        self.profiles = profiles
        self.keepAlive = keepAlive

    def startService(self) -> None:
        super().startService()
        profile = self.profiles.catalog.resolve(self.profileId)
        if profile is not None:
            self.scheduler.preload(profile, self.keepAlive)


class _ConnectionPool(Service):
    """
    Closes the persistent connections to TabbyAPI when the proxy stops.
    """

    def __init__(self, agent: RelayAgent) -> None:
        self.agent = agent

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.agent.closeCachedConnections()


class _CollectorThreshold(Service):
    """
    Runs CPython's cyclic garbage collector less often, and over less, while the proxy serves.
    A request leaves no cyclic garbage (the route tables, the relay's client and its chunked
    decoder see to that), but at the default threshold of 700 allocations the objects of the
    requests in flight set off a young collection every few requests, and, promoted by them, a
    collection of the whole heap every few thousand: about 7% of the proxy's time on small
    requests.  With C{YOUNG_THRESHOLD}, a young collection comes only when that many objects
    outlive their request; cyclic garbage, where some is made, still goes within that many
    allocations.  What exists when the proxy starts (its modules and their objects, most of the
    heap) lives as long as it does, and is frozen out of the collections (C{gc.freeze}): after a
    burst of streams, a collection of the whole heap walked all of it, a pause of tens of
    milliseconds in which 64 streams opened at once waited for their first byte.
    """

    YOUNG_THRESHOLD = 2000

    def __init__(self) -> None:
        self._before = gc.get_threshold()

    def startService(self) -> None:
        super().startService()
        self._before = gc.get_threshold()
        gc.set_threshold(max(self.YOUNG_THRESHOLD, self._before[0]), *self._before[1:])
        gc.freeze()

    def stopService(self) -> None:
        super().stopService()
        gc.unfreeze()
        gc.set_threshold(*self._before)


@implementer(IStreamServerEndpoint)
class _Announced:
    """
    The listening endpoint, which says once it listens where the proxy is and how to try it:
    the address, the dashboard's URL, one C{curl}, and with C{--simulate-auth} the file that
    holds the simulator's keys (never the keys).
    """

    def __init__(self, endpoint: IStreamServerEndpoint, model: str, auth: bool, keysFile: Path | None) -> None:
        self.endpoint = endpoint
        self.model = model
        self.auth = auth
        self.keysFile = keysFile

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        listening: Deferred[IListeningPort] = self.endpoint.listen(factory)
        return listening.addCallback(self._announce)

    def _announce(self, port: IListeningPort) -> IListeningPort:
        address = port.getHost()
        if not isinstance(address, (IPv4Address, IPv6Address)):
            log.info("tabbyproxy listens on {address}", address=str(address))
            return port
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
        url = f"http://[{host}]:{address.port}" if ":" in host else f"http://{host}:{address.port}"
        log.info("tabbyproxy listens on {url}", url=url)
        log.info("Dashboard: {url}/ui/", url=url)
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": "Hello"}]})
        key = ' -H "Authorization: Bearer $KEY"' if self.auth else ""
        log.info("Try: {command}",
                 command=f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{key} -d '{body}'")
        if self.keysFile is not None:
            log.info("The simulator's keys (KEY above) are in {path}", path=str(self.keysFile))
        return port


def _connectionCap(asked: int) -> int:
    """
    Raise the open-file limit as far as it goes, and say how many client connections it leaves
    room for: C{asked}, or fewer where the limit is lower.
    """
    files = raiseFileLimit()
    log.info("Open files: the limit is {soft} (it was {before}; hard limit {hard})",
             soft=files.soft, before=files.before, hard=files.hard)
    room = connectionRoom(files)
    if room is not None and room < asked:
        log.warn("--max-connections {asked} is over what the open-file limit {soft} leaves room for: "
                 "{room} connections at most (raise LimitNOFILE= or ulimit -n)",
                 asked=asked, soft=files.soft, room=room)
        return room
    return asked


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    # Under twistd (whose options parsed these), its log file is written by a cheaper observer.
    twistdOptions = getattr(options, "parent", None)
    logObserver = twistdLogObserver(twistdOptions, reactor) if twistdOptions is not None else None
    runtime = Path(tempfile.mkdtemp(prefix="tabbyproxy-"))
    try:
        return _buildService(options, reactor, runtime, logObserver)
    except BaseException:
        # Nothing will stop a service that was never returned: its directory goes now.
        shutil.rmtree(runtime, ignore_errors=True)
        raise


def _buildService(options: Options, reactor: Any, runtime: Path, logObserver: ILogObserver | None) -> IService:
    top = _ProxyService(runtime, logObserver)

    install = options.install
    if install is None:
        simulatorDirectory = runtime / "tabby"
        simulatorDirectory.mkdir(mode=0o700)
        install = simulatedInstall(simulatorDirectory, options.catalog, auth=options["simulate-auth"])

    _CollectorThreshold().setServiceParent(top)
    metrics = Metrics()
    logs = LogBuffer()
    LogBufferService(logs, globalLogPublisher).setServiceParent(top)

    missing = channel.missingHooks()
    if missing:
        log.warn("This Twisted lacks {names}: some malformed requests get Twisted's own answers",
                 names=", ".join(missing))
    agent = RelayAgent(reactor)
    _ConnectionPool(agent).setServiceParent(top)
    scheduler = Scheduler(
        install,
        reactor,
        reactor,
        agent,
        runtime,
        SchedulerSettings(
            unloadTimer=options["unload-timer"],
            maxWaiting=options["max-waiting"],
            maxLoaded=options["max-loaded-models"],
            child=ChildSettings(loadTimeout=options["load-timeout"], stopGrace=options["stop-grace"],
                                hangInterval=options["health-interval"], hangTimeout=options["hang-timeout"]),
        ),
        wrapCommand=diesWithParent,
        metrics=metrics,
        gpus=chooseProbe(options["gpu-memory"], options["simulate-gpus"], options["simulate"], reactor, os.environ),
    )
    metrics.watch(scheduler.status)
    # Stopped after the scheduler (services stop in reverse order), and waits for it.
    _RuntimeDirectory(runtime, scheduler).setServiceParent(top)
    scheduler.setServiceParent(top)

    profiles = ProfileReloader(options.catalog, Path(options["config-dir"]), scheduler, options.install is None)
    profiles.setServiceParent(top)
    defaultModels = options["default-model"]
    scheduler.defaultModels = lambda: [
        profile for profile in map(profiles.catalog.resolve, defaultModels) if profile is not None
    ]
    for profileId in defaultModels:
        _Preload(scheduler, profileId, profiles, FOREVER).setServiceParent(top)
    for profileId in options["preload"]:
        _Preload(scheduler, profileId, profiles, None).setServiceParent(top)

    currentKeys = None
    if install.keys.enabled:
        currentKeys = KeyWatcher(install.directory / "api_tokens.yml", install.keys, reactor)
        currentKeys.setServiceParent(top)
    keysNow = currentKeys if currentKeys is not None else (lambda: install.keys)
    scheduler.currentKeys = keysNow
    state = ProxyState(
        catalog=lambda: profiles.catalog,
        install=install,
        scheduler=scheduler,
        upstream=Upstream(agent, lambda: keysNow().upstreamHeaders, reactor,
                          ReadTimeouts(options["first-token-timeout"], options["chunk-timeout"])),
        currentKeys=currentKeys,
        clock=reactor,
        maxBodySize=options["max-body-size"],
        metrics=metrics,
        logs=logs,
        history=RequestHistory(keepBodies=options["keep-request-bodies"]),
        openModelList=bool(options["open-model-list"]),
    )
    site = makeSite(state, options["cors-origin"], options["client-timeout"], options["request-timeout"],
                    _connectionCap(options["max-connections"]))
    backlog = options["backlog"] if options["backlog"] is not None else systemBacklog()
    listening = strports.service(withBacklog(options["listen"], backlog), site, reactor=reactor)
    firstProfile = min(options.catalog.profiles)
    keysFile = install.directory / "api_tokens.yml" if options["simulate-auth"] else None
    listening.endpoint = _Announced(listening.endpoint, firstProfile, install.keys.enabled, keysFile)
    listening.setServiceParent(top)
    return top
