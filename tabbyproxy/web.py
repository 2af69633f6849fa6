"""
What every route needs: the shared state of the proxy, reading a JSON body safely, writing a JSON
answer, and the root resource that sends C{/v1/*} to the OpenAI routes, C{/api/*} to the Ollama
routes and the rest to the admin routes.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from attrs import frozen
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from tabbyproxy.auth import Permission, authProblem
from tabbyproxy.config import Catalog, Keys, TabbyInstall
from tabbyproxy.supervisor import Supervisor
from tabbyproxy.upstream import Upstream

DEFAULT_MAX_BODY = 16 * 1024 * 1024


class ClientError(Exception):
    """
    A request the proxy will not serve, with the status and message the client should see.

    @ivar kind: the OpenAI error C{type} for this error.
    """

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


@frozen
class ProxyState:
    """
    What the routes share: the profiles, the keys, the child's supervisor, the upstream client.

    @ivar catalog: a callable so a reload can swap the profiles under running routes.
    """

    catalog: Callable[[], Catalog]
    install: TabbyInstall
    supervisor: Supervisor
    upstream: Upstream
    clock: Any
    maxBodySize: int = DEFAULT_MAX_BODY

    @property
    def keys(self) -> Keys:
        return self.install.keys

    def requireKey(self, request: IRequest, needed: Permission = Permission.API) -> None:
        """
        @raise ClientError: 401 when the request's key does not grant C{needed}.
        """
        problem = authProblem(request, self.keys, needed)
        if problem is not None:
            raise ClientError(401, problem, "authentication_error")


def readJSONObject(request: IRequest, maxBodySize: int) -> dict[str, Any]:
    """
    The request's body as a JSON object.

    @raise ClientError: 413 over C{maxBodySize}, 400 for anything that is not a JSON object.
    """
    content = request.content
    if content is None:
        raise ClientError(400, "missing request body")
    content.seek(0, 2)
    size = content.tell()
    if size > maxBodySize:
        raise ClientError(413, f"request body of {size} bytes is over the limit of {maxBodySize} bytes")
    content.seek(0)
    raw = content.read()
    if not raw.strip():
        raise ClientError(400, "missing request body")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ClientError(400, f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ClientError(400, f"request body must be a JSON object, not a JSON {type(body).__name__}")
    return body


def writeJSON(request: IRequest, status: int, document: object) -> bytes:
    """
    Set the status and content type for a JSON answer and return its bytes.
    """
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


class Router(Resource):
    """
    Picks the route table by the first path segment.  Each table is a Klein resource that sees
    the whole path, so routes are written with their full paths.
    """

    isLeaf = True

    def __init__(self, openai: IResource, ollama: IResource, admin: IResource) -> None:
        super().__init__()
        self._bySegment = {b"v1": openai, b"api": ollama}
        self._admin = admin

    def render(self, request: IRequest) -> Any:
        segments = request.postpath
        first = segments[0] if segments else b""
        return self._bySegment.get(first, self._admin).render(request)
