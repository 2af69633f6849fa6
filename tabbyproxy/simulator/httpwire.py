"""
TabbyAPI's HTTP conventions as the simulator speaks them: the site and request types, JSON
and SSE responses, FastAPI-style errors and 422 validation details, body parsing and the
sampler fields' checks.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any, Sequence


from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tabbyproxy.simulator.console import Console
from tabbyproxy.simulator.values import JSON


def dumpJson(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf8")


class HTTPError(Exception):
    """
    An error answer: status and body, as FastAPI's HTTPException and validation produce.
    """

    def __init__(self, code: int, body: Any, logged: bool = False) -> None:
        super().__init__(code, body)
        self.code = code
        self.body = body
        # TabbyAPI's handle_request_error prints "Sent to request: ..." for these.
        self.logged = logged


def detail(code: int, message: str, logged: bool = False) -> HTTPError:
    return HTTPError(code, {"detail": message}, logged)


class SimulatorRequest(Request):
    """
    A request that writes one uvicorn-style access line, when the response starts.
    """

    accessLogged = False

    def logAccess(self) -> None:
        if self.accessLogged:
            return
        self.accessLogged = True
        console = getattr(getattr(self.channel, "site", None), "console", None)
        if console is None:
            return
        peer = self.getClientAddress()
        client = f"{getattr(peer, 'host', '-')}:{getattr(peer, 'port', 0)}"
        method = self.method.decode("latin-1")
        path = self.uri.decode("latin-1")
        version = self.clientproto.decode("latin-1")
        console.info(f'{client} - "{method} {path} {version}" {self.code}')


class SimulatorSite(Site):
    """
    A Site that keeps the console for access lines instead of Twisted's log format.
    """

    requestFactory = SimulatorRequest

    def __init__(self, resource: Resource, console: Console) -> None:
        super().__init__(resource)
        self.console = console
        self.displayTracebacks = False

    def log(self, request: http.Request) -> None:
        if isinstance(request, SimulatorRequest):
            request.logAccess()


def startResponse(request: Request, code: int, contentType: str) -> None:
    request.setResponseCode(code, HTTPStatus(code).phrase.encode())
    request.setHeader("content-type", contentType)
    request.setHeader("server", "uvicorn")
    request.setHeader("vary", "Origin")


def startEventStream(request: Request) -> None:
    startResponse(request, 200, "text/event-stream; charset=utf-8")
    request.setHeader("cache-control", "no-store")
    request.setHeader("connection", "keep-alive")
    request.setHeader("x-accel-buffering", "no")
    if isinstance(request, SimulatorRequest):
        request.logAccess()


def sseEvent(payload: Any) -> bytes:
    data = payload if isinstance(payload, bytes) else dumpJson(payload)
    return b"data: " + data + b"\r\n\r\n"


def pingComment() -> bytes:
    return f": ping - {datetime.now(timezone.utc)}\r\n\r\n".encode()


def validationError(kind: str, loc: list[Any], msg: str, value: Any, ctx: JSON | None = None
                    ) -> JSON:
    error: JSON = {"type": kind, "loc": loc, "msg": msg, "input": value}
    if ctx is not None:
        error["ctx"] = ctx
    return error


def parseBody(request: Request) -> Any:
    """
    Decode the JSON body like FastAPI: malformed JSON or a missing body is a 422 that comes
    before any auth check.
    """
    assert request.content is not None
    raw = request.content.read()
    if not raw.strip():
        raise HTTPError(422, {"detail": [validationError("missing", ["body"], "Field required",
                                                           None)]})
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise HTTPError(422, {"detail": [validationError(
            "json_invalid", ["body", e.pos], "JSON decode error", {}, {"error": e.msg})]})
    except UnicodeDecodeError:
        raise HTTPError(422, {"detail": [validationError(
            "json_invalid", ["body", 0], "JSON decode error", {}, {"error": "Invalid UTF-8"})]})


def requireObject(body: Any) -> JSON:
    if not isinstance(body, dict):
        raise HTTPError(422, {"detail": [validationError(
            "model_attributes_type", ["body"],
            "Input should be a valid dictionary or object to extract fields from", body)]})
    return body


def validateSampler(body: JSON, required: Sequence[str]) -> None:
    """
    The few pydantic checks a proxy can trip over: required fields and the non-negative
    penalties and lengths that OpenAI allows but TabbyAPI rejects.
    """
    errors: list[JSON] = []
    for name in required:
        if name not in body:
            errors.append(validationError("missing", ["body", name], "Field required", body))
    for name in ("max_tokens", "max_completion_tokens", "max_length"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            errors.append(validationError(
                "int_type", ["body", name], "Input should be a valid integer", value))
    for name in ("max_tokens", "frequency_penalty", "presence_penalty"):
        value = body.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            bound: float | int = 0 if name == "max_tokens" else 0.0
            errors.append(validationError(
                "greater_than_equal", ["body", name],
                "Input should be greater than or equal to 0", value, {"ge": bound}))
    if errors:
        raise HTTPError(422, {"detail": errors})


