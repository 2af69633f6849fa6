"""
Cross-origin access for browsers: which pages on other origins may call the proxy, and the answers
to their preflight requests.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource


class CORSResource(Resource):
    """
    Cross-origin access for browsers, off unless origins are configured: a request whose
    C{Origin} is allowed gets C{Access-Control-Allow-Origin}, and its preflight (C{OPTIONS} with
    C{Access-Control-Request-Method}) a 204 listing the methods and headers it may use.  Any
    other request goes to the wrapped resource untouched.

    @param origins: the allowed origins, exactly as browsers send them
        (C{https://chat.example.org}), or C{*} for any.
    """

    isLeaf = True

    ALLOWED_METHODS = b"GET, POST, DELETE, HEAD, OPTIONS"
    ALLOWED_HEADERS = b"Authorization, Content-Type, X-API-Key, X-Admin-Key"
    MAX_AGE = b"600"

    def __init__(self, wrapped: IResource, origins: Sequence[str]) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._any = "*" in origins
        self._origins = frozenset(origin.encode("utf-8") for origin in origins if origin != "*")

    def render(self, request: IRequest) -> Any:
        origin = request.getHeader(b"origin")
        allowed = origin is not None and (self._any or origin in self._origins)
        if origin is not None:
            request.responseHeaders.addRawHeader(b"Vary", b"Origin")
        if allowed:
            assert origin is not None
            request.setHeader(b"Access-Control-Allow-Origin", b"*" if self._any else origin)
            if request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method"):
                request.setHeader(b"Access-Control-Allow-Methods", self.ALLOWED_METHODS)
                request.setHeader(b"Access-Control-Allow-Headers", self.ALLOWED_HEADERS)
                request.setHeader(b"Access-Control-Max-Age", self.MAX_AGE)
                request.setResponseCode(204)
                return b""
        return self._wrapped.render(request)
