"""
The browser policy, Ollama's: which web pages may call the proxy, and which C{Host} names it
answers to.

A browser lets any page send a "simple" request (a C{text/plain} POST, an C{<img>} GET) to
C{127.0.0.1}, and a DNS-rebinding page can even read the answers under its own name.  So, as
Ollama does (C{envconfig.AllowedOrigins}, C{allowedHostsMiddleware} and gin's CORS middleware in
its C{server/routes.go}):

  - a request with an C{Origin} that is neither the proxy's own nor allowed gets a 403; allowed
    are C{http(s)://localhost}, C{127.0.0.1}, C{[::1]} and C{0.0.0.0} on any port, C{app://},
    C{file://}, C{tauri://}, C{vscode-webview://}, C{vscode-file://}, browser extensions, and
    whatever C{--cors-origin} adds (C{*} for any page);
  - an allowed origin's preflight (C{OPTIONS}) gets a 204 listing the methods and the headers
    that the browser SDKs send, and its requests carry C{Access-Control-Allow-Origin};
  - on a loopback listener, a C{Host} that is not a local name (C{localhost}, this machine's
    name, C{*.localhost}, C{*.local}, C{*.internal}) or a loopback, private or unspecified
    address gets a 403, which is what stops DNS rebinding.

State changes need a POST (which browsers always send with an C{Origin}), so an C{<img>} or a
link cannot unload a model.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import Any, Iterable, Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from tabbyproxy.channel import ErrorBody

_LOCAL_ORIGIN_HOSTS = ("localhost", "127.0.0.1", "[::1]", "0.0.0.0")
_APP_SCHEMES = ("app", "file", "tauri", "vscode-webview", "vscode-file")
# gin-contrib/cors's browser extension schemes, which Ollama allows.
_EXTENSION_SCHEMES = ("chrome-extension", "safari-extension", "moz-extension", "ms-browser-extension")
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")


def defaultOrigins() -> tuple[str, ...]:
    """
    The origins allowed without any C{--cors-origin}, as patterns with at most one C{*}.
    """
    origins = []
    for host in _LOCAL_ORIGIN_HOSTS:
        origins += [f"http://{host}", f"https://{host}", f"http://{host}:*", f"https://{host}:*"]
    origins += [f"{scheme}://*" for scheme in (*_APP_SCHEMES, *_EXTENSION_SCHEMES)]
    return tuple(origins)


class OriginPatterns:
    """
    Origins as exact strings or patterns with one C{*} (C{http://localhost:*}), as gin's
    C{AllowWildcard} reads them; a lone C{*} matches every origin.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.any = False
        exact: set[bytes] = set()
        wild: list[tuple[bytes, bytes]] = []
        for pattern in patterns:
            if pattern == "*":
                self.any = True
            elif "*" in pattern:
                prefix, _, suffix = pattern.partition("*")
                wild.append((prefix.lower().encode("utf-8"), suffix.lower().encode("utf-8")))
            else:
                exact.add(pattern.lower().encode("utf-8"))
        self._exact = frozenset(exact)
        self._wild = tuple(wild)

    def match(self, origin: bytes) -> bool:
        if self.any:
            return True
        origin = origin.lower()
        if origin in self._exact:
            return True
        for prefix, suffix in self._wild:
            if origin.startswith(prefix) and origin.endswith(suffix) and len(origin) >= len(prefix) + len(suffix):
                middle = origin[len(prefix):len(origin) - len(suffix)]
                # A * where a port goes stands for a port, not for the rest of a host name.
                if not prefix.endswith(b":") or (middle.isdigit() and middle.isascii()):
                    return True
        return False


def hostName(host: bytes) -> str:
    """
    The name or address in a C{Host} header, without its port or brackets, lower case.
    """
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    if text.count(":") == 1:
        return text.partition(":")[0]
    return text


# Parsing an address for every request's Host was about 1% of a small request's CPU; the names
# clients reach the proxy by are few, and an odd one only costs its parse.
@functools.lru_cache(maxsize=256)
def allowedHost(name: str, machineName: str) -> bool:
    """
    Whether a C{Host} name is this machine's by Ollama's rules: no name, C{localhost}, the
    machine's name, a local top-level domain, or a loopback, private or unspecified address.
    """
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name in ("", "localhost", machineName) or name.endswith(_LOCAL_SUFFIXES)
    return address.is_loopback or address.is_private or address.is_unspecified


def _onLoopback(request: IRequest) -> bool:
    local = request.getHost()
    if not isinstance(local, (IPv4Address, IPv6Address)):
        # A Unix socket: no browser reaches it.
        return False
    return _loopbackAddress(local.host)


# Parsing an address took about 2% of the proxy's CPU on small requests; the local addresses a
# listener is reached on are few (its interfaces), so the answers are kept.
@functools.lru_cache(maxsize=64)
def _loopbackAddress(host: str) -> bool:
    """
    Whether C{host}, a local address as Twisted gives it (an IPv6 one with its C{%zone}), is a
    loopback address.
    """
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


class BrowserPolicy(Resource):
    """
    Ollama's browser policy in front of C{wrapped} (see the module's docstring).

    @param extraOrigins: the origins C{--cors-origin} added (C{https://chat.example.org}, or
        C{*} for any), on top of L{defaultOrigins}.
    @param errorBody: the JSON error document of the path's API, for the 403s.
    """

    isLeaf = True
    log = Logger()

    ALLOWED_METHODS = b"GET, POST, DELETE, HEAD, OPTIONS"
    # What the OpenAI, Anthropic and Ollama browser SDKs send (Ollama's list, plus Anthropic's
    # and the proxy's own key headers); any x-stainless-* header a preflight asks for is added.
    ALLOWED_HEADERS = (
        b"Authorization", b"Content-Type", b"User-Agent", b"Accept", b"X-Requested-With", b"OpenAI-Beta",
        b"x-stainless-arch", b"x-stainless-async", b"x-stainless-custom-poll-interval",
        b"x-stainless-helper-method", b"x-stainless-lang", b"x-stainless-os", b"x-stainless-package-version",
        b"x-stainless-poll-helper", b"x-stainless-retry-count", b"x-stainless-runtime",
        b"x-stainless-runtime-version", b"x-stainless-timeout", b"anthropic-version", b"anthropic-beta",
        b"anthropic-dangerous-direct-browser-access", b"x-api-key", b"X-Admin-Key", b"X-Request-Id",
    )
    MAX_AGE = b"600"

    def __init__(self, wrapped: IResource, errorBody: ErrorBody, extraOrigins: Sequence[str] = ()) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._errorBody = errorBody
        self._origins = OriginPatterns((*defaultOrigins(), *extraOrigins))
        self._anyOrigin = "*" in extraOrigins
        self._machineName = socket.gethostname().lower()
        self._knownHeaders = {name.lower() for name in self.ALLOWED_HEADERS}

    def render(self, request: IRequest) -> Any:
        host = request.getHeader(b"host") or b""
        if _onLoopback(request) and not allowedHost(hostName(host), self._machineName):
            return self._refuse(request, f"Host {host.decode('latin-1')!r} is not a name of this machine; "
                                         f"the proxy listens on loopback and answers to local names only")
        origin = request.getHeader(b"origin")
        if origin is None or origin in (b"http://" + host, b"https://" + host):
            # Not a cross-origin request: no browser policy applies.
            return self._wrapped.render(request)
        request.responseHeaders.addRawHeader(b"Vary", b"Origin")
        if not self._origins.match(origin):
            shown = origin.decode("latin-1")
            return self._refuse(request, f"origin {shown!r} is not allowed to call the proxy "
                                         f"(start it with --cors-origin {shown} to allow it)")
        request.setHeader(b"Access-Control-Allow-Origin", b"*" if self._anyOrigin else origin)
        if request.method == b"OPTIONS":
            request.setHeader(b"Access-Control-Allow-Methods", self.ALLOWED_METHODS)
            request.setHeader(b"Access-Control-Allow-Headers", b", ".join(self._allowedHeaders(request)))
            request.setHeader(b"Access-Control-Max-Age", self.MAX_AGE)
            request.setResponseCode(204)
            return b""
        return self._wrapped.render(request)

    def _allowedHeaders(self, request: IRequest) -> list[bytes]:
        asked = request.getHeader(b"access-control-request-headers") or b""
        extra = [
            name for name in (part.strip().lower() for part in asked.split(b","))
            if name.startswith(b"x-stainless-") and name not in self._knownHeaders and name.isascii()
            and all(chr(byte).isalnum() or byte == 0x2D for byte in name)
        ]
        return [*self.ALLOWED_HEADERS, *extra]

    def _refuse(self, request: IRequest, message: str) -> bytes:
        self.log.info("Refused {method} {path} with 403: {message}", method=request.method.decode("latin-1"),
                      path=request.path.decode("latin-1"), message=message)
        request.setResponseCode(403)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return self._errorBody(request.path, 403, message)
