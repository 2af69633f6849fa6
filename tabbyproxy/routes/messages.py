"""
Anthropic's Messages API: C{POST /v1/messages}, what Claude Code and the C{anthropic} SDK's
C{client.messages} speak, translated to TabbyAPI's chat completions (see
L{tabbyproxy.messageswire}); C{POST /v1/messages/count_tokens}, counted by TabbyAPI's tokenizer;
and C{GET /v1/models} in Anthropic's list shape, for the clients that send
C{anthropic-version} (L{tabbyproxy.routes.root} sends them here).

TabbyAPI is always asked for a stream with usage, and its events go through one
L{MessageEncoder}: a streamed request gets the encoder's events as they come, a non-streamed
one its final Message, so both say the same.  A streaming request gets its headers,
C{message_start} and a C{ping} at once, then a C{ping} every few seconds until the first token
(while its model starts, and while TabbyAPI reads the prompt);
anything that goes wrong after that ends the stream with an C{error} event.  Before that, errors
are Anthropic's JSON documents (C{overloaded_error} 529 for a full queue or a model that cannot
start now).  The key comes in C{x-api-key} or C{Authorization: Bearer}; C{anthropic-version}
and C{anthropic-beta} are accepted whatever they say.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Callable

from attrs import define, field
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from tabbyproxy.config import Profile
from tabbyproxy.messageswire import (
    CHAT_PATH,
    ENCODE_PATH,
    PING,
    MessageEncoder,
    MessagesRequestError,
    chatMessages,
    translateRequest,
)
from tabbyproxy.responseswire import sseFrame
from tabbyproxy.routes.common import (
    ANTHROPIC,
    ClientError,
    ProxyState,
    RouteTable,
    readJSONObject,
    registerErrorAnswers,
    takeKeepAlive,
    writeJSON,
)
from tabbyproxy.routes.loading import LoadingTicks, startEventStream
from tabbyproxy.routes.translated import TranslatedStream, relayChat, requestedModel
from tabbyproxy.server import noteModel, noteUsage, requestIdOf
from tabbyproxy.scheduler import SchedulingError
from tabbyproxy.template import applyRequestDefaults, applySystemPrompt
from tabbyproxy.upstream import UpstreamAnswered, UpstreamUnreachable

_PING_FRAME = sseFrame(PING)

_Stream = TranslatedStream[MessageEncoder]


@define
class MessagesRoutes:
    """
    The C{/v1/messages} routes, and C{/v1/models} as Anthropic lists models.
    """

    app = RouteTable()
    registerErrorAnswers(app, ANTHROPIC)
    log = Logger()

    state: ProxyState
    now: Callable[[], datetime] = field(default=datetime.now)

    @app.route("/v1/messages", methods=["POST"])
    async def create(self, request: IRequest) -> bytes | None:
        self.state.requireKey(request)
        body = readJSONObject(request, self.state.maxBodySize)
        name, profile = self._profileFor(body)
        noteModel(request, profile.id)
        keepAlive = takeKeepAlive(body)
        try:
            translated = translateRequest(body)
        except MessagesRequestError as e:
            raise ClientError(400, e.message) from e
        if translated.ignored:
            self.log.debug("Ignored what TabbyAPI has no meaning for in a message for {model}: {ignored}",
                           model=profile.id, ignored=", ".join(translated.ignored))
        upstream = translated.upstream
        upstream["messages"] = applySystemPrompt(upstream["messages"], profile.template, self.now)
        applyRequestDefaults(upstream, profile.template)
        relay = _Stream(request, MessageEncoder(name), translated.stream)
        payload = json.dumps(upstream).encode("utf-8")
        if translated.stream:
            await self._stream(request, relay, profile, keepAlive, payload)
            return None
        await self._generate(request, relay, profile, keepAlive, payload)
        return writeJSON(request, 200, relay.encoder.message())

    @app.route("/v1/messages/count_tokens", methods=["POST"])
    async def countTokens(self, request: IRequest) -> bytes:
        """
        C{{"input_tokens": N}}: the templated messages counted by TabbyAPI's own tokenizer.
        """
        self.state.requireKey(request)
        body = readJSONObject(request, self.state.maxBodySize)
        _, profile = self._profileFor(body)
        noteModel(request, profile.id)
        keepAlive = takeKeepAlive(body)
        try:
            messages = chatMessages(body, [])
        except MessagesRequestError as e:
            raise ClientError(400, e.message) from e
        messages = applySystemPrompt(messages, profile.template, self.now)
        lease = await self.state.scheduler.acquire(profile, keepAlive)
        try:
            upstream = self.state.upstream
            response = await upstream.call(lease, "POST", ENCODE_PATH, json.dumps({"text": messages}).encode("utf-8"))
            raw = await upstream.read(response)
        finally:
            lease.release()
        try:
            counted = json.loads(raw)
            length = counted["length"] if "length" in counted else len(counted["tokens"])
        except (ValueError, KeyError, TypeError) as e:
            raise UpstreamAnswered(502, f"TabbyAPI's token count is not one: {raw[:200]!r}") from e
        return writeJSON(request, 200, {"input_tokens": int(length)})

    def _profileFor(self, body: dict[str, Any]) -> tuple[str, Profile]:
        return requestedModel(
            self.state.catalog(), body, "model: Field required (GET /v1/models lists the available ids)",
            "model: {name} not found (GET /v1/models lists the available ids)")

    async def _generate(self, request: IRequest, relay: _Stream, profile: Profile, keepAlive: float | None,
                        payload: bytes) -> None:
        """
        A non-streamed message: errors are raised, for Anthropic's error document.
        """
        lease = await self.state.scheduler.acquire(profile, keepAlive)
        try:
            problem = await relayChat(self.state.upstream, relay, lease, CHAT_PATH, payload)
        finally:
            lease.release()
        if problem is not None:
            raise UpstreamAnswered(502, problem)
        relay.encoder.finish()
        noteUsage(request, relay.encoder.inputTokens, relay.encoder.outputTokens)

    async def _stream(self, request: IRequest, relay: _Stream, profile: Profile, keepAlive: float | None,
                      payload: bytes) -> None:
        """
        A streamed message: once C{message_start} went out, whatever goes wrong ends the stream
        with an C{error} event.
        """
        startEventStream(request)
        encoder = relay.encoder
        relay.send(encoder.start())
        # A ping every few seconds until the first token: while the model loads, and while
        # TabbyAPI reads a long prompt (an agent's first one is tens of thousands of tokens).
        pings = relay.ticks = LoadingTicks(request, self.state.clock, lambda waited: _PING_FRAME, now=False)
        try:
            problem = await self._generateStreamed(request, relay, profile, keepAlive, payload)
        finally:
            pings.stop()
        if problem is not None:
            self._failed(request, relay, profile.id, *problem)
            return
        relay.send(encoder.finish())
        noteUsage(request, encoder.inputTokens, encoder.outputTokens)

    async def _generateStreamed(self, request: IRequest, relay: _Stream, profile: Profile, keepAlive: float | None,
                                payload: bytes) -> tuple[str, str] | None:
        """
        @return: what went wrong and its Anthropic error type, C{None} when the answer is whole.
        """
        try:
            lease = await self.state.scheduler.acquire(profile, keepAlive)
        except SchedulingError as e:
            return str(e), "overloaded_error"
        try:
            problem = await relayChat(self.state.upstream, relay, lease, CHAT_PATH, payload)
        except (UpstreamAnswered, UpstreamUnreachable) as e:
            problem = str(e)
        finally:
            lease.release()
        return None if problem is None else (problem, "api_error")

    def _failed(self, request: IRequest, relay: _Stream, model: str, problem: str, kind: str) -> None:
        self.log.error("A message for {model} failed: {problem}", model=model, problem=problem,
                       request_id=requestIdOf(request))
        relay.send(relay.encoder.fail(problem, kind))

    # -- Anthropic's model list

    @app.route("/v1/models", methods=["GET"])
    def models(self, request: IRequest) -> bytes:
        self.state.requireKey(request)
        cards = [self._card(profile) for profile in self.state.catalog()]
        return writeJSON(request, 200, {
            "data": cards, "has_more": False,
            "first_id": cards[0]["id"] if cards else None, "last_id": cards[-1]["id"] if cards else None,
        })

    @app.route("/v1/models/<path:name>", methods=["GET"])
    def model(self, request: IRequest, name: str) -> bytes:
        self.state.requireKey(request)
        profile = self.state.catalog().resolve(name)
        if profile is None:
            raise ClientError(404, f"model: {name} not found")
        return writeJSON(request, 200, self._card(profile))

    @staticmethod
    def _card(profile: Profile) -> dict[str, Any]:
        try:
            created = profile.path.stat().st_mtime
        except OSError:
            created = 0.0
        createdAt = datetime.fromtimestamp(int(created), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"type": "model", "id": profile.id, "display_name": profile.id, "created_at": createdAt,
                "lifecycle": "active"}
