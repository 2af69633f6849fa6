"""
The OpenAI API: C{/v1/chat/completions} and C{/v1/completions} start the model their body names
and relay TabbyAPI's answer as it arrives, with what OpenAI's clients need that TabbyAPI leaves
out (L{tabbyproxy.openaiwire}): the model name the client asked for, a role in each choice's
first delta, and C{usage} on every non-streamed reply.  C{/v1/models} lists the profiles;
C{/v1/embeddings}, C{/v1/token/*} and C{/v1/model} pass through to the running model.

Errors are OpenAI's shape, C{{"error": {"message", "type", "code", "param"}}}; once a stream has
started, an error arrives as one more SSE event of that shape.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Callable

from attrs import define, field
from twisted.web.iweb import IRequest

from tabbyproxy.config import Profile
from tabbyproxy.openaiwire import AnswerRewriter
from tabbyproxy.routes.common import (
    OPENAI,
    ClientError,
    ProxyState,
    RouteTable,
    readJSONObject,
    registerErrorAnswers,
    takeKeepAlive,
    writeJSON,
)
from tabbyproxy.routes.loading import LoadingTicks, loadingComment, startEventStream
from tabbyproxy.server import headersSent, noteModel, sendHeaders, writeWhole
from tabbyproxy.scheduler import Lease
from tabbyproxy.template import applyRequestDefaults, applySystemPrompt

_ERROR_EVENT = b'data: {"error"'

@define
class OpenAIRoutes:
    """
    The C{/v1/*} routes.
    """

    app = RouteTable()
    registerErrorAnswers(app, OPENAI)

    state: ProxyState
    now: Callable[[], datetime] = field(default=datetime.now)

    # -- generation

    @app.route("/v1/chat/completions", methods=["POST"])
    async def chatCompletions(self, request: IRequest) -> None:
        await self._generate(request, "/v1/chat/completions", chat=True)

    @app.route("/v1/completions", methods=["POST"])
    async def completions(self, request: IRequest) -> None:
        await self._generate(request, "/v1/completions", chat=False)

    async def _generate(self, request: IRequest, path: str, chat: bool) -> None:
        self.state.requireKey(request)
        body = readJSONObject(request, self.state.maxBodySize)
        asked = body.get("model")
        profile = self._profileFor(body)
        keepAlive = takeKeepAlive(body)
        self._applyTemplate(body, profile, chat)
        rewriter = AnswerRewriter.forRequest(asked if isinstance(asked, str) else profile.id, body, chat)
        if not rewriter.streaming:
            # TabbyAPI counts tokens only when asked, even without a stream; OpenAI always does.
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        await self.forward(request, profile, keepAlive, path, body, rewriter.streaming, rewriter=rewriter)

    def _profileFor(self, body: dict[str, Any]) -> Profile:
        name = body.pop("model", None)
        if name is None:
            running = self.state.scheduler.snapshot()
            if not running:
                raise ClientError(400, "model is required: GET /v1/models lists the available ids")
            return running[0].profile
        profile = self.state.catalog().resolve(name)
        if profile is None:
            shown = name if isinstance(name, str) else json.dumps(name)
            raise ClientError(
                404, f"model '{shown}' not found: GET /v1/models lists the available ids"
            )
        return profile

    def _applyTemplate(self, body: dict[str, Any], profile: Profile, chat: bool) -> None:
        template = profile.template
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list):
                raise ClientError(400, "messages must be a list of chat messages")
            body["messages"] = applySystemPrompt(messages, template, self.now)
        applyRequestDefaults(body, template)

    async def forward(
        self,
        request: IRequest,
        profile: Profile,
        keepAlive: float | None,
        path: str,
        body: dict[str, Any] | None,
        streaming: bool,
        method: str = "POST",
        rewriter: AnswerRewriter | None = None,
    ) -> None:
        """
        Get C{profile}'s model, send it the request, and relay its answer as it arrives.

        A streaming request that has to wait for its model gets its answer's headers at once and
        an SSE comment every few seconds while it waits, so clients with read timeouts survive
        long loads; errors after that arrive as SSE events.  A generation's answer goes through
        C{rewriter}; other answers pass as they are.
        """
        noteModel(request, profile.id)
        acquiring = self.state.scheduler.acquire(profile, keepAlive)
        comments = None
        if streaming and not acquiring.called:
            startEventStream(request)
            comments = LoadingTicks(request, self.state.clock, loadingComment(profile.id, "\r\n"), now=True)
        try:
            lease = await acquiring
        finally:
            if comments is not None:
                comments.stop()
        try:
            payload = None if body is None else json.dumps(body).encode("utf-8")
            await self._relay(request, lease, method, path, payload, streaming, rewriter)
        finally:
            lease.release()

    async def _relay(
        self, request: IRequest, lease: Lease, method: str, path: str, payload: bytes | None, streaming: bool,
        rewriter: AnswerRewriter | None,
    ) -> None:
        upstream = self.state.upstream
        response = await upstream.call(lease, method, path, payload)
        if not headersSent(request):
            upstream.copyHeaders(response, request)

        def relayed(data: bytes) -> None:
            # TabbyAPI's own in-stream error event; its /health may be 503 for good now.
            if _ERROR_EVENT in data:
                lease.suspect()
            request.write(data)

        if not streaming:
            # Held until complete: an answer cut off is a 502, never a 200 with half a document.
            data = await upstream.collect(response, request)
            if rewriter is not None:
                rewriter.feed(data)
                data = rewriter.end()
            writeWhole(request, data)
            return

        def rewritten(data: bytes) -> None:
            assert rewriter is not None
            data = rewriter.feed(data)
            if data:
                relayed(data)

        # As from TabbyAPI itself, a stream's headers reach the client as soon as TabbyAPI sent
        # them, not with the first token (which a long prompt holds back for seconds).
        sendHeaders(request)
        await upstream.pipe(response, request, relayed if rewriter is None else rewritten)
        if rewriter is not None:
            rest = rewriter.end()
            if rest:
                relayed(rest)

    # -- listing and passthrough

    @app.route("/v1/models", methods=["GET"])
    def models(self, request: IRequest) -> bytes:
        self.state.requireListingKey(request)
        loaded = {running.profile.id for running in self.state.scheduler.snapshot()}
        return writeJSON(
            request,
            200,
            {
                "object": "list",
                "data": [self._card(profile, profile.id in loaded) for profile in self.state.catalog()],
            },
        )

    @app.route("/v1/models/<path:name>", methods=["GET"])
    def model(self, request: IRequest, name: str) -> bytes:
        self.state.requireListingKey(request)
        profile = self.state.catalog().resolve(name)
        if profile is None:
            raise ClientError(404, f"model '{name}' not found")
        return writeJSON(request, 200, self._card(profile, self.state.scheduler.runningModel(profile.id) is not None))

    @staticmethod
    def _card(profile: Profile, loaded: bool) -> dict[str, Any]:
        try:
            created = int(profile.path.stat().st_mtime)
        except OSError:
            created = 0
        return {"id": profile.id, "object": "model", "created": created, "owned_by": "tabbyproxy",
                "loaded": loaded}

    @app.route("/v1/embeddings", methods=["POST"])
    async def embeddings(self, request: IRequest) -> None:
        await self._passThrough(request, "/v1/embeddings")

    @app.route("/v1/token/encode", methods=["POST"])
    async def encode(self, request: IRequest) -> None:
        await self._passThrough(request, "/v1/token/encode")

    @app.route("/v1/token/decode", methods=["POST"])
    async def decode(self, request: IRequest) -> None:
        await self._passThrough(request, "/v1/token/decode")

    @app.route("/v1/model", methods=["GET"])
    async def currentModel(self, request: IRequest) -> None:
        await self._passThrough(request, "/v1/model", method="GET")

    async def _passThrough(self, request: IRequest, path: str, method: str = "POST") -> None:
        """
        Send the request to the model its body names, or else to the running model.
        """
        self.state.requireKey(request)
        body = readJSONObject(request, self.state.maxBodySize) if method == "POST" else None
        keepAlive = None
        if body is not None and body.get("model") is not None:
            profile = self._profileFor(body)
            keepAlive = takeKeepAlive(body)
        else:
            running = self.state.scheduler.snapshot()
            if not running:
                raise ClientError(503, "no model is loaded; name one with \"model\" to start it")
            profile = running[0].profile
            if body is not None:
                keepAlive = takeKeepAlive(body)
        await self.forward(request, profile, keepAlive, path, body, streaming=False, method=method)
