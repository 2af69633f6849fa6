"""
The dashboard at C{/ui/}: the page's static files (HTML, CSS and a few ES modules, read once from
the package, sent with an ETag and revalidated on each load, so an upgrade shows at once), the
small JSON API it uses (C{/ui/api/session}, C{/ui/api/models}, C{/ui/api/requests},
C{/ui/api/load}, C{/ui/api/unload}), and C{/events}: the live stream of what changes, as
server-sent events, which tests and other tools can read on their own.

C{/events} sends C{hello} (what the key may do), then C{models} (every profile with its state)
each time that changes, and for the admin key also C{requests} and C{request} (the request
history, then each new request) and, with C{?logs}, C{logs} and C{log} (the recent log, then each
new line).  Each viewer has a bounded memory: while its connection does not take more (the
transport paused it), model snapshots are coalesced to the latest and at most L{MAX_QUEUED} other
events wait, the oldest dropped first and counted in a C{dropped} event; and events go out in
batches, every L{BATCH_SECONDS}, so an open dashboard costs a busy proxy little per request.

Nothing here is on the relay's path: the only cost a request pays is its history record, made
once it has ended.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from datetime import datetime, timezone
from importlib import resources
from typing import Any, Callable

from attrs import Factory, define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from tabbyproxy import __version__
from tabbyproxy.auth import Permission, permissionOf, presentedKey
from tabbyproxy.config import Profile
from tabbyproxy.history import RequestRecord
from tabbyproxy.logbuffer import Record
from tabbyproxy.routes.common import (
    PLAIN,
    ClientError,
    ProxyState,
    RouteTable,
    forDashboards,
    producing,
    queryFlag,
    readJSONObject,
    registerErrorAnswers,
    writeJSON,
)
from tabbyproxy.routes.loading import startEventStream

# How many events (but model snapshots) wait for a viewer whose connection is full.
MAX_QUEUED = 256

# How long events wait to go out together to a viewer.
BATCH_SECONDS = 0.1

_CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
}

# The page loads nothing from anywhere else, runs no inline script, and is never framed.
_PAGE_HEADERS = {
    b"Content-Security-Policy": b"default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"X-Frame-Options": b"DENY",
}

_PERMISSION_NAMES = {Permission.NONE: "none", Permission.API: "api", Permission.ADMIN: "admin"}


@frozen
class StaticFile:
    body: bytes
    contentType: bytes
    etag: bytes


def loadStatic() -> dict[str, StaticFile]:
    """
    The dashboard's files from the package's C{ui} folder, by name; read once, they are small.
    """
    files: dict[str, StaticFile] = {}
    for entry in resources.files("tabbyproxy").joinpath("ui").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if not entry.is_file() or suffix not in _CONTENT_TYPES:
            continue
        body = entry.read_bytes()
        etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode("ascii") + b'"'
        files[entry.name] = StaticFile(body, _CONTENT_TYPES[suffix], etag)
    return files


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


def modelsSnapshot(state: ProxyState) -> dict[str, Any]:
    """
    Every profile with its state, as the dashboard shows it: one row per profile, whether it
    runs or not, with what the scheduler knows of its child, and the GPUs.
    """
    status = state.scheduler.status()
    children = {child["model"]: child for child in status["children"]}
    rows = [_row(profile, children.get(profile.id), state.clock.seconds())
            for profile in sorted(state.catalog(), key=lambda p: p.id)]
    return {
        "models": rows,
        "waiting": status["waiting"],
        "last_error": status["last_error"],
        "starts": status["starts"],
        "gpus": status["gpus"],
    }


def _row(profile: Profile, child: dict[str, Any] | None, now: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": profile.id,
        "model_name": profile.modelName,
        "state": "stopped",
        "waiting": 0,
        "in_flight": 0,
        "started_at": None,
        "ready_at": None,
        "pid": None,
        "unload": None,
        "gpus": [],
        "gpu_memory": None,
        "last_error": None,
    }
    if child is not None:
        for name in ("state", "waiting", "in_flight", "started_at", "ready_at", "pid", "gpus", "last_error"):
            row[name] = child[name]
        accounted = child["memory"]["accounted"]
        if accounted:
            row["gpu_memory"] = {"by_gpu": accounted, "total": sum(accounted.values()),
                                 "measured": child["memory"]["measured"] is not None}
        unload = child["unload"]
        # The page counts the time left down itself: the snapshot holds when the timer fires,
        # to the second, so that it changes only when the timer does.
        firesIn = unload["fires_in_seconds"]
        row["unload"] = {
            "keep_alive": unload["keep_alive"],
            "keep_alive_seconds": unload["keep_alive_seconds"],
            "fires_at": None if firesIn is None else _iso(round(now + firesIn)),
        }
    return row


def sseFrame(kind: str, document: object) -> bytes:
    return (f"event: {kind}\ndata: ".encode("ascii") + json.dumps(document, separators=(",", ":")).encode("utf-8")
            + b"\n\n")


@implementer(IPushProducer)
class EventViewer:
    """
    One C{/events} connection, with backpressure and batching.  Events wait in the viewer and
    go out together every L{BATCH_SECONDS} (one write for many log lines and requests, so a busy
    proxy pays little per request for an open dashboard).  Registered as the request's producer,
    the viewer is paused when the connection's buffer is full: meanwhile C{models} snapshots
    replace one another and at most C{maxQueued} other events wait (the oldest dropped, and
    counted); on resume the viewer gets the count of what it missed, the events that waited, and
    the latest snapshot.
    """

    def __init__(self, request: IRequest, clock: IReactorTime, admin: bool, logs: bool,
                 maxQueued: int = MAX_QUEUED) -> None:
        self.request = request
        self.clock = clock
        self.admin = admin
        self.logs = logs
        self.paused = False
        self.closed = False
        self.dropped = 0
        self.queued: deque[bytes] = deque(maxlen=maxQueued)
        self.latest: dict[str, bytes] = {}
        self._flushCall: IDelayedCall | None = None

    def send(self, kind: str, document: object, coalesce: bool = False) -> None:
        if self.closed:
            return
        frame = sseFrame(kind, document)
        if coalesce:
            self.latest[kind] = frame
        else:
            if len(self.queued) == self.queued.maxlen:
                self.dropped += 1
            self.queued.append(frame)
        if not self.paused and self._flushCall is None:
            self._flushCall = self.clock.callLater(BATCH_SECONDS, self.flush)

    def flush(self) -> None:
        """
        Write what waits, in one write, unless the connection is full.
        """
        if self._flushCall is not None:
            if self._flushCall.active():
                self._flushCall.cancel()
            self._flushCall = None
        if self.paused or self.closed:
            return
        frames = []
        if self.dropped:
            frames.append(sseFrame("dropped", {"count": self.dropped}))
            self.dropped = 0
        frames.extend(self.queued)
        frames.extend(self.latest.values())
        self.queued.clear()
        self.latest.clear()
        if frames:
            self.request.write(b"".join(frames))

    @property
    def pendingBytes(self) -> int:
        """
        What waits in this viewer's own queue (not in the connection's buffer).
        """
        return sum(map(len, self.queued)) + sum(map(len, self.latest.values()))

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.flush()

    def stopProducing(self) -> None:
        self.closed = True
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
        self.queued.clear()
        self.latest.clear()


@define
class ModelWatch:
    """
    Tells every viewer the models' state when it changes: whenever the scheduler says it may
    have (L{tabbyproxy.scheduler.Scheduler.subscribe}: a request granted, ended or queued, a child's start, readiness,
    drain, stop or exit), and after each finished request and each action of the dashboard.
    Changes that come together are sent once, a moment later; nothing is compared while nothing
    happens.
    """

    state: ProxyState
    viewers: list[EventViewer] = field(factory=list)
    last: dict[str, Any] | None = None
    _pending: IDelayedCall | None = None
    _unsubscribe: list[Callable[[], None]] = field(factory=list)

    def add(self, viewer: EventViewer) -> None:
        if not self.viewers:
            self._unsubscribe = [
                self.state.logs.subscribe(self._logged),
                self.state.history.subscribe(self._requested),
                self.state.scheduler.subscribe(self.poke),
            ]
        self.viewers.append(viewer)

    def remove(self, viewer: EventViewer) -> None:
        if viewer in self.viewers:
            self.viewers.remove(viewer)
        if not self.viewers:
            for unsubscribe in self._unsubscribe:
                unsubscribe()
            self._unsubscribe = []
            if self._pending is not None and self._pending.active():
                self._pending.cancel()
            self._pending = None

    def poke(self) -> None:
        """
        Something may have changed: compare soon, once for everything that happens meanwhile.
        """
        if self.viewers and (self._pending is None or not self._pending.active()):
            self._pending = self.state.clock.callLater(BATCH_SECONDS, self._compare)

    def _compare(self) -> None:
        self._pending = None
        before = self.last
        document = modelsSnapshot(self.state)
        if document != before:
            self.last = document
            stamped = {**document, "now": _iso(self.state.clock.seconds())}
            shown = forDashboards(stamped)
            for viewer in list(self.viewers):
                viewer.send("models", stamped if viewer.admin else shown, coalesce=True)

    def _logged(self, record: Record) -> None:
        for viewer in list(self.viewers):
            if viewer.logs:
                viewer.send("log", record)

    def _requested(self, record: RequestRecord) -> None:
        self.poke()
        document = record.toJSON()
        for viewer in list(self.viewers):
            if viewer.admin:
                viewer.send("request", document)


@define
class UIRoutes:
    """
    The dashboard's page, its JSON API, and C{/events}.  Errors are C{{"error": "..."}}.
    """

    app = RouteTable()
    registerErrorAnswers(app, PLAIN)
    log = Logger()

    state: ProxyState
    files: dict[str, StaticFile] = field(factory=loadStatic)
    watch: ModelWatch = field(default=Factory(lambda self: ModelWatch(self.state), takes_self=True))

    # -- the page

    @app.route("/ui", methods=["GET", "HEAD"])
    def toPage(self, request: IRequest) -> bytes:
        request.setResponseCode(301)
        request.setHeader(b"Location", b"/ui/")
        return b""

    @app.route("/ui/", methods=["GET", "HEAD"])
    def page(self, request: IRequest) -> bytes:
        return self._serve(request, "index.html")

    @app.route("/ui/<name>", methods=["GET", "HEAD"])
    def asset(self, request: IRequest, name: str) -> bytes:
        return self._serve(request, name)

    def _serve(self, request: IRequest, name: str) -> bytes:
        # Only the files read at start are served: no path from the request reaches the disk.
        served = self.files.get(name)
        if served is None:
            raise ClientError(404, f"no such file in the dashboard: {name}")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"ETag", served.etag)
        for header, value in _PAGE_HEADERS.items():
            request.setHeader(header, value)
        if served.etag in (request.getHeader(b"if-none-match") or b"").split(b", "):
            request.setResponseCode(304)
            return b""
        request.setHeader(b"Content-Type", served.contentType)
        return served.body

    # -- the JSON API

    @app.route("/ui/api/session", methods=["GET"])
    def session(self, request: IRequest) -> bytes:
        """
        What the request's key may do, without refusing it: the page asks before showing anything.
        """
        keys = self.state.keys
        permission = permissionOf(request, keys)
        return writeJSON(request, 200, {
            "auth": keys.enabled,
            "permission": _PERMISSION_NAMES[permission],
            "key_refused": keys.enabled and presentedKey(request) is not None and permission is Permission.NONE,
            "keep_request_bodies": self.state.history.keepBodies,
            "version": __version__,
        })

    @app.route("/ui/api/models", methods=["GET"])
    def models(self, request: IRequest) -> bytes:
        self.state.requireKey(request)
        snapshot = {**modelsSnapshot(self.state), "now": _iso(self.state.clock.seconds())}
        admin = permissionOf(request, self.state.keys) is Permission.ADMIN
        return writeJSON(request, 200, snapshot if admin else forDashboards(snapshot))

    @app.route("/ui/api/requests", methods=["GET"])
    def requests(self, request: IRequest) -> bytes:
        self.state.requireKey(request, Permission.ADMIN)
        return writeJSON(request, 200, {"requests": [record.toJSON() for record in self.state.history]})

    @app.route("/ui/api/load", methods=["POST"])
    def load(self, request: IRequest) -> bytes:
        """
        Start a model now, as C{--preload} does; answered at once, the progress is in C{/events}.
        """
        self.state.requireKey(request, Permission.ADMIN)
        profile = self._profileIn(request)
        self.log.info("Loading {model}: asked from the dashboard", model=profile.id)
        self.state.scheduler.preload(profile)
        self.watch.poke()
        return writeJSON(request, 202, {"status": "loading", "model": profile.id})

    @app.route("/ui/api/unload", methods=["POST"])
    def unload(self, request: IRequest) -> bytes:
        """
        Stop a model once its requests in flight are done; answered at once.
        """
        self.state.requireKey(request, Permission.ADMIN)
        profile = self._profileIn(request)
        if self.state.scheduler.runningModel(profile.id) is None:
            return writeJSON(request, 200, {"status": "not loaded", "model": profile.id})
        self.log.info("Unloading {model}: asked from the dashboard", model=profile.id)
        self.state.scheduler.unload(profile.id)
        self.watch.poke()
        return writeJSON(request, 202, {"status": "unloading", "model": profile.id})

    def _profileIn(self, request: IRequest) -> Profile:
        body = readJSONObject(request, self.state.maxBodySize)
        name = body.get("model")
        if not isinstance(name, str):
            raise ClientError(400, "model must be a profile id (a string)")
        profile = self.state.catalog().resolve(name)
        if profile is None:
            raise ClientError(404, f"model '{name}' not found")
        return profile

    # -- the live stream

    @app.route("/events", methods=["GET"])
    async def events(self, request: IRequest) -> None:
        """
        What changes, as server-sent events, until the client leaves (see the module's docstring).
        """
        self.state.requireKey(request)
        permission = permissionOf(request, self.state.keys)
        admin = permission is Permission.ADMIN
        viewer = EventViewer(request, self.state.clock, admin=admin, logs=admin and queryFlag(request, b"logs"))
        startEventStream(request)
        with producing(request, viewer):
            try:
                viewer.send("hello", {"permission": _PERMISSION_NAMES[permission], "version": __version__})
                snapshot = {**modelsSnapshot(self.state), "now": _iso(self.state.clock.seconds())}
                viewer.send("models", snapshot if admin else forDashboards(snapshot), coalesce=True)
                if admin:
                    viewer.send("requests", [record.toJSON() for record in self.state.history])
                if viewer.logs:
                    viewer.send("logs", list(self.state.logs))
                viewer.flush()
                self.watch.add(viewer)
                try:
                    await Deferred()  # Until the client leaves, which cancels this route.
                finally:
                    self.watch.remove(viewer)
            finally:
                viewer.stopProducing()
