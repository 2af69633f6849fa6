"""
The dashboard's routes in memory: its files with their cache headers, what a key may do, the
model list, load and unload, the C{/events} stream, and the backpressure of one viewer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from treq import content
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.config import Keys
from twisted.internet.task import Clock

from tabbyproxy.routes.ui import BATCH_SECONDS, MAX_QUEUED, EventViewer, loadStatic
from tests.support.fakes import InMemoryProxy
from tests.support.wire import StreamedBody

PROFILES: dict[str, dict[str, Any]] = {
    "alpha": {"model": {"model_name": "Alpha", "unload_timer": 60}},
    "coding/beta": {"model": {"model_name": "Beta"}},
}
KEYS = Keys(enabled=True, apiKeys=("api-key",), adminKey="admin-key")
ADMIN = {"x-admin-key": "admin-key"}
API = {"Authorization": "Bearer api-key"}


def parseEvents(raw: bytes) -> list[tuple[str, Any]]:
    """
    The (event, data) pairs of a server-sent event stream.
    """
    events = []
    for block in raw.decode("utf-8").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


class _Base(SynchronousTestCase):
    keys = Keys(enabled=False)

    def setUp(self) -> None:
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES, keys=self.keys)

    def get(self, path: str, headers: dict[str, str] | None = None) -> Any:
        return self.successResultOf(self.proxy.client.get("http://localhost" + path, headers=headers or {}))

    def post(self, path: str, body: object, headers: dict[str, str] | None = None) -> Any:
        return self.successResultOf(self.proxy.client.post(
            "http://localhost" + path, data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})}))

    def jsonOf(self, response: Any) -> Any:
        return json.loads(self.successResultOf(content(response)))

    def startEvents(self, path: str = "/events", headers: dict[str, str] | None = None) -> list[bytes]:
        d = self.proxy.client.get("http://localhost" + path, headers=headers or {}, unbuffered=True)
        self.proxy.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
        body = StreamedBody.of(response)
        self.proxy.flush()

        def leave() -> None:
            body.hangUp()
            self.proxy.flush()
            # The stream never ends by itself: the client cut it.
            self.failureResultOf(body.ended)

        self.addCleanup(leave)
        return body.chunks


class PageTests(_Base):
    def test_pageServedWithCacheHeaders(self) -> None:
        """
        C{/ui/} is the dashboard's HTML with an ETag, revalidated on each load
        (C{Cache-Control: no-cache}), a strict content security policy, and no framing.
        """
        response = self.get("/ui/")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-cache"])
        self.assertIn("default-src 'self'", response.headers.getRawHeaders("content-security-policy")[0])
        self.assertEqual(response.headers.getRawHeaders("x-frame-options"), ["DENY"])
        self.assertIn(b"<!doctype html>", self.successResultOf(content(response)).lower())

    def test_unchangedFileAnswers304(self) -> None:
        """
        A browser that has the file (its ETag in C{If-None-Match}) gets a 304 with no body.
        """
        etag = self.get("/ui/app.js").headers.getRawHeaders("etag")[0]
        response = self.get("/ui/app.js", {"If-None-Match": etag})
        self.assertEqual(response.code, 304)
        self.assertEqual(self.successResultOf(content(response)), b"")

    def test_everyFileHasItsType(self) -> None:
        """
        Each packaged file is served with its content type; the page's modules are JavaScript.
        """
        files = loadStatic()
        self.assertIn("index.html", files)
        self.assertIn("app.js", files)
        self.assertIn("style.css", files)
        response = self.get("/ui/app.js")
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/javascript; charset=utf-8"])

    def test_unknownFileIs404InJSON(self) -> None:
        """
        A name that is not one of the dashboard's files is a JSON 404; nothing is read from disk.
        """
        for path in ("/ui/nope.js", "/ui/..%2fsetup.cfg", "/ui/%2e%2e/tap.py"):
            response = self.get(path)
            self.assertEqual(response.code, 404, path)
            self.assertIn("error", self.jsonOf(response))

    def test_uiWithoutSlashRedirects(self) -> None:
        """
        C{/ui} sends the browser to C{/ui/}, so the page's relative links work.
        """
        response = self.successResultOf(self.proxy.client.get("http://localhost/ui", allow_redirects=False))
        self.assertEqual((response.code, response.headers.getRawHeaders("location")), (301, ["/ui/"]))

    def test_rootSendsBrowsersToTheDashboard(self) -> None:
        """
        C{GET /} from a browser (it accepts HTML) redirects to the dashboard; any other client
        gets Ollama's C{Ollama is running}.
        """
        browser = self.successResultOf(self.proxy.client.get(
            "http://localhost/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}, allow_redirects=False))
        self.assertEqual((browser.code, browser.headers.getRawHeaders("location")), (302, ["/ui/"]))
        for accept in ("*/*", None):
            response = self.get("/", {"Accept": accept} if accept else {})
            self.assertEqual(self.successResultOf(content(response)), b"Ollama is running")


class ModelTests(_Base):
    def test_everyProfileListedStopped(self) -> None:
        """
        C{/ui/api/models} lists every profile, sorted, each stopped before anything ran.
        """
        document = self.jsonOf(self.get("/ui/api/models"))
        self.assertEqual([(m["id"], m["state"], m["model_name"]) for m in document["models"]],
                         [("alpha", "stopped", "Alpha"), ("coding/beta", "stopped", "Beta")])
        self.assertEqual(document["waiting"], 0)

    def test_loadThenUnload(self) -> None:
        """
        C{POST /ui/api/load} starts the model at once (202) and it becomes ready; C{POST
        /ui/api/unload} stops it, and the list shows it stopped again.
        """
        self.proxy.tabby.healthy = False
        response = self.post("/ui/api/load", {"model": "alpha"})
        self.assertEqual((response.code, self.jsonOf(response)), (202, {"status": "loading", "model": "alpha"}))
        [process] = self.proxy.reactor.spawned
        self.assertEqual(self.jsonOf(self.get("/ui/api/models"))["models"][0]["state"], "starting")
        self.proxy.tabby.healthy = True
        self.proxy.reactor.advance(1)
        self.proxy.flush()
        alpha = self.jsonOf(self.get("/ui/api/models"))["models"][0]
        self.assertEqual(alpha["state"], "ready")
        self.assertEqual(alpha["unload"]["keep_alive_seconds"], 60)
        response = self.post("/ui/api/unload", {"model": "alpha"})
        self.assertEqual(response.code, 202)
        process.exit(0)
        self.assertEqual(self.jsonOf(self.get("/ui/api/models"))["models"][0]["state"], "stopped")

    def test_unloadOfAModelNotLoaded(self) -> None:
        """
        Unloading a model that does not run changes nothing and says so.
        """
        response = self.post("/ui/api/unload", {"model": "coding/beta"})
        self.assertEqual((response.code, self.jsonOf(response)["status"]), (200, "not loaded"))
        self.assertEqual(self.proxy.reactor.spawned, [])

    def test_badLoadRequests(self) -> None:
        """
        A load without a model id, or with an unknown one, is refused in the admin routes' shape.
        """
        response = self.post("/ui/api/load", {"model": 3})
        self.assertEqual((response.code, self.jsonOf(response)), (400, {"error": "model must be a profile id (a string)"}))
        response = self.post("/ui/api/load", {"model": "nope"})
        self.assertEqual((response.code, self.jsonOf(response)), (404, {"error": "model 'nope' not found"}))
        self.assertEqual(self.proxy.reactor.spawned, [])


class EventsTests(_Base):
    def test_helloAndModelsFirst(self) -> None:
        """
        C{/events} starts with C{hello} (what the key may do), the models' state, and for the
        admin (everyone, with auth off) the request history; C{?logs} adds the recent log.
        """
        self.proxy.state.logs.subscribe(lambda record: None)
        received = self.startEvents("/events?logs")
        kinds = [kind for kind, _ in parseEvents(b"".join(received))]
        self.assertEqual(kinds, ["hello", "requests", "logs", "models"])
        hello = parseEvents(b"".join(received))[0][1]
        self.assertEqual(hello["permission"], "admin")

    def test_stateChangesArriveLive(self) -> None:
        """
        A load shows in the stream as the model going starting, then ready; a finished request
        arrives as a C{request} event.
        """
        self.proxy.tabby.healthy = False
        received = self.startEvents()
        del received[:]
        self.post("/ui/api/load", {"model": "alpha"})
        for _ in range(2):
            self.proxy.reactor.advance(BATCH_SECONDS)
            self.proxy.flush()
        self.proxy.tabby.healthy = True
        for _ in range(3):
            self.proxy.reactor.advance(BATCH_SECONDS)
            self.proxy.flush()
        states = [data["models"][0]["state"] for kind, data in parseEvents(b"".join(received)) if kind == "models"]
        self.assertEqual(states, ["starting", "ready"])
        self.post("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]})
        self.proxy.reactor.advance(BATCH_SECONDS)
        self.proxy.flush()
        requests = [data for kind, data in parseEvents(b"".join(received)) if kind == "request"]
        self.assertEqual([(r["route"], r["model"], r["status"]) for r in requests],
                         [("/v1/chat/completions", "alpha", 200)])

    def test_viewerLeavingUnsubscribes(self) -> None:
        """
        Once the last viewer leaves, nothing more is watched: no subscriber, no timer.
        """
        d = self.proxy.client.get("http://localhost/events", unbuffered=True)
        self.proxy.flush()
        response = self.successResultOf(d)
        body = StreamedBody.of(response)
        body.hangUp()
        self.proxy.flush()
        self.proxy.flush()
        self.failureResultOf(body.ended)
        # A change of the scheduler's state is compared for nobody: no timer but the scheduler's own.
        self.successResultOf(self.proxy.scheduler.acquire(self.proxy.catalog.profiles["alpha"])).release()
        self.assertEqual([call for call in self.proxy.reactor.getDelayedCalls()
                          if getattr(getattr(call, "func", None), "__name__", "") == "_compare"], [])

    def test_requestStartShowsWithoutPolling(self) -> None:
        """
        A request granted by a ready model shows as in flight at once (the scheduler tells the
        dashboard; nothing is polled), and as done when it ends; nothing is sent while nothing
        changes.
        """
        lease = self.successResultOf(self.proxy.scheduler.acquire(self.proxy.catalog.profiles["alpha"]))
        lease.release()
        received = self.startEvents()
        del received[:]
        self.proxy.reactor.advance(5)
        self.proxy.flush()
        self.assertEqual(received, [])
        lease = self.successResultOf(self.proxy.scheduler.acquire(self.proxy.catalog.profiles["alpha"]))
        self.proxy.reactor.advance(BATCH_SECONDS)
        self.proxy.flush()
        lease.release()
        for _ in range(2):
            self.proxy.reactor.advance(BATCH_SECONDS)
            self.proxy.flush()
        flights = [data["models"][0]["in_flight"] for kind, data in parseEvents(b"".join(received)) if kind == "models"]
        self.assertEqual(flights, [1, 0])


class AuthTests(_Base):
    keys = KEYS

    def test_sessionSaysWhatAKeyMayDo(self) -> None:
        """
        C{/ui/api/session} answers without refusing: no key, a wrong key (refused), an API key,
        the admin key.
        """
        cases = [({}, "none", False), ({"x-api-key": "wrong"}, "none", True), (API, "api", False),
                 (ADMIN, "admin", False)]
        for headers, permission, refused in cases:
            document = self.jsonOf(self.get("/ui/api/session", headers))
            self.assertEqual((document["auth"], document["permission"], document["key_refused"]),
                             (True, permission, refused), headers)

    def test_pageNeedsNoKey(self) -> None:
        """
        The page itself loads without a key (it asks for one); the data does not.
        """
        self.assertEqual(self.get("/ui/").code, 200)
        self.assertEqual(self.get("/ui/api/models").code, 401)
        self.assertEqual(self.get("/events").code, 401)
        self.assertEqual(self.get("/ui/api/models", API).code, 200)

    def test_actionsAndHistoryNeedTheAdminKey(self) -> None:
        """
        Load, unload and the request history refuse an API key; the admin key opens them.
        """
        for path in ("/ui/api/load", "/ui/api/unload"):
            response = self.post(path, {"model": "alpha"}, API)
            self.assertEqual((response.code, self.jsonOf(response)), (401, {"error": "this route needs the admin key"}))
        self.assertEqual(self.get("/ui/api/requests", API).code, 401)
        self.assertEqual(self.get("/ui/api/requests", ADMIN).code, 200)
        self.assertEqual(self.proxy.reactor.spawned, [])

    def test_apiKeySeesNoInternals(self) -> None:
        """
        With an API key, the models (C{/ui/api/models} and C{/events}) carry no pid and no last
        error with TabbyAPI's output, as C{/status} without the admin key; the admin key sees them.
        """
        self.proxy.tabby.healthy = False
        self.post("/ui/api/load", {"model": "alpha"}, ADMIN)
        [process] = self.proxy.reactor.spawned
        process.print("ValueError: Failed to load config.json from /srv/tabbyAPI/models/Alpha\n")
        process.exit(1)
        self.proxy.flush()
        self.assertIn("/srv/tabbyAPI", self.jsonOf(self.get("/ui/api/models", ADMIN))["last_error"])
        self.assertIn("pid", self.jsonOf(self.get("/ui/api/models", ADMIN))["models"][0])
        shown = self.jsonOf(self.get("/ui/api/models", API))
        self.assertNotIn("last_error", shown)
        self.assertNotIn("pid", shown["models"][0])
        [models] = [data for kind, data in parseEvents(b"".join(self.startEvents("/events", API))) if kind == "models"]
        self.assertNotIn("last_error", models)
        self.assertNotIn("/srv", json.dumps(models))

    def test_apiKeyStreamHasNoHistoryNorLogs(self) -> None:
        """
        With an API key, C{/events} carries the models only: no request history, no log, even
        with C{?logs}.
        """
        received = self.startEvents("/events?logs", API)
        self.assertEqual([kind for kind, _ in parseEvents(b"".join(received))], ["hello", "models"])


class _RecordingRequest:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class ViewerBackpressureTests(SynchronousTestCase):
    def viewer(self) -> tuple[EventViewer, _RecordingRequest, Clock]:
        request, clock = _RecordingRequest(), Clock()
        return EventViewer(request, clock, admin=True, logs=True), request, clock  # type: ignore[arg-type]

    def test_eventsGoOutTogether(self) -> None:
        """
        Events sent together reach the connection in one write, L{BATCH_SECONDS} later.
        """
        viewer, request, clock = self.viewer()
        for number in range(5):
            viewer.send("log", {"n": number})
        self.assertEqual(request.written, [])
        clock.advance(BATCH_SECONDS)
        self.assertEqual(len(request.written), 1)
        self.assertEqual([data["n"] for _, data in parseEvents(request.written[0])], [0, 1, 2, 3, 4])

    def test_pausedViewerHasBoundedMemory(self) -> None:
        """
        While its connection is full (paused), a viewer writes nothing; model snapshots replace
        one another and other events are capped at L{MAX_QUEUED}, the oldest dropped.  On resume
        it gets the count it missed, the latest events in order, and the last snapshot.
        """
        viewer, request, clock = self.viewer()
        viewer.pauseProducing()
        for number in range(10_000):
            viewer.send("log", {"text": "x" * 100, "n": number})
            viewer.send("models", {"n": number}, coalesce=True)
        clock.advance(BATCH_SECONDS)
        self.assertEqual(request.written, [])
        self.assertEqual(len(viewer.queued), MAX_QUEUED)
        self.assertLess(viewer.pendingBytes, MAX_QUEUED * 200)
        viewer.resumeProducing()
        events = parseEvents(b"".join(request.written))
        self.assertEqual(events[0], ("dropped", {"count": 10_000 - MAX_QUEUED}))
        self.assertEqual([data["n"] for kind, data in events if kind == "log"], list(range(10_000 - MAX_QUEUED, 10_000)))
        self.assertEqual(events[-1], ("models", {"n": 9999}))
        self.assertEqual(viewer.pendingBytes, 0)

    def test_stoppedViewerKeepsNothing(self) -> None:
        """
        Once its connection is gone, a viewer drops what waited, takes no more, and leaves no
        timer behind.
        """
        viewer, request, clock = self.viewer()
        viewer.send("log", {"n": 1})
        viewer.stopProducing()
        viewer.send("log", {"n": 2})
        self.assertEqual((viewer.pendingBytes, request.written, clock.getDelayedCalls()), (0, [], []))
