"""
The OpenAI API: C{/v1/chat/completions} and C{/v1/completions} start the model their body names
and stream TabbyAPI's answer back untouched; C{/v1/models} lists the profiles; C{/v1/embeddings},
C{/v1/token/*} and C{/v1/model} pass through to the running model.

Errors are OpenAI's shape, C{{"error": {"message", "type", "code"}}}; once a stream has started,
an error arrives as one more SSE event of that shape.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Callable

from attrs import define, field
from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest, IResponse
from werkzeug.exceptions import MethodNotAllowed, NotFound

from tabbyproxy.config import Profile
from tabbyproxy.defaults import applyRequestDefaults, applySystemPrompt
from tabbyproxy.keepalive import KeepAliveError, parseKeepAlive
from tabbyproxy.supervisor import Lease, SchedulingError
from tabbyproxy.upstream import UpstreamBroken
from tabbyproxy.web import ClientError, ProxyState, noteModel, readJSONObject, writeJSON

_CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large"}


def errorDocument(status: int, message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    """
    OpenAI's error body.
    """
    if status >= 500:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "code": _CODES.get(status, str(status))}}


def sseEvent(document: object) -> bytes:
    """
    One server-sent event carrying C{document}, framed as TabbyAPI frames its own.
    """
    return b"data: " + json.dumps(document, separators=(",", ":")).encode("utf-8") + b"\r\n\r\n"


def upstreamErrorMessage(status: int, raw: bytes) -> str:
    """
    What went wrong, from an error TabbyAPI answered (C{{"detail": ...}} from FastAPI, a list of
    validation errors, or an OpenAI-style body).
    """
    try:
        document = json.loads(raw)
    except ValueError:
        text = raw.decode("utf-8", "replace").strip()
        return f"TabbyAPI answered {status}: {text or 'no details'}"
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        detail = document.get("detail")
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):
            return "; ".join(_validationProblem(problem) for problem in detail)
    return f"TabbyAPI answered {status}: {raw.decode('utf-8', 'replace')}"


def _validationProblem(problem: object) -> str:
    if not isinstance(problem, dict):
        return str(problem)
    location = ".".join(str(part) for part in problem.get("loc", []) if part != "body")
    return f"{location}: {problem.get('msg', 'invalid')}" if location else str(problem.get("msg"))


@define
class OpenAIRoutes:
    """
    The C{/v1/*} routes.
    """

    app = Klein()
    log = Logger()

    state: ProxyState
    now: Callable[[], datetime] = field(default=datetime.now)

    # -- generation

    @app.route("/v1/chat/completions", methods=["POST"])
    async def chatCompletions(self, request: IRequest) -> bytes | None:
        return await self._generate(request, "/v1/chat/completions", chat=True)

    @app.route("/v1/completions", methods=["POST"])
    async def completions(self, request: IRequest) -> bytes | None:
        return await self._generate(request, "/v1/completions", chat=False)

    async def _generate(self, request: IRequest, path: str, chat: bool) -> bytes | None:
        try:
            self.state.requireKey(request)
            body = readJSONObject(request, self.state.maxBodySize)
            profile = self._profileFor(body)
            keepAlive = self._keepAlive(body)
            self._applyTemplate(body, profile, chat)
        except ClientError as e:
            return writeJSON(request, e.status, errorDocument(e.status, e.message, e.kind))
        streaming = body.get("stream") is True
        return await self.forward(request, profile, keepAlive, path, body, streaming)

    def _profileFor(self, body: dict[str, Any]) -> Profile:
        name = body.pop("model", None)
        if name is None:
            running = self.state.supervisor.current
            if running is None:
                raise ClientError(400, "model is required: GET /v1/models lists the available ids")
            return running.profile
        profile = self.state.catalog().resolve(name)
        if profile is None:
            shown = name if isinstance(name, str) else json.dumps(name)
            raise ClientError(
                404, f"model '{shown}' not found: GET /v1/models lists the available ids"
            )
        return profile

    @staticmethod
    def _keepAlive(body: dict[str, Any]) -> float | None:
        value = body.pop("keep_alive", None)
        if value is None:
            return None
        try:
            return parseKeepAlive(value)
        except KeepAliveError as e:
            raise ClientError(400, str(e)) from e

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
    ) -> bytes | None:
        """
        Get C{profile}'s model, send it the request, and relay its answer as it arrives.
        """
        noteModel(request, profile.id)
        try:
            lease = await self.state.supervisor.acquire(profile, keepAlive)
        except SchedulingError as e:
            return writeJSON(request, e.status, errorDocument(e.status, str(e)))
        try:
            payload = None if body is None else json.dumps(body).encode("utf-8")
            return await self._relay(request, lease, method, path, payload, streaming)
        finally:
            lease.release()

    async def _relay(
        self, request: IRequest, lease: Lease, method: str, path: str, payload: bytes | None, streaming: bool
    ) -> bytes | None:
        upstream = self.state.upstream
        try:
            response: IResponse = await upstream.send(lease, method, path, payload)
        except CancelledError:
            raise
        except Exception as e:
            message = f"TabbyAPI for {lease.profile.id} did not answer: {e}"
            self.log.error("{message}", message=message, model=lease.profile.id)
            return writeJSON(request, 502, errorDocument(502, message))
        if response.code >= 400:
            raw = await upstream.read(response)
            message = upstreamErrorMessage(response.code, raw)
            return writeJSON(request, response.code, errorDocument(response.code, message))
        upstream.copyHeaders(response, request)
        try:
            await upstream.pipe(response, request, request.write)
        except UpstreamBroken as e:
            message = f"{e} (model {lease.profile.id}); see GET /status"
            self.log.error("{message}", message=message, model=lease.profile.id)
            if streaming:
                request.write(sseEvent(errorDocument(502, message)))
            elif not request.startedWriting:  # type: ignore[attr-defined]
                return writeJSON(request, 502, errorDocument(502, message))
        return None

    # -- listing and passthrough

    @app.route("/v1/models", methods=["GET"])
    def models(self, request: IRequest) -> bytes:
        try:
            self.state.requireKey(request)
        except ClientError as e:
            return writeJSON(request, e.status, errorDocument(e.status, e.message, e.kind))
        running = self.state.supervisor.current
        return writeJSON(
            request,
            200,
            {
                "object": "list",
                "data": [self._card(profile, running is not None and running.profile.id == profile.id)
                         for profile in self.state.catalog()],
            },
        )

    @app.route("/v1/models/<path:name>", methods=["GET"])
    def model(self, request: IRequest, name: str) -> bytes:
        try:
            self.state.requireKey(request)
        except ClientError as e:
            return writeJSON(request, e.status, errorDocument(e.status, e.message, e.kind))
        profile = self.state.catalog().resolve(name)
        if profile is None:
            return writeJSON(request, 404, errorDocument(404, f"model '{name}' not found"))
        running = self.state.supervisor.current
        return writeJSON(request, 200, self._card(profile, running is not None and running.profile is profile))

    @staticmethod
    def _card(profile: Profile, loaded: bool) -> dict[str, Any]:
        try:
            created = int(profile.path.stat().st_mtime)
        except OSError:
            created = 0
        return {"id": profile.id, "object": "model", "created": created, "owned_by": "tabbyproxy",
                "loaded": loaded}

    @app.route("/v1/embeddings", methods=["POST"])
    async def embeddings(self, request: IRequest) -> bytes | None:
        return await self._passThrough(request, "/v1/embeddings")

    @app.route("/v1/token/encode", methods=["POST"])
    async def encode(self, request: IRequest) -> bytes | None:
        return await self._passThrough(request, "/v1/token/encode")

    @app.route("/v1/token/decode", methods=["POST"])
    async def decode(self, request: IRequest) -> bytes | None:
        return await self._passThrough(request, "/v1/token/decode")

    @app.route("/v1/model", methods=["GET"])
    async def currentModel(self, request: IRequest) -> bytes | None:
        return await self._passThrough(request, "/v1/model", method="GET")

    async def _passThrough(self, request: IRequest, path: str, method: str = "POST") -> bytes | None:
        """
        Send the request to the model its body names, or else to the running model.
        """
        try:
            self.state.requireKey(request)
            body = readJSONObject(request, self.state.maxBodySize) if method == "POST" else None
            keepAlive = None
            if body is not None and body.get("model") is not None:
                profile = self._profileFor(body)
                keepAlive = self._keepAlive(body)
            else:
                running = self.state.supervisor.current
                if running is None:
                    raise ClientError(503, "no model is loaded; name one with \"model\" to start it")
                profile = running.profile
                if body is not None:
                    keepAlive = self._keepAlive(body)
        except ClientError as e:
            return writeJSON(request, e.status, errorDocument(e.status, e.message, e.kind))
        return await self.forward(request, profile, keepAlive, path, body, streaming=False, method=method)

    # -- errors

    @app.handle_errors(NotFound)
    def notFound(self, request: IRequest, failure: Failure) -> bytes:
        return writeJSON(request, 404, errorDocument(404, f"no route {request.path.decode('utf-8', 'replace')}"))

    @app.handle_errors(MethodNotAllowed)
    def wrongMethod(self, request: IRequest, failure: Failure) -> bytes:
        return writeJSON(request, 405, errorDocument(405, f"{request.method.decode('ascii', 'replace')} is not allowed here"))
