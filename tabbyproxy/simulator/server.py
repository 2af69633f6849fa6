"""
The simulated TabbyAPI server: its state (loaded model, keys, health), its routes and their
answers, model load and unload, and shutdown on a signal.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import struct
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from attrs import define, field, frozen

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
)
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tabbyproxy.simulator.config import DEFAULT_SEQ_LEN, SimulatorConfig
from tabbyproxy.simulator.console import Console
from tabbyproxy.simulator.generation import (
    Piece, Plan, chatPrompt, completionLogprobs, contextProblem, decodeTokens, embeddingVector, encodeText, messageText,
    planGeneration, requestedLogprobs, requestedMaxTokens, tokenLogprob, usageObject, wordCount,
)
from tabbyproxy.simulator.httpwire import HTTPError, SimulatorSite, detail, dumpJson, parseBody, requireObject, sseEvent, startEventStream, startResponse, validateSampler
from tabbyproxy.simulator.keys import AuthKeys
from tabbyproxy.simulator.knobs import crashNow
from tabbyproxy.simulator.streaming import EventStream, Generation, TokenProducer
from tabbyproxy.simulator.values import JSON, asBool

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SERVICE_INFO: JSON = {
    "version": 0.1,
    "software": {
        "name": "TabbyAPI",
        "repository": "https://github.com/theroyallab/tabbyAPI",
        "homepage": "https://github.com/theroyallab/tabbyAPI",
    },
    "api": {
        "openai": {
            "name": "OpenAI API",
            "relative_url": "/v1",
            "documentation": "https://theroyallab.github.io/tabbyAPI",
            "version": 1,
        },
        "koboldai": {
            "name": "KoboldAI API",
            "relative_url": "/api",
            "documentation": "https://theroyallab.github.io/tabbyAPI",
            "version": 1,
        },
    },
}

NO_MODEL = "No models are currently loaded."


@frozen
class LoadedModel:
    """
    The model the simulated container holds.
    """

    name: str
    path: Path
    maxSeqLen: int


@define
class Simulator:
    """
    The simulated TabbyAPI: its state (loaded model, keys, health) and its HTTP routes.
    """

    reactor: Any
    config: SimulatorConfig
    cwd: Path
    console: Console
    model: LoadedModel | None = None
    auth: AuthKeys = field(factory=lambda: AuthKeys([], "", True))
    healthIssues: list[JSON] = field(factory=list)
    generationCount: int = 0
    generations: dict[str, Generation] = field(factory=dict)
    port: IListeningPort | None = None
    exitCode: int = 0
    loadError: BaseException | None = None
    shuttingDown: bool = False

    # ---- start-up and shutdown -------------------------------------------------------------

    def choosePort(self) -> int | None:
        """
        TabbyAPI's start-up port check: a busy port moves the server to port+1, and if that
        one is busy too it gives up and exits 0 without serving.
        """
        port = self.config.port
        if not portInUse(self.config.host, port):
            return port
        if not portInUse(self.config.host, port + 1):
            self.console.warning(f"Port {port} is currently in use. Switching to {port + 1}.")
            return port + 1
        self.console.error(
            f"Ports {port} and {port + 1} are in use by other programs. "
            "Please free one of them or change the port in config.yml."
        )
        return None

    def begin(self) -> None:
        """
        Run start-up: port check, the (simulated) model load, keys, then listening.
        """
        port = self.choosePort()
        if port is None:
            self.reactor.stop()
            return
        knobs = self.config.knobs
        if self.config.modelName is not None:
            path = (self.config.modelDir / self.config.modelName).resolve()
            self.console.info("Attempting to load a prompt template if present.")
            self.console.info('Using template "chatml" for chat completions.')
            self.console.info(f"Loading model: {path}")
        if knobs.hangAtStart:
            return
        self.reactor.callLater(knobs.loadTime, self.finishStartup, port)

    def finishStartup(self, port: int) -> None:
        if self.shuttingDown:
            return
        if self.config.modelName is not None or self.config.knobs.failLoad:
            try:
                self.model = self.loadModel(self.config.modelName, self.config.knobs.failLoad)
            except ValueError as e:
                # Re-raised after the reactor stops, so Python prints the real traceback and
                # exits 1, exactly as an uncaught load failure does in TabbyAPI.
                self.loadError = e
                self.reactor.stop()
                return
            self.console.info("Model successfully loaded.")
        if self.config.embeddingModelName:
            self.console.info(f"Loading embedding model: {self.config.embeddingModelName}")
            self.console.info("Embedding model successfully loaded.")
        self.auth = AuthKeys.load(self.cwd, self.config.disableAuth, self.console)
        self.console.info("Generation logging is disabled")
        try:
            self.port = self.reactor.listenTCP(
                port, SimulatorSite(self.resource(), self.console), interface=self.config.host
            )
        except CannotListenError as e:
            self.console.error(f"[Errno 98] error while attempting to bind on address: {e}")
            self.exitCode = 1
            self.reactor.stop()
            return
        base = f"http://{self.config.host}:{port}"
        self.console.info(f"Developer documentation: {base}/redoc")
        self.console.info("Starting OAI API")
        self.console.info(f"Completions: {base}/v1/completions")
        self.console.info(f"Chat completions: {base}/v1/chat/completions")
        self.console.info(f"Started server process [{os.getpid()}]")
        self.console.info("Waiting for application startup.")
        self.console.info("Application startup complete.")
        self.console.info(f"Uvicorn running on {base} (Press CTRL+C to quit)")

    def loadModel(self, name: str | None, forceFailure: bool = False) -> LoadedModel:
        """
        "Load" a model: its folder must hold config.json, as HFModel.from_directory requires.
        """
        path = (self.config.modelDir / (name or "")).resolve()
        try:
            if forceFailure:
                raise RuntimeError("Simulated load failure (simulator.fail_load is set)")
            with (path / "config.json").open(encoding="utf8") as f:
                hfConfig = json.load(f)
        except (OSError, RuntimeError, json.JSONDecodeError) as exc:
            raise ValueError(f"Failed to load config.json from {path}") from exc
        maxSeqLen = self.config.maxSeqLen
        if maxSeqLen is None or maxSeqLen == -1:
            maxSeqLen = int(hfConfig.get("max_position_embeddings") or DEFAULT_SEQ_LEN) \
                if isinstance(hfConfig, dict) else DEFAULT_SEQ_LEN
        return LoadedModel(name=path.name, path=path, maxSeqLen=maxSeqLen)

    def onSignal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.config.knobs.ignoreSigterm:
            self.console.warning(f"Received {name}; ignoring it (simulator.ignore_sigterm).")
            return
        if self.shuttingDown:
            return
        self.shuttingDown = True
        if self.port is not None:
            self.console.info("Shutting down")
            for generation in list(self.generations.values()):
                if generation.producer is not None:
                    generation.producer.stopProducing()
                if generation.shutdown is not None:
                    generation.shutdown()
            self.port.stopListening()
            self.console.info("Waiting for application shutdown.")
            self.console.info("Application shutdown complete.")
            self.console.info(f"Finished server process [{os.getpid()}]")
        self.console.warning("Shutdown signal called. Exiting gracefully.")
        self.exitCode = 0
        self.reactor.stop()

    # ---- routing ----------------------------------------------------------------------------

    def resource(self) -> Resource:
        return SimulatorResource(self)

    def routes(self) -> dict[str, dict[str, Callable[[Request], bytes | int]]]:
        return {
            "/health": {"GET": self.health},
            "/.well-known/serviceinfo": {"GET": self.serviceInfo},
            "/v1/models": {"GET": self.listModels},
            "/v1/model/list": {"GET": self.listModels},
            "/v1/model": {"GET": self.currentModel},
            "/v1/model/load": {"POST": self.loadModelRoute},
            "/v1/model/unload": {"POST": self.unloadModel},
            "/v1/auth/permission": {"GET": self.authPermission},
            "/v1/chat/completions": {"POST": self.chatCompletions},
            "/v1/completions": {"POST": self.completions},
            "/v1/embeddings": {"POST": self.embeddings},
            "/v1/token/encode": {"POST": self.encode},
            "/v1/token/decode": {"POST": self.decode},
        }

    def dispatch(self, request: Request) -> bytes | int:
        path = request.path.decode("latin-1")
        method = request.method.decode("latin-1")
        handlers = self.routes().get(path)
        try:
            if handlers is None:
                raise detail(404, "Not Found")
            handler = handlers.get(method)
            if handler is None:
                request.setHeader("allow", ", ".join(handlers))
                raise detail(405, "Method Not Allowed")
            return handler(request)
        except HTTPError as e:
            if e.logged:
                self.console.error(f"Sent to request: {e.body['detail']}")
            return self.respond(request, e.code, e.body)

    def respond(self, request: Request, code: int, body: Any) -> bytes:
        startResponse(request, code, "application/json")
        return dumpJson(body)

    def requireApi(self, request: Request) -> None:
        problem = self.auth.checkApiKey(request)
        if problem is not None:
            raise detail(401, problem)

    def requireAdmin(self, request: Request) -> None:
        problem = self.auth.checkAdminKey(request)
        if problem is not None:
            raise detail(401, problem)

    def requireModel(self) -> LoadedModel:
        if self.model is None:
            raise detail(503, NO_MODEL, logged=True)
        return self.model

    # ---- simple routes -------------------------------------------------------------------

    def health(self, request: Request) -> bytes:
        if self.healthIssues:
            return self.respond(request, 503, {"status": "unhealthy", "issues": self.healthIssues})
        return self.respond(request, 200, {"status": "healthy", "issues": []})

    def serviceInfo(self, request: Request) -> bytes:
        return self.respond(request, 200, SERVICE_INFO)

    def modelCard(self, name: str, parameters: JSON | None = None) -> JSON:
        return {"id": name, "object": "model", "created": int(time.time()),
                "owned_by": "tabbyAPI", "logging": None, "parameters": parameters}

    def listModels(self, request: Request) -> bytes:
        self.requireApi(request)
        if self.auth.permission(request) == "admin":
            names = sorted(p.name for p in self.config.modelDir.iterdir() if p.is_dir()) \
                if self.config.modelDir.is_dir() else []
        else:
            names = [self.model.name] if self.model is not None else []
        return self.respond(request, 200, {"object": "list",
                                           "data": [self.modelCard(n) for n in names]})

    def currentModel(self, request: Request) -> bytes:
        self.requireApi(request)
        model = self.requireModel()
        c = self.config
        parameters = {
            "max_seq_len": model.maxSeqLen,
            "cache_size": c.cacheSize or model.maxSeqLen,
            "cache_mode": c.cacheMode,
            "rope_scale": 1.0,
            "rope_alpha": 1.0,
            "max_batch_size": c.maxBatchSize or 256,
            "chunk_size": c.chunkSize,
            "prompt_template": c.promptTemplate or "chatml",
            "prompt_template_content": CHATML_TEMPLATE,
            "use_vision": False,
            "draft": None,
        }
        return self.respond(request, 200, self.modelCard(model.name, parameters))

    def authPermission(self, request: Request) -> bytes:
        self.requireApi(request)
        permission = self.auth.permission(request)
        if permission is None:
            raise detail(400, "The provided authentication key is invalid.", logged=True)
        return self.respond(request, 200, {"permission": permission})

    def unloadModel(self, request: Request) -> bytes:
        self.requireAdmin(request)
        self.requireModel()
        # skip_wait: running jobs are cancelled rather than waited for.
        for generation in list(self.generations.values()):
            if generation.abort is not None:
                generation.abort()
        self.model = None
        self.console.info("Model unloaded.")
        return self.respond(request, 200, None)

    def loadModelRoute(self, request: Request) -> bytes | int:
        """
        POST /v1/model/load: SSE progress events, a "finished" event, and no [DONE].
        """
        body = requireObject(parseBody(request))
        self.requireAdmin(request)
        name = body.get("model_name")
        if not name:
            raise detail(400, "A model name was not provided for load.", logged=True)
        if not (self.config.modelDir / str(name)).is_dir():
            raise detail(400, "Could not find the model path for load. Check model name or "
                              "config.yml?", logged=True)
        startEventStream(request)
        already = self.model is not None and self.model.name == str(name)
        modules = 1 if already else 4
        if not already:
            self.model = None
        step = 0.0 if already else self.config.knobs.loadTime / modules
        state = {"module": 0}

        def progress() -> None:
            if request.finished or request.channel is None:
                return
            state["module"] += 1
            module = state["module"]
            event = {"model_type": "model", "module": module, "modules": modules,
                     "status": "processing"}
            request.write(sseEvent(event))
            if module < modules:
                self.reactor.callLater(step, progress)
                return
            if not already:
                try:
                    self.model = self.loadModel(str(name))
                except ValueError as e:
                    request.write(sseEvent({"error": {"message": str(e), "trace": None}}))
                    request.finish()
                    return
                self.console.info("Model successfully loaded.")
            request.write(sseEvent(dict(event, status="finished")))
            request.finish()

        self.console.info(f"Loading model: {(self.config.modelDir / str(name)).resolve()}")
        self.reactor.callLater(step, progress)
        return NOT_DONE_YET

    def embeddings(self, request: Request) -> bytes:
        body = requireObject(parseBody(request))
        self.requireApi(request)
        validateSampler(body, ["input"])
        if not self.config.embeddingModelName:
            raise detail(503, "No embedding models are currently loaded.", logged=True)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = []
        for index, text in enumerate(inputs):
            vector = embeddingVector(str(text))
            encoded: Any = vector
            if body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": encoded, "index": index})
        tokens = sum(wordCount(str(t)) for t in inputs)
        return self.respond(request, 200, {
            "object": "list", "data": data, "model": self.config.embeddingModelName,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        })

    def encode(self, request: Request) -> bytes:
        body = requireObject(parseBody(request))
        self.requireApi(request)
        validateSampler(body, ["text"])
        self.requireModel()
        text = body["text"]
        if isinstance(text, list):
            # Messages go through the chat template, without the generation prompt, as
            # TabbyAPI's encode_tokens renders them.
            text = chatPrompt(text, addGenerationPrompt=False)
        tokens = encodeText(str(text))
        return self.respond(request, 200, {"tokens": tokens, "length": len(tokens)})

    def decode(self, request: Request) -> bytes:
        body = requireObject(parseBody(request))
        self.requireApi(request)
        validateSampler(body, ["tokens"])
        self.requireModel()
        tokens = [int(t) for t in body["tokens"]]
        return self.respond(request, 200, {"text": decodeTokens(tokens)})

    # ---- generation ------------------------------------------------------------------------

    def chatCompletions(self, request: Request) -> bytes | int:
        body = requireObject(parseBody(request))
        self.requireApi(request)
        validateSampler(body, ["messages"])
        messages = [m for m in body["messages"] if isinstance(m, dict)] \
            if isinstance(body["messages"], list) else []
        promptText = ""
        for message in reversed(messages):
            if message.get("role") == "user":
                promptText = messageText(message.get("content"))
                break
        else:
            if messages:
                promptText = messageText(messages[-1].get("content"))
        addGenerationPrompt = asBool(body.get("add_generation_prompt", True))
        promptTokens = len(encodeText(chatPrompt(messages, addGenerationPrompt)))
        tools = body.get("tools") if isinstance(body.get("tools"), list) else None
        return self.generate(request, body, "chat", promptText, promptTokens, tools)

    def completions(self, request: Request) -> bytes | int:
        body = requireObject(parseBody(request))
        self.requireApi(request)
        validateSampler(body, ["prompt"])
        prompt = body["prompt"]
        promptText = "\n".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)
        return self.generate(request, body, "completion", promptText, len(encodeText(promptText)),
                             None)

    def generate(self, request: Request, body: JSON, kind: str, promptText: str,
                 promptTokens: int, tools: list[Any] | None) -> bytes | int:
        if self.model is None and body.get("model") is not None:
            # TabbyAPI dereferences model.container.model_dir on None here: a plain-text 500
            # from Starlette's error middleware (so without the CORS "vary" header).
            self.console.error("Exception in ASGI application")
            self.console.error("Traceback (most recent call last):")
            self.console.error("    model_path = model.container.model_dir")
            self.console.error("AttributeError: 'NoneType' object has no attribute 'model_dir'")
            request.setResponseCode(500, b"Internal Server Error")
            request.setHeader("content-type", "text/plain; charset=utf-8")
            request.setHeader("server", "uvicorn")
            return b"Internal Server Error"
        model = self.requireModel()
        c = self.config
        # TabbyAPI's chunk size is at least 256 and a multiple of it (adjust_chunk_size).
        chunkSize = max(256, (c.chunkSize + 255) // 256 * 256) if c.outputChunking else None
        problem = contextProblem(promptTokens, model.maxSeqLen, requestedMaxTokens(body) or 0,
                                 c.cacheSize or model.maxSeqLen, chunkSize)
        if problem is not None:
            # TabbyAPI checks before it streams: a 400 in OpenAI's shape, never an SSE error.
            raise HTTPError(400, {"error": {
                "message": problem, "type": "invalid_request_error", "param": None,
                "code": "context_length_exceeded"}})
        requestId = uuid.uuid4().hex
        plan = planGeneration(model.name, promptText, promptTokens, body,
                              self.config.knobs.tokens, tools, self.config.knobs.stopAfterTokens)
        streamOptions = body.get("stream_options")
        includeUsage = isinstance(streamOptions, dict) and \
            asBool(streamOptions.get("include_usage", False))
        self.generationCount += 1
        failing = self.config.knobs.failGenerationAfter is not None and \
            self.generationCount == self.config.knobs.failGenerationAfter + 1
        label = "Chat completion" if kind == "chat" else "Completion"
        if asBool(body.get("stream", False)):
            stream = EventStream(self, request, requestId, kind, model.name, plan, includeUsage,
                                 requestedLogprobs(body))
            if failing:
                stream.failAtStart(label)
            else:
                stream.start()
            return NOT_DONE_YET
        if failing:
            self.markUnhealthy()
            raise detail(503, f"{label} {requestId} aborted. Maybe the model was unloaded? "
                              "Please check the server console.", logged=True)
        return self.generateWhole(request, requestId, kind, model.name, plan, includeUsage,
                                  label, requestedLogprobs(body))

    def markUnhealthy(self) -> None:
        description = "RuntimeError: Simulated generation failure " \
                      "(simulator.fail_generation_after)"
        self.console.error("FATAL ERROR with generation. Attempting to recreate the generator. "
                           "If this fails, please restart the server.")
        self.console.error(description)
        self.healthIssues.append({
            "time": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "description": description,
        })

    def logMetrics(self, requestId: str, plan: Plan, tokens: int, seconds: float) -> None:
        speed = f"{tokens / seconds:.2f} T/s" if seconds > 0 else "Indeterminate T/s"
        self.console.info(
            f"Metrics (ID: {requestId}): {tokens} tokens generated in {seconds:.2f} seconds "
            f"(Queue: 0.0 s, Process: 0 cached tokens and {plan.promptTokens} new tokens at "
            f"{max(plan.promptTokens, 1) * 2500.0:.2f} T/s, Generate: {speed}, "
            f"Context: {plan.promptTokens} tokens)"
        )

    def generateWhole(self, request: Request, requestId: str, kind: str, modelName: str,
                      plan: Plan, includeUsage: bool, label: str, logprobs: int | None = None) -> int:
        """
        A non-streaming answer: tokens are still produced on the clock (so token_delay and
        crash_after_tokens apply), then sent as one JSON body.
        """
        started = self.reactor.seconds()
        collected: list[Piece] = []
        generation = Generation(requestId)

        def finished() -> None:
            self.generations.pop(requestId, None)
            elapsed = self.reactor.seconds() - started
            self.logMetrics(requestId, plan, len(collected), elapsed)
            if request.finished or request.channel is None:
                return
            content = "".join(p.text for p in collected if p.kind == "content") or None
            reasoning = "".join(p.text for p in collected if p.kind == "reasoning") or None
            usage = usageObject(plan.promptTokens, len(collected), elapsed) \
                if includeUsage else None
            entries = [tokenLogprob(p.text, logprobs) for p in collected if p.kind == "content"] \
                if logprobs is not None and content and content.strip() else []
            choice: JSON
            if kind == "chat":
                choice = {
                    "index": 0, "finish_reason": plan.finishReason,
                    "eos_reason": plan.eosReason,
                    "stop_str": "<|im_end|>" if plan.eosReason == "stop_token" else None,
                    "message": {"role": "assistant", "content": content,
                                "reasoning_content": reasoning, "tool_calls": plan.toolCalls,
                                "tool_call_id": None},
                    "logprobs": {"content": entries} if entries else None,
                }
                response = {"id": f"cmpl-{requestId}", "choices": [choice],
                            "created": int(time.time()), "model": modelName,
                            "object": "chat.completion", "usage": usage}
            else:
                choice = {"index": 0, "finish_reason": plan.finishReason,
                          "eos_reason": plan.eosReason,
                          "logprobs": completionLogprobs(entries) if entries else None,
                          "text": content or ""}
                response = {"id": f"cmpl-{requestId}", "choices": [choice],
                            "created": int(time.time()), "model": modelName,
                            "object": "text_completion", "usage": usage}
            data = self.respond(request, 200, response)
            if self.config.knobs.crashMidBody:
                request.setHeader("content-length", str(len(data)))
                request.write(data[:len(data) // 2])
                crashNow(self.reactor)
                return
            request.write(data)
            request.finish()

        producer = TokenProducer(self.reactor, self.config.knobs.tokenDelay, plan.pieces,
                                 collected.append, finished, self.config.knobs.crashAfterTokens)
        generation.producer = producer

        def aborted() -> None:
            producer.stopProducing()
            self.generations.pop(requestId, None)
            if not request.finished and request.channel is not None:
                request.write(self.respond(request, 503, {"detail": (
                    f"{label} {requestId} aborted. Maybe the model was unloaded? "
                    "Please check the server console.")}))
                request.finish()

        def lost(reason: Failure) -> None:
            if not producer.stopped:
                producer.stopProducing()
                self.generations.pop(requestId, None)
                self.console.error(f"{label} generation {requestId} cancelled by user.")

        def shutdown() -> None:
            producer.stopProducing()
            self.generations.pop(requestId, None)
            transport = request.channel.transport if request.channel is not None else None
            if transport is not None:
                transport.loseConnection()

        generation.abort = aborted
        generation.shutdown = shutdown
        request.notifyFinish().addErrback(lost)
        self.generations[requestId] = generation
        producer.start()
        return NOT_DONE_YET


class SimulatorResource(Resource):
    """
    The single leaf resource; routing is by exact path so 404 and 405 answer like Starlette.
    """

    isLeaf = True

    def __init__(self, sim: Simulator) -> None:
        super().__init__()
        self.sim = sim

    def render(self, request: Request) -> bytes | int:
        return self.sim.dispatch(request)


def portInUse(host: str, port: int) -> bool:
    """
    TabbyAPI's is_port_in_use: a port is busy when something accepts a connection on it.
    """
    target = "127.0.0.1" if host in ("0.0.0.0", "localhost", "") else host
    with socket.socket(socket.AF_INET6 if ":" in target else socket.AF_INET) as s:
        s.settimeout(0.5)
        return s.connect_ex((target, port)) == 0


