"""
Bad input gets a clear 4xx in the error shape of the route it was sent to, and the proxy keeps
serving everyone else: malformed and non-object bodies, unknown or path-like model ids, a bad
keep_alive on every route (in memory); bodies over the size limit (refused before they are
buffered), requests that stall, absurd request lines and headers, and pipelining (over real TCP,
through the HTTP server the proxy really runs); and a hypothesis fuzz of every route's body.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq import content
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from tabbyproxy.routes.common import errorBodyFor
from tabbyproxy.server import ProxySite
from tabbyproxy.tap import Options
from tests.support.fakes import FakeTabby, InMemoryClient, InMemoryProxy, SiteAgent, writeProfiles
from tests.support.processes import waitUntil
from tests.support.proxy import RunningProxy
from tests.support.processes import reactor as _reactor

reactor: Any = _reactor

PROFILES: dict[str, dict[str, Any]] = {
    "qwen": {"model": {"model_name": "Qwen"}, "template": {"temperature": 0.5, "system": "Be brief."}},
    "coding/llama": {"model": {"model_name": "Llama"}},
}

# Every route that reads a JSON body, with the shape of its errors.
OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/token/encode", "/v1/token/decode")
OLLAMA_ROUTES = ("/api/chat", "/api/generate", "/api/show", "/api/embed", "/api/embeddings")
PASSTHROUGH_ROUTES = ("/v1/embeddings", "/v1/token/encode", "/v1/token/decode")
# Every route that reads a body.
BODY_ROUTES = OPENAI_ROUTES + OLLAMA_ROUTES + (
    "/v1/messages", "/v1/messages/count_tokens", "/v1/responses", "/ui/api/load", "/ui/api/unload")


def assertRouteError(testCase: SynchronousTestCase, path: str, status: int, code: int, raw: bytes) -> str:
    """
    C{raw} is an error of C{path}'s API with status C{code} (which is C{status}); return its message.
    """
    testCase.assertEqual(code, status, raw)
    document = json.loads(raw)
    if path.startswith("/v1/messages"):
        testCase.assertEqual(document["type"], "error")
        testCase.assertEqual(set(document["error"]), {"type", "message"})
        return str(document["error"]["message"])
    if path.startswith("/v1/"):
        error = document["error"]
        testCase.assertEqual(set(error), {"message", "type", "code", "param"})
        return str(error["message"])
    testCase.assertEqual(set(document), {"error"})
    testCase.assertIsInstance(document["error"], str)
    return str(document["error"])


class TabbyLike(FakeTabby):
    """
    L{FakeTabby}, answering the embeddings and token routes in TabbyAPI's shapes as well, so the
    Ollama translation sees well-formed answers and only the client's input is on trial.
    """

    def render(self, request: Request) -> Any:
        path = request.path.decode()
        if path not in ("/v1/embeddings", "/v1/token/encode", "/v1/token/decode"):
            return super().render(request)
        raw = request.content.read() if request.content is not None else b""
        body = json.loads(raw) if raw else {}
        request.setHeader(b"Content-Type", b"application/json")
        if path == "/v1/embeddings":
            inputs = body.get("input")
            count = len(inputs) if isinstance(inputs, list) else 1
            data = [{"object": "embedding", "index": i, "embedding": [0.5, 0.25]} for i in range(count)]
            return json.dumps({"object": "list", "data": data, "model": "Qwen",
                               "usage": {"prompt_tokens": 1, "total_tokens": 1}}).encode()
        if path == "/v1/token/encode":
            return json.dumps({"tokens": [1, 2], "length": 2}).encode()
        return json.dumps({"text": "decoded"}).encode()


class InMemoryBadInputTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        d = self.proxy.client.post("http://localhost" + path, data=body, headers={"Content-Type": "application/json"})
        self.proxy.flush()
        response = self.successResultOf(d)
        return response.code, self.successResultOf(content(response))

    def test_sameMistakesOnEveryRoute(self) -> None:
        """
        On every route that reads a body: malformed JSON and bodies that are not objects are
        400s; unknown models, model ids with C{..}, absolute paths or NUL bytes are 404s naming
        the model; a malformed keep_alive is a 400 naming it (on the generating routes).  Each
        answer is in the route's own error shape, and no child is started.
        """
        bad: list[tuple[bytes, int, str]] = [
            (b'{"model": "qwen", "messages": [', 400, "not valid JSON"),
            (b"[1, 2]", 400, "must be a JSON object"),
            (b'"qwen"', 400, "must be a JSON object"),
            (b"\xff\xfe", 400, "not valid JSON"),
            (b'{"model": "gpt-4"}', 404, "'gpt-4' not found"),
            (b'{"model": "../qwen"}', 404, "not found"),
            (b'{"model": "coding/../qwen"}', 404, "not found"),
            (b'{"model": "/etc/passwd"}', 404, "not found"),
            (b'{"model": "qwen\\u0000"}', 404, "not found"),
        ]
        for path in OPENAI_ROUTES + OLLAMA_ROUTES:
            for body, status, fragment in bad:
                message = assertRouteError(self, path, status, *self.post(path, body))
                self.assertIn(fragment, message, (path, body))
        for path in ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate", "/api/embed"):
            raw = json.dumps({"model": "qwen", "messages": [], "prompt": "x", "input": "x", "keep_alive": "5 minutes"})
            self.assertIn("keep_alive", assertRouteError(self, path, 400, *self.post(path, raw.encode("utf-8"))))
        self.assertEqual(self.proxy.reactor.spawned, [])

    def test_loneSurrogatesAreA400Everywhere(self) -> None:
        """
        A lone UTF-16 surrogate anywhere in a body (a message, a tool call's name or arguments,
        a key), escaped or as encoded bytes, or a number JSON does not have (NaN, Infinity,
        1e400), is a 400 in the route's own shape on every route that reads a body, never a 500.
        """
        bodies = [
            b'{"model":"qwen","messages":[{"role":"user","content":"hi"},'
            b'{"role":"tool","tool_name":"\\ud800","content":"x"}]}',
            b'{"model":"qwen","messages":[{"role":"assistant","content":"","tool_calls":'
            b'[{"function":{"name":"\\udfff","arguments":{"a":"b"}}}]}]}',
            b'{"model":"qwen","messages":[{"role":"assistant","content":"","tool_calls":'
            b'[{"function":{"name":"f","arguments":{"a":"\\uD800x"}}}]}]}',
            b'{"model":"qwen","prompt":"x","input":"x","\\udc00":1}',
            b'{"model":"qwen","prompt":"\xed\xa0\x80","input":"x"}',
        ]
        numbers = [b'{"model":"qwen","prompt":"x","temperature":NaN}', b'{"model":"qwen","prompt":"x","top_p":-Infinity}',
                   b'{"model":"qwen","prompt":"x","temperature":1e400}']
        for path in BODY_ROUTES:
            for body in bodies:
                message = assertRouteError(self, path, 400, *self.post(path, body))
                self.assertTrue("surrogate" in message or "utf-8" in message, (path, body, message))
            for body in numbers:
                message = assertRouteError(self, path, 400, *self.post(path, body))
                self.assertTrue("not a JSON number" in message or "out of range" in message, (path, body, message))
        # A surrogate pair is one character, and fine.
        code, raw = self.post("/api/generate", b'{"model":"qwen","prompt":"\\ud83d\\ude00","stream":false}')
        self.assertEqual(code, 200, raw)

    def test_loneSurrogateInArgumentsText(self) -> None:
        """
        Tool call arguments given as a string of JSON may decode to a lone surrogate, which no
        check of the body can see: the Ollama route still answers, it does not fail with a 500.
        """
        arguments = json.dumps(json.dumps({"a": "\ud800"}))
        body = ('{"model":"qwen","stream":false,"messages":[{"role":"assistant","content":"","tool_calls":'
                '[{"function":{"name":"f","arguments":%s}}]},{"role":"user","content":"x"}]}' % arguments)
        code, raw = self.post("/api/chat", body.encode())
        self.assertEqual(code, 200, raw)

    def test_unexpectedFailureIsJSON(self) -> None:
        """
        A failure no route answers is a 500 in the shape of the path's API, logged with its
        traceback, never twisted.web's HTML page.
        """

        class Broken(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                raise RuntimeError("broken on purpose")

        client = InMemoryClient(SiteAgent(ProxySite(Broken(), errorBody=errorBodyFor)))
        with capturedLogs() as events:
            for path, shape in (("/v1/models", "error"), ("/api/tags", "error"), ("/v1/messages", "type")):
                d = client.get("http://localhost" + path)
                client.flush()
                response = self.successResultOf(d)
                raw = self.successResultOf(content(response))
                self.assertEqual(response.code, 500)
                self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
                self.assertIn(shape, json.loads(raw))
                self.assertIn(b"see its log", raw)
        failures = [event for event in events if event.get("log_failure") is not None]
        self.assertEqual(len(failures), 3)
        self.assertTrue(all(event["log_failure"].check(RuntimeError) for event in failures))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)

    def test_keepsServingAfterBadInput(self) -> None:
        """
        After a burst of bad requests the proxy answers a good one as usual.
        """
        for path in OPENAI_ROUTES + OLLAMA_ROUTES:
            self.post(path, b"{")
        code, raw = self.post("/v1/completions", json.dumps({"model": "qwen", "prompt": "x"}).encode())
        self.assertEqual(code, 200, raw)


# ------------------------------------------------------------------------------------------------
# Over real TCP: the HTTP server's own guards


class _Exchange(Protocol):
    """
    Writes C{data} and collects everything the server sends until it closes the connection.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = bytearray()
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.closed.callback(bytes(self.received))


async def exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """
    Send raw bytes to the proxy; return all it answers before it closes the connection.
    """
    protocol = _Exchange(data)
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: protocol))
    closed = protocol.closed
    closed.addTimeout(timeout, reactor, onTimeoutCancel=lambda result, t: protocol.transport.abortConnection())  # type: ignore[union-attr]
    return await closed


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """
    The HTTP/1.1 responses in C{raw}, each (status, headers by lower-case name, body), framed
    by Content-Length or chunked.
    """
    found = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 "), head
        status = int(lines[0].split(" ")[1])
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size, _, raw = raw.partition(b"\r\n")
                length = int(size, 16)
                body, raw = body + raw[:length], raw[length + 2:]
                if length == 0:
                    break
        else:
            length = int(headers.get("content-length", "0"))
            body, raw = raw[:length], raw[length:]
        found.append((status, headers, body))
    return found


class HTTPGuardTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.proxy = RunningProxy(self, PROFILES, "--max-body-size", "1000", "--client-timeout", "0.5")

    async def assertStillServing(self) -> None:
        response = await self.proxy.http.get(self.proxy.url + "/health")
        self.assertEqual(response.code, 200)
        await response.content()

    def only(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        [response] = responses(raw)
        return response

    async def test_contentLengthOverLimitIsRefusedAtOnce(self) -> None:
        """
        A Content-Length over --max-body-size is answered with a 413 in the route's error shape
        as soon as the headers are in: the body is never sent, let alone buffered, and the
        connection is closed.  With C{Expect: 100-continue} no "100 Continue" invites the body.
        """
        for path in ("/v1/chat/completions", "/api/chat"):
            head = (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {10**9}\r\nExpect: 100-continue\r\n\r\n").encode()
            raw = await exchange(self.proxy.port, head)
            self.assertNotIn(b"100 Continue", raw)
            status, headers, body = self.only(raw)
            self.assertEqual(headers["connection"], "close")
            message = assertRouteError(self, path, 413, status, body)
            self.assertIn("request body of 1000000000 bytes is over the limit of 1000 bytes", message)
        await self.assertStillServing()

    async def test_chunkedBodyOverLimitIsCutShort(self) -> None:
        """
        A chunked body is counted as it arrives: once it passes the limit the client gets a 413
        and the connection is closed, before the body ends.
        """
        chunk = b"x" * 400
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        raw = await exchange(self.proxy.port, head + b"".join(b"190\r\n" + chunk + b"\r\n" for _ in range(3)))
        status, _, body = self.only(raw)
        self.assertIn("over the limit of 1000 bytes", assertRouteError(self, "/v1/", 413, status, body))
        await self.assertStillServing()

    async def test_bodyWithinLimitIsRead(self) -> None:
        """
        A body under the limit, chunked or not, reaches the route as usual.
        """
        body = json.dumps({"model": "nope", "prompt": "x" * 800}).encode()
        plain = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                 % (len(body), body))
        chunked = (b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                   b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        status, _, answer = self.only(await exchange(self.proxy.port, plain))
        self.assertIn("'nope' not found", assertRouteError(self, "/v1/", 404, status, answer))
        status, _, answer = self.only(await exchange(self.proxy.port, chunked))
        self.assertIn("'nope' not found", assertRouteError(self, "/api/", 404, status, answer))

    async def test_bodyThatNeverComesTimesOut(self) -> None:
        """
        A request whose body stops coming is answered with a 408 in the route's shape after
        --client-timeout, and its connection closed; so is one whose headers stop coming.
        """
        started = reactor.seconds()
        raw = await exchange(self.proxy.port, b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{\"mo")
        self.assertGreaterEqual(reactor.seconds() - started, 0.5)
        status, _, body = self.only(raw)
        self.assertIn("not complete within 0.5s (--client-timeout)", assertRouteError(self, "/api/", 408, status, body))

        raw = await exchange(self.proxy.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")
        status, _, body = self.only(raw)
        self.assertIn("headers were not complete", assertRouteError(self, "/v1/", 408, status, body))
        await self.assertStillServing()

    async def test_idleKeepAliveConnectionClosesQuietly(self) -> None:
        """
        A keep-alive connection left idle after a complete answer is closed after
        --client-timeout without a 408 (clients reuse such connections).
        """
        raw = await exchange(self.proxy.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        [(status, _, body)] = responses(raw)
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))

    async def test_absurdRequestLineAndHeaders(self) -> None:
        """
        A request line over 16 KiB gets a 414, a header line over it or over 500 headers or
        16 KiB of headers a 431, a malformed request line a 400: each JSON in the route's shape,
        where twisted.web alone would close the connection silently or send an empty 400.
        """
        cases = [
            (b"GET /v1/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", "/v1/", 414, "request line is over"),
            (b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", "/api/", 431,
             "header line is over"),
            (b"GET /status HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(600)) + b"\r\n", "/", 431,
             "more than 500 request headers"),
            (b"GET /v1/models HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 1000) for i in range(20)) + b"\r\n",
             "/v1/", 431, "over the limit of 16384 bytes"),
            (b"GARBAGE\r\n\r\n", "/", 400, "malformed HTTP request"),
        ]
        for request, path, code, fragment in cases:
            status, _, body = self.only(await exchange(self.proxy.port, request))
            self.assertIn(fragment, assertRouteError(self, path, code, status, body))
        await self.assertStillServing()

    async def test_absoluteFormTargetsAreServed(self) -> None:
        """
        An absolute-form request target (RFC 9112 3.2.2) is served as its path and query, with
        the target's authority as the Host, so the browser policy judges that host.
        """
        port = self.proxy.port
        raw = await exchange(port, (
            b"GET http://127.0.0.1:%d/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"GET HTTP://localhost:%d/logs?source=proxy HTTP/1.1\r\n\r\n"
            b"GET http://evil.example:%d/api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Connection: close\r\n\r\n" % (port, port, port)))
        answers = responses(raw)
        self.assertEqual([status for status, _, _ in answers], [200, 200, 403])
        self.assertEqual(json.loads(answers[0][2]), {"status": "ok"})
        self.assertIn("logs", json.loads(answers[1][2]))

    async def test_pipelinedRequestsAnsweredInOrder(self) -> None:
        """
        Requests pipelined on one connection, bodies included, are answered in order.
        """
        body = json.dumps({"model": "gpt-4", "prompt": "x"}).encode()
        raw = await exchange(self.proxy.port, (
            b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
            b"GET /api/version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" % (len(body), body)))
        answers = responses(raw)
        self.assertEqual([status for status, _, _ in answers], [200, 404, 200])
        self.assertEqual(json.loads(answers[0][2]), {"status": "ok"})
        self.assertIn("'gpt-4' not found", json.loads(answers[1][2])["error"]["message"])
        self.assertIn("version", json.loads(answers[2][2]))


class _SlowSender(Protocol):
    """
    Writes C{data} one byte every 50 ms, as a client that never stays silent long enough for
    --client-timeout does, and collects the answer until the server closes the connection.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = bytearray()
        self.closed: Deferred[bytes] = Deferred()
        self.sending = LoopingCall(self._sendOne)
        self.sending.clock = reactor

    def connectionMade(self) -> None:
        self.sending.start(0.05)

    def _sendOne(self) -> None:
        byte, self.data = self.data[:1], self.data[1:]
        if byte and self.transport is not None:
            self.transport.write(byte)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.sending.stop()
        self.closed.callback(bytes(self.received))


class ConnectionLimitTests(TestCase):
    """
    Issue 10, item 8: a request must arrive within --request-timeout however steadily its bytes
    come, and a connection over --max-connections gets a clear 503.
    """

    timeout = 30

    def setUp(self) -> None:
        self.proxy = RunningProxy(self, PROFILES, "--client-timeout", "30", "--request-timeout", "1",
                                  "--max-connections", "2")

    async def test_slowSenderGets408(self) -> None:
        """
        A client sending its request a byte every 50 ms (it would take 20 s) is answered with a
        408 after --request-timeout, and its connection closed, though it never went silent.
        """
        sender = _SlowSender(b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: 400\r\n\r\n" + b"x" * 400)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port).connect(Factory.forProtocol(lambda: sender))
        started = reactor.seconds()
        raw = await sender.closed.addTimeout(10, reactor)
        self.assertGreaterEqual(reactor.seconds() - started, 1)
        [(status, _, body)] = responses(raw)
        self.assertIn("not complete within 1s (--request-timeout)", assertRouteError(self, "/api/", 408, status, body))

    async def test_connectionOverTheCapGets503(self) -> None:
        """
        With two connections open and --max-connections 2, a third one's request gets a 503 in
        its route's shape and the connection is closed; once one closes, requests are served.
        """
        idle = [_Exchange(b"") for _ in range(2)]
        for protocol in idle:
            await TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.port).connect(Factory.forProtocol(lambda: protocol))
        await waitUntil(lambda: self.proxy.site.connections.current == 2)
        [(status, headers, body)] = responses(await exchange(self.proxy.port, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n"))
        self.assertEqual(headers["connection"], "close")
        self.assertIn("(--max-connections)", assertRouteError(self, "/v1/", 503, status, body))
        for protocol in idle:
            assert protocol.transport is not None
            protocol.transport.loseConnection()
            await protocol.closed
        await waitUntil(lambda: self.proxy.site.connections.current == 0)
        [(status, _, _)] = responses(await exchange(self.proxy.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"))
        self.assertEqual(status, 200)


# ------------------------------------------------------------------------------------------------
# Fuzz

# Text with anything JSON can carry, lone surrogates included (json.dumps escapes them as \\ud800).
TEXT = st.text(st.characters(exclude_categories=()), max_size=20) | st.sampled_from(["\ud800", "a\udfffb", "\udc00\ud83d"])
# Numbers as clients send them, and beyond: huge integers, 1e308, and json.dumps's NaN and
# Infinity, which JSON does not have (1e+308 also becomes 1e999 in some bodies, below).
NUMBERS = st.integers() | st.floats() | st.sampled_from([10**400, -(2**63), 2**64, 1e308, -1e308, 5e-324])
JSON_LEAVES = st.none() | st.booleans() | NUMBERS | TEXT
JSON_VALUES = st.recursive(JSON_LEAVES, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(TEXT, children, max_size=4), max_leaves=12)


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """
    Usually a well-typed value (so bodies get past validation and reach the upstream and the
    translations), sometimes any JSON at all.
    """
    return st.one_of(good, good, good, JSON_VALUES)


MODELS = mostly(st.sampled_from(["qwen", "qwen:latest", "coding/llama"])) | st.sampled_from(
    ["gpt-4", "../qwen", "/qwen", "", "qwen\0", "qwen:7b", "qwen\ud800"])
ARGUMENTS = mostly(st.dictionaries(TEXT, JSON_VALUES, max_size=3) | JSON_VALUES.map(json.dumps))
TOOL_CALL = st.fixed_dictionaries(
    {"function": mostly(st.fixed_dictionaries({"name": mostly(TEXT), "arguments": ARGUMENTS}))},
    optional={"id": mostly(TEXT), "type": mostly(st.just("function"))},
)
# Content blocks of the Messages API and input items of the Responses API, tools included.
BLOCK = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": mostly(TEXT)}),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": mostly(TEXT), "name": mostly(TEXT), "input": JSON_VALUES}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": mostly(TEXT), "content": mostly(TEXT)}),
    st.fixed_dictionaries({"type": st.just("function_call"), "call_id": mostly(TEXT), "name": mostly(TEXT),
                           "arguments": ARGUMENTS}),
    st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": mostly(TEXT), "output": mostly(TEXT)}),
)
MESSAGE = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["system", "user", "assistant", "tool"])),
     "content": mostly(TEXT | st.lists(BLOCK, max_size=3))},
    optional={"images": mostly(st.lists(st.sampled_from(["aGVsbG8=", "not base64"]), max_size=2)),
              "tool_calls": mostly(st.lists(TOOL_CALL, max_size=2)), "tool_name": mostly(TEXT),
              "tool_call_id": mostly(TEXT), "thinking": mostly(TEXT)},
)
OPTIONS = st.fixed_dictionaries({}, optional={
    "num_predict": mostly(st.integers(-2, 50)), "temperature": mostly(st.floats(0, 2)) | NUMBERS,
    "top_k": mostly(st.integers(0, 50)) | NUMBERS, "stop": mostly(st.lists(TEXT, max_size=2)),
    "num_ctx": mostly(st.integers(0, 10**6)), "seed": mostly(st.integers()) | NUMBERS, "unknown": JSON_VALUES,
})
TOOL = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": mostly(TEXT), "parameters": mostly(st.just({"type": "object"}))})})
KNOWN_FIELDS = {
    "model": MODELS, "name": MODELS, "messages": mostly(st.lists(MESSAGE, max_size=3)), "prompt": mostly(TEXT),
    "input": mostly(TEXT | st.lists(TEXT | BLOCK | MESSAGE, max_size=3)), "stream": mostly(st.booleans()),
    "keep_alive": mostly(st.sampled_from([0, -1, 5, 0.5, "5m", "0", "-1m", "1h30m", "300ms", "5 minutes", "", 1e308])),
    "options": mostly(OPTIONS), "format": mostly(st.sampled_from(["json", "", {"type": "object"}])),
    "think": mostly(st.booleans() | st.sampled_from(["low", "high"])), "tools": mostly(st.lists(TOOL, max_size=2)),
    "system": mostly(TEXT), "template": mostly(TEXT), "raw": mostly(st.booleans()), "suffix": mostly(TEXT),
    "images": mostly(st.lists(st.sampled_from(["aGVsbG8="]), max_size=1)),
    "max_tokens": mostly(st.integers(0, 50)) | NUMBERS, "max_output_tokens": mostly(st.integers(1, 50)),
    "temperature": mostly(st.floats(0, 2)) | NUMBERS, "tokens": mostly(st.lists(st.integers(0, 9) | NUMBERS)),
    "text": mostly(TEXT), "context": mostly(st.lists(st.integers(0, 9), max_size=3)), "truncate": mostly(st.booleans()),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "instructions": mostly(TEXT), "previous_response_id": mostly(TEXT),
}
OBJECTS = st.fixed_dictionaries({}, optional=KNOWN_FIELDS).map(lambda body: json.dumps(body).encode())
BODIES = st.one_of(OBJECTS, OBJECTS, OBJECTS, OBJECTS.map(lambda raw: raw.replace(b"1e+308", b"1e999")),
                   JSON_VALUES.map(lambda value: json.dumps(value).encode()), st.binary(max_size=40))
ROUTES = st.sampled_from(BODY_ROUTES + ("/unload",))

# Well-formed conversations of each API with tool use, every string drawn from TEXT: bodies that
# pass validation and reach the translations, the tool call ids and TabbyAPI.
_TOOLS = st.lists(TOOL, min_size=1, max_size=2)
_OLLAMA_CHAT = st.fixed_dictionaries({
    "model": st.just("qwen"), "stream": st.booleans(), "tools": _TOOLS,
    "messages": st.tuples(
        st.fixed_dictionaries({"role": st.just("user"), "content": TEXT}),
        st.fixed_dictionaries({"role": st.just("assistant"), "content": TEXT, "tool_calls": st.lists(
            st.fixed_dictionaries({"function": st.fixed_dictionaries({"name": TEXT, "arguments": ARGUMENTS})}),
            min_size=1, max_size=2)}),
        st.fixed_dictionaries({"role": st.just("tool"), "tool_name": TEXT, "content": TEXT}),
    ).map(list),
})
_OPENAI_CHAT = st.fixed_dictionaries({
    "model": st.just("qwen"), "stream": st.booleans(), "tools": _TOOLS,
    "messages": st.tuples(
        st.fixed_dictionaries({"role": st.just("user"), "content": TEXT}),
        st.fixed_dictionaries({"role": st.just("assistant"), "content": TEXT, "tool_calls": st.lists(
            st.fixed_dictionaries({"id": TEXT, "type": st.just("function"), "function": st.fixed_dictionaries(
                {"name": TEXT, "arguments": JSON_VALUES.map(json.dumps)})}), min_size=1, max_size=2)}),
        st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": TEXT, "content": TEXT}),
    ).map(list),
})
_MESSAGES = st.fixed_dictionaries({
    "model": st.just("qwen"), "max_tokens": st.integers(1, 50), "stream": st.booleans(), "system": TEXT,
    "tools": st.lists(st.fixed_dictionaries({"name": TEXT, "input_schema": st.just({"type": "object"})}), max_size=2),
    "messages": st.tuples(
        st.fixed_dictionaries({"role": st.just("user"), "content": TEXT}),
        st.fixed_dictionaries({"role": st.just("assistant"), "content": st.lists(st.fixed_dictionaries(
            {"type": st.just("tool_use"), "id": TEXT, "name": TEXT, "input": st.dictionaries(TEXT, JSON_VALUES)}),
            min_size=1, max_size=2)}),
        st.fixed_dictionaries({"role": st.just("user"), "content": st.lists(st.fixed_dictionaries(
            {"type": st.just("tool_result"), "tool_use_id": TEXT, "content": TEXT}), min_size=1, max_size=2)}),
    ).map(list),
})
_RESPONSES = st.fixed_dictionaries({
    "model": st.just("qwen"), "stream": st.booleans(), "instructions": TEXT,
    "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "name": TEXT,
                                             "parameters": st.just({"type": "object"})}), max_size=2),
    "input": st.tuples(
        st.fixed_dictionaries({"role": st.just("user"), "content": TEXT}),
        st.fixed_dictionaries({"type": st.just("function_call"), "call_id": TEXT, "name": TEXT,
                               "arguments": JSON_VALUES.map(json.dumps)}),
        st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": TEXT, "output": TEXT}),
    ).map(list),
})
CONVERSATIONS = st.one_of(
    st.tuples(st.sampled_from(["/api/chat"]), _OLLAMA_CHAT),
    st.tuples(st.sampled_from(["/v1/chat/completions"]), _OPENAI_CHAT),
    st.tuples(st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]), _MESSAGES),
    st.tuples(st.sampled_from(["/v1/responses"]), _RESPONSES),
).map(lambda pair: (pair[0], json.dumps(pair[1]).encode()))


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=400,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(route=ROUTES, body=BODIES)
    def test_noBodyBreaksARoute(self, route: str, body: bytes) -> None:
        """
        Whatever body a client sends to whichever route that reads one (text with lone
        surrogates, huge and non-finite numbers, tool calls and content blocks of every API
        included), the answer is not a 5xx and not HTML, nothing is logged as a failure (no
        traceback), errors are JSON in the route's shape, and the proxy answers the next request
        normally.
        """
        self.assertAnswered(route, body)

    @settings(max_examples=200,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(exchange=CONVERSATIONS)
    def test_noTextBreaksAConversation(self, exchange: tuple[str, bytes]) -> None:
        """
        A well-formed conversation with tool calls on each API, its every string (messages, tool
        names, call ids, arguments) drawn from any text, lone surrogates included, gets an
        answer as L{test_noBodyBreaksARoute} has it.
        """
        self.assertAnswered(*exchange)

    def assertAnswered(self, route: str, body: bytes) -> None:
        """
        Post C{body} to C{route} and check the answer as L{test_noBodyBreaksARoute} says.
        """
        proxy = self.fuzzProxy()
        with capturedLogs() as events:
            d = proxy.client.post("http://localhost" + route, data=body, headers={"Content-Type": "application/json"})
            proxy.flush()
            proxy.reactor.advance(0)
            response = self.successResultOf(d)
            raw = self.successResultOf(content(response))
        if response.code == 503 and route in PASSTHROUGH_ROUTES:
            # A body that names no model goes to the running model; with none running, TabbyAPI's
            # own answer is a 503 "no model loaded", and the proxy keeps that.
            self.assertIn(b"no model is loaded", raw)
        else:
            self.assertLess(response.code, 500, (route, body, raw))
        self.assertFalse(raw.lstrip().startswith(b"<"), (route, body, raw))
        failures = [e["log_failure"].getTraceback() for e in events if e.get("log_failure") is not None]
        self.assertEqual(failures, [], (route, body))
        if response.code >= 400:
            assertRouteError(self, route, response.code, response.code, raw)
        healthy = self.successResultOf(proxy.client.get("http://localhost/health"))
        self.assertEqual(healthy.code, 200)
        self.assertEqual(proxy.scheduler.status()["in_flight"], 0)

    _proxy: InMemoryProxy | None = None

    def fuzzProxy(self) -> InMemoryProxy:
        """
        One in-memory proxy for all the examples of a test run, with a TabbyAPI that answers
        every route in its real shape.
        """
        if self._proxy is None:
            proxy = InMemoryProxy(Path(self.mktemp()), PROFILES, tabby=TabbyLike())
            self._proxy = proxy
        return self._proxy


class GuardOptionsTests(SynchronousTestCase):
    def test_defaultsAndChecks(self) -> None:
        """
        --client-timeout defaults to 60 s and, like --max-body-size, must be positive.
        """
        configDir = Path(self.mktemp())
        writeProfiles(configDir, PROFILES)
        options = Options()
        options.parseOptions(["--simulate", "--config-dir", str(configDir)])
        self.assertEqual((options["client-timeout"], options["max-body-size"]), (60.0, 16 * 1024 * 1024))
        for bad in (["--client-timeout", "0"], ["--client-timeout", "soon"], ["--max-body-size", "-1"]):
            self.assertRaises(UsageError, Options().parseOptions, ["--simulate", "--config-dir", str(configDir), *bad])

    def test_connectionLimitDefaultsAndChecks(self) -> None:
        """
        --request-timeout defaults to 300 s, --max-connections to 4096 and --backlog to the
        system's (None until the service starts); each must be positive.
        """
        configDir = Path(self.mktemp())
        writeProfiles(configDir, PROFILES)
        options = Options()
        options.parseOptions(["--simulate", "--config-dir", str(configDir)])
        self.assertEqual((options["request-timeout"], options["max-connections"], options["backlog"]), (300.0, 4096, None))
        for bad in (["--request-timeout", "0"], ["--max-connections", "0"], ["--backlog", "-1"], ["--backlog", "x"]):
            self.assertRaises(UsageError, Options().parseOptions, ["--simulate", "--config-dir", str(configDir), *bad])
