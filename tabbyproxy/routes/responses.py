"""
OpenAI's Responses API: C{POST /v1/responses}, what Codex CLI and the C{openai} SDK's
C{client.responses} speak, translated to TabbyAPI's chat completions (see
L{tabbyproxy.responseswire}); C{GET} and C{DELETE /v1/responses/{id}} for the responses the
proxy kept (L{tabbyproxy.responsestore}).

TabbyAPI is always asked for a stream with usage, and its events go through one
L{ResponseEncoder}: a streamed request gets the encoder's events as they come, a non-streamed
one its final Response object, so both say the same.  A streaming request gets its headers,
C{response.created} and C{response.in_progress} at once, then an SSE comment every few seconds
while its model starts; anything that goes wrong after that ends the stream with an C{error}
event and C{response.failed}, the end the Responses clients wait for.  Before that, errors are
OpenAI's JSON documents, as on every C{/v1} route.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Callable

from attrs import define, field
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from tabbyproxy.config import Profile
from tabbyproxy.responsestore import ResponseStore
from tabbyproxy.responseswire import (
    CHAT_PATH,
    ResponseEncoder,
    ResponsesRequest,
    ResponsesRequestError,
    previousResponseId,
    translateRequest,
)
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
from tabbyproxy.routes.translated import TranslatedStream, relayChat, requestedModel
from tabbyproxy.server import noteModel, requestIdOf
from tabbyproxy.scheduler import SchedulingError
from tabbyproxy.template import applyRequestDefaults, applySystemPrompt
from tabbyproxy.upstream import UpstreamAnswered, UpstreamUnreachable

_Stream = TranslatedStream[ResponseEncoder]


def _payload(stream: _Stream) -> bytes:
    """
    The chat request TabbyAPI gets for this response.
    """
    return json.dumps(stream.encoder.request.upstream).encode("utf-8")


@define
class ResponsesRoutes:
    """
    The C{/v1/responses} routes.

    @ivar store: the kept responses, for C{previous_response_id}.
    """

    app = RouteTable()
    registerErrorAnswers(app, OPENAI)
    log = Logger()

    state: ProxyState
    now: Callable[[], datetime] = field(default=datetime.now)
    store: ResponseStore = field(factory=ResponseStore)

    @app.route("/v1/responses", methods=["POST"])
    async def create(self, request: IRequest) -> bytes | None:
        self.state.requireKey(request)
        body = readJSONObject(request, self.state.maxBodySize)
        name, profile = self._profileFor(body)
        noteModel(request, profile.id)
        keepAlive = takeKeepAlive(body)
        translated = self._translate(body, profile)
        if translated.ignored:
            self.log.debug("Ignored what TabbyAPI has no meaning for in a response for {model}: {ignored}",
                           model=profile.id, ignored=", ".join(translated.ignored))
        encoder = ResponseEncoder(translated, name, int(self.state.clock.seconds()))
        relay = _Stream(request, encoder, translated.stream)
        if translated.stream:
            await self._stream(request, relay, profile, keepAlive)
            result = None
        else:
            await self._generate(request, relay, profile, keepAlive)
            result = writeJSON(request, 200, encoder.response())
        if translated.store:
            self.store.put(encoder.response(), translated.items)
        return result

    def _profileFor(self, body: dict[str, Any]) -> tuple[str, Profile]:
        return requestedModel(
            self.state.catalog(), body, "model is required: GET /v1/models lists the available ids",
            "model '{name}' not found: GET /v1/models lists the available ids")

    def _translate(self, body: dict[str, Any], profile: Profile) -> ResponsesRequest:
        """
        The TabbyAPI request, continued from the kept response C{previous_response_id} names,
        with the profile's template applied.
        """
        try:
            previous = previousResponseId(body)
            history: list[dict[str, Any]] = []
            if previous is not None:
                stored = self.store.get(previous)
                if stored is None:
                    raise ClientError(
                        404,
                        f"previous response '{previous}' not found: tabbyproxy keeps responses in memory, "
                        "only those sent without store: false, and only the most recent ones",
                    )
                history = stored.items
            translated = translateRequest(body, history)
        except ResponsesRequestError as e:
            raise ClientError(400, e.message) from e
        upstream = translated.upstream
        template = profile.template
        upstream["messages"] = applySystemPrompt(upstream["messages"], template, self.now)
        applyRequestDefaults(upstream, template)
        return translated

    async def _generate(self, request: IRequest, relay: _Stream, profile: Profile, keepAlive: float | None) -> None:
        """
        A non-streamed response: errors are raised, for OpenAI's error document.
        """
        lease = await self.state.scheduler.acquire(profile, keepAlive)
        try:
            problem = await relayChat(self.state.upstream, relay, lease, CHAT_PATH, _payload(relay))
        finally:
            lease.release()
        if problem is not None:
            raise UpstreamAnswered(502, problem)
        relay.encoder.finish()

    async def _stream(self, request: IRequest, relay: _Stream, profile: Profile, keepAlive: float | None) -> None:
        """
        A streamed response: once its first event went out, whatever goes wrong ends the
        stream with C{response.failed}.
        """
        startEventStream(request)
        encoder = relay.encoder
        relay.send(encoder.start())
        acquiring = self.state.scheduler.acquire(profile, keepAlive)
        comments = None
        if not acquiring.called:
            comments = LoadingTicks(request, self.state.clock, loadingComment(profile.id), now=False)
        try:
            lease = await acquiring
        except SchedulingError as e:
            self._failed(request, relay, profile.id, str(e))
            return
        finally:
            if comments is not None:
                comments.stop()
        try:
            problem = await relayChat(self.state.upstream, relay, lease, CHAT_PATH, _payload(relay))
        except (UpstreamAnswered, UpstreamUnreachable) as e:
            problem = str(e)
        finally:
            lease.release()
        if problem is not None:
            self._failed(request, relay, profile.id, problem)
            return
        relay.send(encoder.finish())

    def _failed(self, request: IRequest, relay: _Stream, model: str, problem: str) -> None:
        self.log.error("A response for {model} failed: {problem}", model=model, problem=problem,
                       request_id=requestIdOf(request))
        relay.send(relay.encoder.fail(problem))

    # -- kept responses

    @app.route("/v1/responses/<string:responseId>", methods=["GET"])
    def retrieve(self, request: IRequest, responseId: str) -> bytes:
        self.state.requireKey(request)
        stored = self.store.get(responseId)
        if stored is None:
            raise ClientError(404, f"response '{responseId}' not found", "invalid_request_error")
        return writeJSON(request, 200, stored.response)

    @app.route("/v1/responses/<string:responseId>", methods=["DELETE"])
    def delete(self, request: IRequest, responseId: str) -> bytes:
        self.state.requireKey(request)
        if not self.store.delete(responseId):
            raise ClientError(404, f"response '{responseId}' not found", "invalid_request_error")
        return writeJSON(request, 200, {"id": responseId, "object": "response", "deleted": True})
