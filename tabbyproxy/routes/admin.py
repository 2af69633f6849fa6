"""
The proxy's own routes: C{/status} (what runs and why), C{/unload} (stop the model now),
C{/health} (the proxy itself answers), C{/metrics} (Prometheus), C{/logs} and C{/logs/stream}
(the recent and the live log, the proxy's and TabbyAPI's), and C{/}, which answers as Ollama's
root does so Ollama clients find the server.

With auth on, C{/status} without the admin key shows what a dashboard needs (models, states,
timers, counts) and leaves out what only helps someone attack or debug the child: its port, its
pid, and the last error with TabbyAPI's output.

A C{/logs/stream} client costs the proxy a bounded amount of memory, however slowly it reads:
while its connection takes no more (the transport paused it), at most L{MAX_PENDING_LINES} lines
wait, the oldest dropped first, and on resume one line says how many were dropped.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Callable

from attrs import define
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.web.iweb import IRequest
from zope.interface import implementer

from tabbyproxy import __version__
from tabbyproxy.auth import Permission, permissionOf
from tabbyproxy.keepalive import FOREVER
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

LogFilter = Callable[[Record], bool]

# How many lines wait for a /logs/stream client whose connection is full.
MAX_PENDING_LINES = 1000


def _logEvent(record: Record) -> bytes:
    return b"data: " + json.dumps(record, separators=(",", ":")).encode("utf-8") + b"\n\n"


@implementer(IPushProducer)
class LogFollower:
    """
    One C{/logs/stream} client, registered as its request's producer: each record it wants is
    written at once while the connection takes it.  While the transport has paused it, at most
    C{maxPending} records wait (the oldest dropped, and counted); on resume the client gets a
    line saying how many were dropped, then the records that waited.
    """

    def __init__(self, request: IRequest, wanted: LogFilter, maxPending: int = MAX_PENDING_LINES) -> None:
        self.request = request
        self.wanted = wanted
        self.paused = False
        self.closed = False
        self.pending: deque[Record] = deque(maxlen=maxPending)
        self.dropped = 0
        self._lastDropped: Record | None = None

    def __call__(self, record: Record) -> None:
        if self.closed or not self.wanted(record):
            return
        if not self.paused:
            self.request.write(_logEvent(record))
            return
        if len(self.pending) == self.pending.maxlen:
            self._lastDropped = self.pending[0]
            self.dropped += 1
        self.pending.append(record)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.closed:
            return
        events = []
        if self._lastDropped is not None:
            events.append(_logEvent({
                "time": self._lastDropped["time"], "level": "warn", "source": "proxy",
                "text": f"{self.dropped} log lines dropped: this stream was read more slowly than the log grew",
                "dropped": self.dropped,
            }))
            self.dropped, self._lastDropped = 0, None
        events.extend(map(_logEvent, self.pending))
        self.pending.clear()
        if events:
            self.request.write(b"".join(events))

    def stopProducing(self) -> None:
        self.closed = True
        self.pending.clear()


@define
class AdminRoutes:
    """
    The routes outside C{/v1} and C{/api}.  Errors are C{{"error": "..."}}.
    """

    app = RouteTable()
    registerErrorAnswers(app, PLAIN)

    state: ProxyState

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"Ollama is running"

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: IRequest) -> bytes:
        return writeJSON(request, 200, {"status": "ok"})

    @app.route("/status", methods=["GET"])
    def status(self, request: IRequest) -> bytes:
        scheduler = self.state.scheduler
        document: dict[str, Any] = scheduler.status()
        profiles = sorted(self.state.catalog(), key=lambda profile: profile.id)
        document["models"] = [profile.id for profile in profiles]
        defaults = [profile.id for profile in scheduler.defaultModels()]
        document["default_model"] = defaults[0] if defaults else None
        document["default_models"] = defaults
        document["profiles"] = [
            {
                "id": profile.id,
                "model_name": profile.modelName,
                "loaded": scheduler.runningModel(profile.id) is not None,
                "unload_timer_seconds": None if profile.unloadTimer in (None, FOREVER) else profile.unloadTimer,
                "unload_never": profile.unloadTimer == FOREVER,
            }
            for profile in profiles
        ]
        document["version"] = __version__
        if permissionOf(request, self.state.keys) is not Permission.ADMIN:
            document = forDashboards(document)
        return writeJSON(request, 200, document)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.state.metrics.registry)

    @app.route("/logs", methods=["GET"])
    def logs(self, request: IRequest) -> bytes:
        self.state.requireKey(request, Permission.ADMIN)
        wanted = _logFilter(request)
        return writeJSON(request, 200, {"logs": [record for record in self.state.logs if wanted(record)]})

    @app.route("/logs/stream", methods=["GET"])
    async def logStream(self, request: IRequest) -> bytes | None:
        """
        The log as server-sent events, one record per event: the recent lines first (unless
        C{?no-history}), then each new line as it happens, until the client leaves.
        """
        self.state.requireKey(request, Permission.ADMIN)
        follower = LogFollower(request, _logFilter(request))
        startEventStream(request)
        with producing(request, follower):
            try:
                if not queryFlag(request, b"no-history"):
                    for record in self.state.logs:
                        follower(record)
                # Comments make the headers go out now, so a client sees the stream has started.
                request.write(b": live\n\n")
                unsubscribe = self.state.logs.subscribe(follower)
                try:
                    await Deferred()  # Until the client leaves, which cancels this route.
                finally:
                    unsubscribe()
            finally:
                follower.stopProducing()
        return None

    # POST only: a page cannot make a browser POST without an Origin (which the browser policy
    # checks), while an <img> or a link makes a GET from any page.
    @app.route("/unload", methods=["POST"])
    async def unload(self, request: IRequest) -> bytes:
        """
        Stop every model, or the one a C{{"model": ID}} body or C{?model=ID} names, once their
        requests in flight are done; answered when they have exited, with the ids unloaded.
        """
        self.state.requireKey(request, Permission.ADMIN)
        scheduler = self.state.scheduler
        modelId = self._unloadTarget(request)
        if modelId is None:
            unloaded = [running.profile.id for running in scheduler.snapshot()]
        else:
            unloaded = [modelId] if scheduler.runningModel(modelId) is not None else []
        await scheduler.unload(modelId)
        return writeJSON(request, 200, {"status": "success", "unloaded": sorted(unloaded)})

    def _unloadTarget(self, request: IRequest) -> str | None:
        """
        The profile id C{/unload} names, or C{None} for all; an unknown name is a 404.
        """
        values = request.args.get(b"model")
        name: object = values[0].decode("utf-8", "replace") if values else None
        # No body, or a JSON null (what some clients send for "no body"), means every model.
        if name is None and request.content is not None and request.content.read(5).strip() not in (b"", b"null"):
            name = readJSONObject(request, self.state.maxBodySize).get("model")
        if name is None:
            return None
        profile = self.state.catalog().resolve(name) if isinstance(name, str) else None
        if profile is None:
            raise ClientError(404, f"model {json.dumps(name)} not found: GET /status lists the profiles")
        return profile.id


def _logFilter(request: IRequest) -> LogFilter:
    """
    Which records a C{/logs} request wants: C{?source=tabby|proxy}, C{?model=ID}, C{?level=NAME}.
    """
    criteria: dict[str, str] = {}
    for name in ("source", "model", "level"):
        values = request.args.get(name.encode("ascii"))
        if values:
            criteria[name] = values[0].decode("utf-8", "replace")
    if criteria.get("source") not in (None, "tabby", "proxy"):
        raise ClientError(400, "source must be tabby or proxy")
    return lambda record: all(record.get(name) == value for name, value in criteria.items())
