"""
The proxy's whole HTTP side in one place: the resource tree that sends C{/v1/responses} to the
Responses routes, C{/v1/messages} (and C{/v1/models} asked with C{anthropic-version}) to the
Anthropic Messages routes, the rest of C{/v1/*} to the OpenAI routes, C{/api/*} to the Ollama routes,
C{/ui/*} and C{/events} to the dashboard and the rest to the admin routes, behind the browser
policy (L{tabbyproxy.cors}) and the L{ProxySite} with its guards.  The service (L{tabbyproxy.tap}) and
the in-memory tests build it with the same function.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from tabbyproxy.cors import BrowserPolicy
from tabbyproxy.routes.admin import AdminRoutes
from tabbyproxy.routes.common import ProxyState, errorBodyFor
from tabbyproxy.routes.messages import MessagesRoutes
from tabbyproxy.routes.ollama import OllamaRoutes
from tabbyproxy.routes.openai import OpenAIRoutes
from tabbyproxy.routes.responses import ResponsesRoutes
from tabbyproxy.routes.ui import UIRoutes
from tabbyproxy.limits import DEFAULT_MAX_CONNECTIONS
from tabbyproxy.server import DEFAULT_CLIENT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, ProxySite, noteRoute


class Router(Resource):
    """
    Picks the route table by a path segment (the first, or the one at C{depth} for a router
    inside another).  Each table is a Klein resource that sees the whole path, so routes are
    written with their full paths.
    """

    isLeaf = True

    def __init__(self, bySegment: dict[bytes, IResource], otherwise: IResource, depth: int = 0) -> None:
        super().__init__()
        self._bySegment = bySegment
        self._otherwise = otherwise
        self._depth = depth

    def render(self, request: IRequest) -> Any:
        segments = request.postpath
        segment = segments[self._depth] if len(segments) > self._depth else b""
        return self._bySegment.get(segment, self._otherwise).render(request)


class ByHeader(Resource):
    """
    Sends the requests that carry C{header} to C{carrying}, the rest to C{otherwise}: the
    same path in two APIs, as C{/v1/models} is in OpenAI's and Anthropic's.
    """

    isLeaf = True

    def __init__(self, header: bytes, carrying: IResource, otherwise: IResource) -> None:
        super().__init__()
        self._header = header
        self._carrying = carrying
        self._otherwise = otherwise

    def render(self, request: IRequest) -> Any:
        chosen = self._carrying if request.getHeader(self._header) is not None else self._otherwise
        return chosen.render(request)


class BrowserOrOllama(Resource):
    """
    C{/}: a browser asking for HTML goes to the dashboard; every other client gets the answer
    of Ollama's root, by which Ollama clients find the server.
    """

    isLeaf = True

    def __init__(self, otherwise: IResource) -> None:
        super().__init__()
        self._otherwise = otherwise

    def render(self, request: IRequest) -> Any:
        if request.method == b"GET" and b"text/html" in (request.getHeader(b"accept") or b""):
            noteRoute(request, "/")
            request.setResponseCode(302)
            request.setHeader(b"Location", b"/ui/")
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"The dashboard is at /ui/\n"
        return self._otherwise.render(request)


def rootResource(state: ProxyState, corsOrigins: Sequence[str] = ()) -> IResource:
    """
    Every route of the proxy, over C{state}.
    """
    # The translated APIs under /v1 have route tables of their own.
    openai = OpenAIRoutes(state).app.resource()
    messages = MessagesRoutes(state).app.resource()
    v1 = Router(
        {b"responses": ResponsesRoutes(state).app.resource(), b"messages": messages,
         b"models": ByHeader(b"anthropic-version", messages, openai)},
        otherwise=openai, depth=1,
    )
    admin = AdminRoutes(state).app.resource()
    ui = UIRoutes(state).app.resource()
    root: IResource = Router(
        {b"v1": v1, b"api": OllamaRoutes(state).app.resource(), b"ui": ui, b"events": ui,
         b"": BrowserOrOllama(admin)},
        otherwise=admin,
    )
    return BrowserPolicy(root, errorBodyFor, corsOrigins)


def makeSite(
    state: ProxyState, corsOrigins: Sequence[str] = (), clientTimeout: float = DEFAULT_CLIENT_TIMEOUT,
    requestTimeout: float = DEFAULT_REQUEST_TIMEOUT, maxConnections: int = DEFAULT_MAX_CONNECTIONS,
) -> ProxySite:
    """
    The proxy's HTTP server over every route.
    """
    site = ProxySite(
        rootResource(state, corsOrigins),
        maxBodySize=state.maxBodySize,
        timeout=clientTimeout,
        requestTimeout=requestTimeout,
        maxConnections=maxConnections,
        metrics=state.metrics,
        errorBody=errorBodyFor,
    )
    site.requestFinished = state.history.requestFinished
    return site
