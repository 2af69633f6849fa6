"""
The Ollama API: the C{/api/*} routes that let Ollama clients (Open WebUI, Enchanted, Continue,
VS Code Copilot, the C{ollama} package) use TabbyAPI models through the proxy.

C{/api/chat} and C{/api/generate} start the model their body names, like the OpenAI routes, and
translate TabbyAPI's server-sent events into Ollama's NDJSON lines as they arrive (see
L{tabbyproxy.ollamawire} for the wire format).  TabbyAPI is always asked for a stream, with
usage; a C{stream: false} request gets the translator's aggregate of that stream as one object,
so its metrics are measured the same way.  C{/api/tags}, C{/api/show} and C{/api/ps} describe
the profiles and the running model; C{/api/embed} and C{/api/embeddings} go to TabbyAPI's
C{/v1/embeddings}.  The routes that manage model files answer 501.

Errors are C{{"error": "..."}} with the right status before a stream starts, and one last
NDJSON line C{{"error": "..."}} after.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Callable, Literal

from attrs import define, field
from twisted.logger import Logger
from twisted.web.iweb import IRequest, IResponse

from tabbyproxy.config import Profile
from tabbyproxy.template import applyRequestDefaults, applySystemPrompt
from tabbyproxy.modelinfo import capabilities, hasEmbeddings, psEntry, showReply, tagsEntry
from tabbyproxy.ollamawire import (
    EMBEDDINGS_PATH,
    ENCODE_PATH,
    OllamaRequestError,
    StreamTranslator,
    UpstreamError,
    UpstreamRequest,
    What,
    canDrop,
    chatRequest,
    contextExcess,
    embedDimensions,
    embeddingsPrompt,
    embeddingsReply,
    embeddingsUpstreamBody,
    embedInputs,
    embedReply,
    encodedLength,
    encodeRequest,
    fittingStart,
    generateRequest,
    isEmptyRequest,
    keptMessages,
    loadReply,
    promptTooLong,
    topLogprobs,
    unloadReply,
    upstreamEmbeddings,
)
from tabbyproxy.routes.common import (
    PLAIN,
    ClientError,
    ProxyState,
    RouteTable,
    errorLine,
    ndjsonLine,
    readJSONObject,
    registerErrorAnswers,
    takeKeepAlive,
    writeJSON,
)
from tabbyproxy.server import noteModel, requestIdOf
from tabbyproxy.child import ChildState
from tabbyproxy.scheduler import Lease
from tabbyproxy.tabbywire import ChatStreamDecoder
from tabbyproxy.upstream import UpstreamAnswered, UpstreamBroken

OLLAMA_VERSION = "0.12.11"
"""
What C{/api/version} answers: the newest Ollama version whose API the emulation matches (0.12.11
added C{logprobs}), plain and numeric: VS Code Copilot wants at least 0.6.4, and clients parse
each part as a number.
"""

NOT_MANAGED = (
    "tabbyproxy does not manage model files: add a profile under config/ and the model folder "
    "under TabbyAPI's model_dir"
)

NDJSON = b"application/x-ndjson"

_CUTS = 2
"""
How many times a conversation TabbyAPI refuses as too long is cut and sent again: TabbyAPI
checks two limits (C{max_seq_len}, then the cache the first job allocates) and names only the
first that fails, so a cut that satisfies the first may meet the second.
"""


@define
class _StreamRelay:
    """
    Reads TabbyAPI's event stream for one generation: its events go through the translator,
    and the lines it makes are written to the client at once when streaming.

    @ivar error: what went wrong in the stream (TabbyAPI's error event, or a broken stream).
    """

    request: IRequest
    translator: StreamTranslator
    streaming: bool
    decoder: ChatStreamDecoder = field(factory=ChatStreamDecoder)
    error: str | None = None

    def dataReceived(self, data: bytes) -> None:
        events = self.decoder.feed(data)
        if not self.streaming:
            self.translator.feed(events)
            return
        lines = self.translator.feedNDJSON(events)
        if lines:
            # One write per read from TabbyAPI, however many tokens it carried.
            self.request.write(lines)

    def write(self, document: object) -> None:
        self.request.write(ndjsonLine(document))


@define
class OllamaRoutes:
    """
    The C{/api/*} routes.
    """

    app = RouteTable()
    registerErrorAnswers(app, PLAIN)
    log = Logger()

    state: ProxyState
    now: Callable[[], datetime] = field(default=datetime.now)

    def _seconds(self) -> float:
        seconds: float = self.state.clock.seconds()
        return seconds

    # -- what is there

    @app.route("/api/version", methods=["GET", "HEAD"])
    def version(self, request: IRequest) -> bytes:
        # Without a key, as Ollama: clients check it before they know they need one.
        return writeJSON(request, 200, {"version": OLLAMA_VERSION})

    @app.route("/api/tags", methods=["GET", "HEAD"])
    def tags(self, request: IRequest) -> bytes:
        self.state.requireListingKey(request)
        install = self.state.install
        profiles = sorted(self.state.catalog(), key=lambda profile: profile.id)
        return writeJSON(
            request, 200,
            {"models": [tagsEntry(profile, install.modelDirectory(profile)) for profile in profiles]},
        )

    @app.route("/api/show", methods=["POST"])
    def show(self, request: IRequest) -> bytes:
        self.state.requireListingKey(request)
        body = readJSONObject(request, self.state.maxBodySize)
        # Continue still sends the deprecated "name".
        if body.get("model") is None and body.get("name") is not None:
            body["model"] = body["name"]
        _, profile = self._profileFor(body)
        return writeJSON(request, 200, showReply(profile, self.state.install.modelDirectory(profile)))

    @app.route("/api/ps", methods=["GET"])
    def ps(self, request: IRequest) -> bytes:
        self.state.requireKey(request)
        models = []
        for running in self.state.scheduler.snapshot():
            # A stopping model will never answer again: a client that just unloaded it (or a swap
            # that is under way) should not see it as loaded.
            if running.state is not ChildState.STOPPING:
                folder = self.state.install.modelDirectory(running.profile)
                models.append(psEntry(running.profile, folder, running.expiresAt, vram=running.memoryTotal))
        return writeJSON(request, 200, {"models": models})

    # -- generation

    @app.route("/api/chat", methods=["POST"])
    async def chat(self, request: IRequest) -> bytes | None:
        return await self._generate(request, "chat")

    @app.route("/api/generate", methods=["POST"])
    async def generate(self, request: IRequest) -> bytes | None:
        return await self._generate(request, "generate")

    async def _generate(self, request: IRequest, what: What) -> bytes | None:
        startedAt = self._seconds()
        body, name, profile, keepAlive = self._modelRequest(request)
        streaming = self._streaming(body)
        upstreamRequest = self._translate(what, body, profile)
        self._requireCapabilities(body, name, profile)
        if upstreamRequest.ignoredOptions:
            self.log.debug(
                "Ignored options with no TabbyAPI equivalent for {model}: {options}",
                model=profile.id, options=dict(upstreamRequest.ignoredOptions),
            )
        if isEmptyRequest(what, body):
            return await self._loadOrUnload(request, what, name, profile, keepAlive)
        lease = await self.state.scheduler.acquire(profile, keepAlive)
        try:
            translator = StreamTranslator(
                what=what, modelName=name, clock=self._seconds, startedAt=startedAt,
                loadDuration=lease.waited, topLogprobs=topLogprobs(body),
            )
            return await self._relay(request, lease, upstreamRequest, translator, streaming)
        finally:
            lease.release()

    def _modelRequest(self, request: IRequest) -> tuple[dict[str, Any], str, Profile, float | None]:
        """
        What every request that names a model is checked for: the key, a JSON object body,
        the model (as sent, and its profile) and C{keep_alive}.

        @raise ClientError: for the first thing that is wrong.
        """
        self.state.requireKey(request)
        body = readJSONObject(request, self.state.maxBodySize)
        name, profile = self._profileFor(body)
        noteModel(request, profile.id)
        return body, name, profile, takeKeepAlive(body)

    def _profileFor(self, body: dict[str, Any]) -> tuple[str, Profile]:
        """
        The model name as the client sent it, and its profile.
        """
        name = body.get("model")
        if name is None or name == "":
            raise ClientError(400, "model is required")
        if not isinstance(name, str):
            raise ClientError(400, "model must be a string")
        profile = self.state.catalog().resolve(name)
        if profile is None:
            raise ClientError(404, f"model '{name}' not found")
        return name, profile

    def _requireCapabilities(self, body: dict[str, Any], name: str, profile: Profile) -> None:
        """
        Refuse what the model cannot do, as Ollama does, so clients can fall back (to a prompt
        without tools, say): C{tools}, C{think} (unless false) and a C{suffix}.

        @raise ClientError: 400 C{"NAME" does not support tools} (or C{thinking}, C{insert}).
        """
        wanted = [capability for capability, asked in (
            ("tools", bool(body.get("tools"))),
            ("thinking", body.get("think") not in (None, False)),
            ("insert", bool(body.get("suffix"))),
        ) if asked]
        if not wanted:
            return
        available = capabilities(profile, self.state.install.modelDirectory(profile))
        for capability in wanted:
            if capability not in available:
                raise ClientError(400, f"{json.dumps(name)} does not support {capability}")

    @staticmethod
    def _streaming(body: dict[str, Any]) -> bool:
        value = body.get("stream")
        if value is None:
            return True  # Ollama streams unless told not to.
        if not isinstance(value, bool):
            raise ClientError(400, "stream must be true or false")
        return value

    def _translate(self, what: What, body: dict[str, Any], profile: Profile) -> UpstreamRequest:
        """
        The TabbyAPI request for an Ollama body, with the profile's template applied: its
        sampler defaults where the request set nothing, and its system prompt in front of
        chat-templated messages.
        """
        try:
            upstreamRequest = chatRequest(body) if what == "chat" else generateRequest(body)
        except OllamaRequestError as e:
            raise ClientError(400, str(e)) from e
        upstreamBody = upstreamRequest.body
        template = profile.template
        if upstreamRequest.profileSystem:
            upstreamBody["messages"] = applySystemPrompt(upstreamBody["messages"], template, self.now)
        applyRequestDefaults(upstreamBody, template)
        return upstreamRequest

    async def _loadOrUnload(
        self, request: IRequest, what: What, name: str, profile: Profile, keepAlive: float | None
    ) -> bytes:
        """
        An empty request: load the model and say so, or with C{keep_alive: 0} unload it
        without loading it first.  One JSON object, even when the client asked for a stream.
        """
        scheduler = self.state.scheduler
        if keepAlive == 0:
            # Like Ollama, answer at once; the child stops now if idle, else after its last
            # request.  The Deferred only says when it has exited.
            if scheduler.runningModel(profile.id) is not None:
                self.log.info("Unloading {model}: an empty request asked with keep_alive 0", model=profile.id)
            scheduler.unloadIdle(profile)
            return writeJSON(request, 200, unloadReply(what, name, self._seconds))
        lease = await scheduler.acquire(profile, keepAlive)
        lease.release()
        return writeJSON(request, 200, loadReply(what, name, self._seconds))

    async def _relay(
        self,
        request: IRequest,
        lease: Lease,
        upstreamRequest: UpstreamRequest,
        translator: StreamTranslator,
        streaming: bool,
    ) -> bytes | None:
        response = await self._send(request, lease, upstreamRequest)
        relay = _StreamRelay(request, translator, streaming)
        if streaming:
            request.setResponseCode(200)
            request.setHeader(b"Content-Type", NDJSON)
        try:
            await self.state.upstream.pipe(response, request, relay.dataReceived)
        except UpstreamBroken as e:
            relay.error = f"{e} (model {lease.profile.id}); see GET /status"
        if relay.error is None:
            relay.error = relay.decoder.error
        if relay.error is None and not relay.decoder.complete:
            relay.error = f"TabbyAPI's stream for {lease.profile.id} ended before it was complete"
        if relay.error is not None:
            # TabbyAPI's own error event (or a broken stream): its /health may be 503 for good now.
            lease.suspect()
            self.log.error("TabbyAPI's stream for {model} failed: {problem}", model=lease.profile.id,
                           problem=relay.error, request_id=requestIdOf(request))
            if streaming:
                relay.write(errorLine(relay.error))
                return None
            return writeJSON(request, 502, errorLine(relay.error))
        if streaming:
            relay.write(translator.finish())
            return None
        return writeJSON(request, 200, translator.aggregate())

    async def _send(self, request: IRequest, lease: Lease, upstreamRequest: UpstreamRequest) -> IResponse:
        """
        Send the generation to TabbyAPI; when TabbyAPI refuses a conversation as too long for
        the context, drop its oldest messages as Ollama does (unless C{truncate: false}) and
        send it again.

        The proxy counts only after TabbyAPI refused, rather than before every request: TabbyAPI
        checks the prompt before it streams anything (a 400, so the client sees nothing of the
        first try), a conversation that fits (nearly all) costs nothing more, and the refusal
        carries TabbyAPI's own figures, from its template, its tokenizer, the images and its
        rule for the room an answer needs (the cache must hold the prompt and one chunk, or the
        prompt and C{num_predict} without output chunking).  A cheap bound from the prompt's
        bytes would be no bound: templates add system prompts, dates and tool schemas the
        messages do not hold, and an image is hundreds of tokens whatever its size.

        @raise ClientError: 400 when the conversation does not fit even truncated.
        @raise UpstreamAnswered: TabbyAPI's refusal as it came with C{truncate: false}, when
            TabbyAPI could not count, or when it refused anything else.
        """
        upstream = self.state.upstream
        body = upstreamRequest.body
        cuts = 0
        while True:
            payload = json.dumps(body).encode("utf-8")
            try:
                return await upstream.call(lease, "POST", upstreamRequest.path, payload)
            except UpstreamAnswered as refusal:
                excess = contextExcess(refusal.message) if refusal.status == 400 else None
                if excess is None or not upstreamRequest.truncate or cuts == _CUTS:
                    raise
                cuts += 1
                body = {**body, "messages": await self._cut(request, lease, body, excess, refusal)}

    async def _cut(
        self, request: IRequest, lease: Lease, body: dict[str, Any], excess: int, refusal: UpstreamAnswered
    ) -> list[Any]:
        """
        The messages of C{body} that fit once the prompt is C{excess} tokens shorter: Ollama's
        rule, the candidates counted by TabbyAPI's tokenizer.

        @raise ClientError: 400 when nothing can be dropped or even the system messages and the
            latest message do not fit.
        @raise UpstreamAnswered: C{refusal}, when TabbyAPI could not count.
        """
        messages = body.get("messages")
        if not isinstance(messages, list) or not canDrop(messages):
            raise ClientError(400, promptTooLong(refusal.message))
        upstream = self.state.upstream

        async def count(kept: Any) -> int:
            payload = json.dumps(encodeRequest(body, kept)).encode("utf-8")
            response = await upstream.call(lease, "POST", ENCODE_PATH, payload)
            return encodedLength(json.loads(await upstream.read(response)))

        try:
            # The whole and a candidate, counted the same way, differ by the tokens of the
            # messages dropped; so the limit is the whole's count less the excess, although the
            # encode route leaves out the generation prompt that TabbyAPI's figures include.
            start = await fittingStart(messages, await count(messages) - excess, count)
        except (UpstreamAnswered, UpstreamError, ValueError) as e:
            self.log.warn("Could not count {model}'s conversation to truncate it: {problem}",
                          model=lease.profile.id, problem=str(e), request_id=requestIdOf(request))
            raise refusal from e
        if start is None:
            raise ClientError(400, promptTooLong(refusal.message))
        kept = keptMessages(messages, start)
        self.log.info("Dropped the {dropped} oldest of {total} messages for {model}'s context: {refusal}",
                      dropped=len(messages) - len(kept), total=len(messages), model=lease.profile.id,
                      refusal=refusal.message, request_id=requestIdOf(request))
        return kept

    # -- embeddings

    @app.route("/api/embed", methods=["POST"])
    async def embed(self, request: IRequest) -> bytes:
        return await self._embed(request, "embed")

    @app.route("/api/embeddings", methods=["POST"])
    async def embeddings(self, request: IRequest) -> bytes:
        return await self._embed(request, "embeddings")

    async def _embed(self, request: IRequest, shape: Literal["embed", "embeddings"]) -> bytes:
        startedAt = self._seconds()
        body, name, profile, keepAlive = self._modelRequest(request)
        try:
            texts = embedInputs(body) if shape == "embed" else embeddingsPrompt(body)
            dimensions = embedDimensions(body) if shape == "embed" else None
        except OllamaRequestError as e:
            raise ClientError(400, str(e)) from e
        if not hasEmbeddings(profile):
            # TabbyAPI would load the model only to answer that it has no embedding model.
            raise ClientError(400, f"{json.dumps(name)} does not support embedding")
        lease = await self.state.scheduler.acquire(profile, keepAlive)
        try:
            vectors: list[list[float]] = []
            promptTokens = 0
            if texts:
                # Nothing to embed only loads the model, as in Ollama.
                payload = json.dumps(embeddingsUpstreamBody(texts)).encode("utf-8")
                response = await self.state.upstream.call(lease, "POST", EMBEDDINGS_PATH, payload)
                raw = await self.state.upstream.read(response)
                try:
                    vectors, promptTokens = upstreamEmbeddings(json.loads(raw), len(texts))
                except (ValueError, UpstreamError) as e:
                    self.log.error("TabbyAPI for {model} answered embeddings badly: {problem}", model=profile.id,
                                   problem=str(e), request_id=requestIdOf(request))
                    return writeJSON(request, 502, errorLine(f"TabbyAPI for {profile.id} answered embeddings badly: {e}"))
        finally:
            lease.release()
        if shape == "embeddings":
            return writeJSON(request, 200, embeddingsReply(vectors))
        return writeJSON(
            request, 200,
            embedReply(name, vectors, self._seconds() - startedAt, lease.waited, promptTokens, dimensions),
        )

    # -- model files, which TabbyAPI's model_dir holds

    @app.route("/api/pull", endpoint="pull")
    @app.route("/api/push", endpoint="push")
    @app.route("/api/create", endpoint="create")
    @app.route("/api/copy", endpoint="copy")
    @app.route("/api/delete", endpoint="delete")
    @app.route("/api/blobs/<path:digest>", endpoint="blobs")
    def notManaged(self, request: IRequest, digest: str = "") -> bytes:
        self.state.requireKey(request)
        return writeJSON(request, 501, errorLine(NOT_MANAGED))
