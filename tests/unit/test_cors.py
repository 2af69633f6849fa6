"""
The browser policy (L{tabbyproxy.cors}), in memory through the whole site: foreign pages get a
403 in the route's shape, local pages and configured origins get CORS answers, a rebound C{Host}
is refused on a loopback listener, and state changes need a POST.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.cors import OriginPatterns, _loopbackAddress, allowedHost, defaultOrigins, hostName
from tabbyproxy.routes.root import makeSite
from tests.support.fakes import InMemoryClient, InMemoryProxy, SiteAgent

PROFILES: dict[str, dict[str, Any]] = {"alpha": {"model": {"model_name": "Alpha"}}}
CHAT = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "stream": False}).encode()


class PolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = InMemoryProxy(Path(self.mktemp()), PROFILES)

    def call(self, method: str, path: str, headers: dict[str, str], body: bytes | None = None,
             client: Any = None, host: str = "localhost") -> tuple[int, Any, Any]:
        client = client or self.proxy.client
        d = client.request(method, f"http://localhost{path}", headers={"Host": host, **headers}, data=body)
        self.proxy.flush()
        response = self.successResultOf(d)
        raw = self.successResultOf(response.content())
        return response.code, response.headers, raw

    def test_foreignOriginRefused(self) -> None:
        """
        A cross-origin C{text/plain} POST from a page on another site (what any web page can
        make a browser send) gets a 403 in its API's error shape, and starts no model; so does
        a GET with a foreign C{Origin}.
        """
        headers = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
        for path, shape in (("/v1/chat/completions", "openai"), ("/api/chat", "ollama")):
            code, responseHeaders, raw = self.call("POST", path, headers, CHAT)
            self.assertEqual(code, 403)
            error = json.loads(raw)["error"]
            message = error["message"] if shape == "openai" else error
            self.assertIn("origin 'https://evil.example' is not allowed", message)
            self.assertIn("--cors-origin https://evil.example", message)
            self.assertIsNone(responseHeaders.getRawHeaders("access-control-allow-origin"))
        self.assertEqual(self.proxy.reactor.spawned, [])
        self.assertEqual(self.call("GET", "/api/tags", {"Origin": "https://evil.example"})[0], 403)
        self.assertEqual(self.call("GET", "/api/tags", {"Origin": "null"})[0], 403)

    def test_localOriginsAllowed(self) -> None:
        """
        Pages on localhost, 127.0.0.1 and [::1] (any port), and apps (C{app://}, C{file://},
        C{vscode-webview://}, browser extensions) are allowed, and their answers say so.
        """
        for origin in ("http://localhost:3000", "https://127.0.0.1", "http://[::1]:8080", "http://0.0.0.0:1",
                       "app://obsidian.md", "file://", "vscode-webview://abc", "chrome-extension://id",
                       "moz-extension://id", "tauri://localhost"):
            code, headers, _ = self.call("GET", "/api/tags", {"Origin": origin})
            self.assertEqual(code, 200, origin)
            self.assertEqual(headers.getRawHeaders("access-control-allow-origin"), [origin])
            self.assertEqual(headers.getRawHeaders("vary"), ["Origin"])

    def test_sameOriginIsNotCrossOrigin(self) -> None:
        """
        A page served under the proxy's own address (its C{Origin} is C{http://} and its C{Host})
        is not a cross-origin caller.
        """
        code, headers, _ = self.call("GET", "/api/tags", {"Origin": "http://localhost"})
        self.assertEqual(code, 200)

    def test_preflight(self) -> None:
        """
        An allowed origin's preflight gets a 204 with the methods and every header the browser
        SDKs send (OpenAI's x-stainless-* among them, Anthropic's, the key headers); a foreign
        origin's preflight gets a 403.
        """
        asked = "authorization, content-type, x-stainless-os, x-stainless-new-thing, anthropic-version"
        code, headers, raw = self.call("OPTIONS", "/v1/chat/completions", {
            "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": asked})
        self.assertEqual((code, raw), (204, b""))
        self.assertIn("POST", headers.getRawHeaders("access-control-allow-methods")[0])
        allowed = {name.strip().lower() for name in headers.getRawHeaders("access-control-allow-headers")[0].split(",")}
        for name in ("authorization", "content-type", "user-agent", "accept", "x-requested-with", "openai-beta",
                     "x-stainless-os", "x-stainless-retry-count", "x-stainless-new-thing", "anthropic-version",
                     "anthropic-beta", "x-api-key"):
            self.assertIn(name, allowed)
        self.assertEqual(self.call("OPTIONS", "/v1/chat/completions", {
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})[0], 403)

    def test_configuredOrigins(self) -> None:
        """
        --cors-origin adds origins (exact, or with one C{*}); C{*} lets every page in and answers
        C{Access-Control-Allow-Origin: *}.
        """
        site = makeSite(self.proxy.state, ["https://chat.example", "https://*.corp.example"])
        client = InMemoryClient(SiteAgent(site))
        for origin, status in (("https://chat.example", 200), ("https://a.corp.example", 200),
                               ("https://chat.example.evil", 403), ("https://evil.example", 403)):
            self.assertEqual(self.call("GET", "/api/tags", {"Origin": origin}, client=client)[0], status, origin)
        anySite = makeSite(self.proxy.state, ["*"])
        code, headers, _ = self.call("GET", "/api/tags", {"Origin": "https://x.example"},
                                     client=InMemoryClient(SiteAgent(anySite)))
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("access-control-allow-origin"), ["*"])

    def test_reboundHostRefused(self) -> None:
        """
        On a loopback listener a C{Host} that is not a local name gets a 403 on every route (DNS
        rebinding), and local names and addresses are served.
        """
        for path in ("/health", "/status", "/v1/models", "/api/tags", "/"):
            code, _, raw = self.call("GET", path, {}, host="rebind.evil.example")
            self.assertEqual(code, 403, path)
            self.assertIn(b"is not a name of this machine", raw)
        for host in ("localhost:9000", "127.0.0.1:9000", "[::1]:9000", "ollama.localhost", "box.local",
                     "host.docker.internal", "192.168.1.5:9000", "0.0.0.0"):
            self.assertEqual(self.call("GET", "/health", {}, host=host)[0], 200, host)

    def test_unloadGetIsRefused(self) -> None:
        """
        C{GET /unload} answers 405 in the admin routes' shape.
        """
        code, _, raw = self.call("GET", "/unload", {})
        self.assertEqual((code, json.loads(raw)), (405, {"error": "GET is not allowed here"}))
        self.assertEqual(self.call("POST", "/unload", {})[0], 200)


class PatternTests(SynchronousTestCase):
    def test_patterns(self) -> None:
        """
        Origins match exactly or by one C{*}, case-insensitively; a wildcard needs its prefix and
        suffix both.
        """
        patterns = OriginPatterns(defaultOrigins())
        self.assertTrue(patterns.match(b"HTTP://LOCALHOST:3000"))
        self.assertTrue(patterns.match(b"http://localhost"))
        self.assertFalse(patterns.match(b"http://localhost.evil.example"))
        self.assertFalse(patterns.match(b"http://localhost:3000.evil.example"))
        self.assertFalse(patterns.match(b"http://localhost:"))
        self.assertFalse(patterns.match(b"https://evil.example"))

    def test_hosts(self) -> None:
        """
        Host names lose their port and brackets; local names and addresses are allowed.
        """
        self.assertEqual(hostName(b"[::1]:9000"), "::1")
        self.assertEqual(hostName(b"Example.COM:80"), "example.com")
        self.assertTrue(allowedHost("", "box"))
        self.assertTrue(allowedHost("box", "box"))
        self.assertTrue(allowedHost("10.0.0.1", "box"))
        self.assertFalse(allowedHost("8.8.8.8", "box"))
        self.assertFalse(allowedHost("localhost.evil.example", "box"))

    def test_loopbackListenerAddresses(self) -> None:
        """
        A listener's local address is loopback for C{127.x} and C{::1} (with or without a zone),
        and not for any other address or a text that is no address; asked again, the same
        address gets the same answer.
        """
        for _ in range(2):
            self.assertTrue(_loopbackAddress("127.0.0.1"))
            self.assertTrue(_loopbackAddress("127.3.2.1"))
            self.assertTrue(_loopbackAddress("::1"))
            self.assertTrue(_loopbackAddress("::1%lo"))
            self.assertFalse(_loopbackAddress("192.168.1.2"))
            self.assertFalse(_loopbackAddress("fe80::1%eth0"))
            self.assertFalse(_loopbackAddress("not an address"))
