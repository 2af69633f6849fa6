"""
Checking a request's key against TabbyAPI's keys: what it may do, and what a client is told
when it may not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest
from twisted.web.test.requesthelper import DummyRequest

from tabbyproxy.auth import KEY_FILE_INTERVAL, KeyWatcher, Permission, authProblem, permissionOf, presentedKey
from tabbyproxy.config import Keys
from tests.support.fakes import InMemoryProxy

KEYS = Keys(enabled=True, apiKeys=("api-one", "api-two"), adminKey="admin-key")


def requestWith(**headers: str) -> IRequest:
    """
    A request carrying C{headers}, given with underscores for dashes (C{x_api_key=...}), set as
    bytes the way twisted.web sets them.
    """
    request = DummyRequest([b"v1", b"models"])
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(
            name.replace("_", "-").encode("ascii"), [value.encode("utf-8")]
        )
    # DummyRequest does not declare IRequest, but provides what auth uses of it.
    return cast(IRequest, request)


class PresentedKeyTests(SynchronousTestCase):
    """
    L{presentedKey} finds the key a client sent.
    """

    def test_none(self) -> None:
        """
        Without a key header there is no key.
        """
        self.assertIsNone(presentedKey(requestWith()))

    def test_bearer(self) -> None:
        """
        C{Authorization: Bearer KEY} presents KEY, as the bytes sent.
        """
        self.assertEqual(presentedKey(requestWith(authorization="Bearer api-one")), b"api-one")

    def test_apiKeyHeader(self) -> None:
        """
        C{x-api-key: KEY} presents KEY, as the bytes sent.
        """
        self.assertEqual(presentedKey(requestWith(x_api_key="api-one")), b"api-one")

    def test_emptyBearer(self) -> None:
        """
        A Bearer scheme without a token presents no key.
        """
        self.assertIsNone(presentedKey(requestWith(authorization="Bearer ")))


class PermissionOfTests(SynchronousTestCase):
    """
    L{permissionOf}: what a request's key allows.
    """

    def test_noKey(self) -> None:
        """
        A request without a key may do nothing.
        """
        self.assertEqual(permissionOf(requestWith(), KEYS), Permission.NONE)

    def test_wrongKey(self) -> None:
        """
        A key that is neither an API key nor the admin key may do nothing.
        """
        self.assertEqual(
            permissionOf(requestWith(authorization="Bearer nope"), KEYS), Permission.NONE
        )
        self.assertEqual(permissionOf(requestWith(x_api_key="nope"), KEYS), Permission.NONE)

    def test_apiKeyViaBearer(self) -> None:
        """
        Any of the API keys as a Bearer token opens the model routes.
        """
        for key in KEYS.apiKeys:
            self.assertEqual(
                permissionOf(requestWith(authorization=f"Bearer {key}"), KEYS), Permission.API
            )

    def test_apiKeyViaHeader(self) -> None:
        """
        An API key in C{x-api-key} opens the model routes.
        """
        self.assertEqual(permissionOf(requestWith(x_api_key="api-two"), KEYS), Permission.API)

    def test_adminKey(self) -> None:
        """
        The admin key opens everything, whichever header carries it.
        """
        for request in [
            requestWith(authorization="Bearer admin-key"),
            requestWith(x_api_key="admin-key"),
            requestWith(x_admin_key="admin-key"),
        ]:
            self.assertEqual(permissionOf(request, KEYS), Permission.ADMIN)

    def test_bearerSchemeCaseInsensitive(self) -> None:
        """
        The C{Bearer} scheme name is matched without regard to case (RFC 7235).
        """
        for scheme in ["bearer", "BEARER", "BeArEr"]:
            self.assertEqual(
                permissionOf(requestWith(authorization=f"{scheme} api-one"), KEYS),
                Permission.API,
            )

    def test_nonBearerSchemeRejected(self) -> None:
        """
        Another scheme (Basic, or a bare key) is not a key, even if its token is a valid key.
        """
        for value in ["Basic api-one", "Token api-one", "api-one"]:
            self.assertEqual(
                permissionOf(requestWith(authorization=value), KEYS), Permission.NONE
            )

    def test_keyIsExact(self) -> None:
        """
        A key is compared exactly: a prefix or a different case does not match.
        """
        for key in ["api", "API-ONE", "api-one2"]:
            self.assertEqual(permissionOf(requestWith(x_api_key=key), KEYS), Permission.NONE)

    def test_authDisabledIsAdmin(self) -> None:
        """
        With auth off every request may do everything, key or not, right or wrong.
        """
        disabled = Keys(enabled=False)
        self.assertEqual(permissionOf(requestWith(), disabled), Permission.ADMIN)
        self.assertEqual(
            permissionOf(requestWith(authorization="Bearer nope"), disabled), Permission.ADMIN
        )


class AuthProblemTests(SynchronousTestCase):
    """
    L{authProblem}: why a request may not go on, in words for the client.
    """

    def test_noKey(self) -> None:
        """
        Without a key, the client is told to provide one and how.
        """
        problem = authProblem(requestWith(), KEYS, Permission.API)
        assert problem is not None
        self.assertIn("please provide an API key", problem)
        self.assertIn("Authorization: Bearer", problem)

    def test_noKeyOnAdminRoute(self) -> None:
        """
        Without a key on an admin route, the client is asked for the admin key.
        """
        problem = authProblem(requestWith(), KEYS, Permission.ADMIN)
        assert problem is not None
        self.assertIn("please provide an admin key", problem)

    def test_wrongKey(self) -> None:
        """
        A wrong key is reported as invalid, on any route.
        """
        for needed in [Permission.API, Permission.ADMIN]:
            self.assertEqual(
                authProblem(requestWith(authorization="Bearer nope"), KEYS, needed),
                "invalid API key",
            )

    def test_apiKeyAllowed(self) -> None:
        """
        An API key, by Bearer or by C{x-api-key}, may use the model routes.
        """
        self.assertIsNone(
            authProblem(requestWith(authorization="Bearer api-one"), KEYS, Permission.API)
        )
        self.assertIsNone(authProblem(requestWith(x_api_key="api-two"), KEYS, Permission.API))

    def test_adminKeyAllowedEverywhere(self) -> None:
        """
        The admin key may use model routes and admin routes.
        """
        request = requestWith(authorization="Bearer admin-key")
        self.assertIsNone(authProblem(request, KEYS, Permission.API))
        self.assertIsNone(authProblem(request, KEYS, Permission.ADMIN))

    def test_apiKeyOnAdminRoute(self) -> None:
        """
        An API key on an admin route is told the route needs the admin key.
        """
        problem = authProblem(requestWith(authorization="Bearer api-one"), KEYS, Permission.ADMIN)
        self.assertEqual(problem, "this route needs the admin key")

    def test_nonBearerScheme(self) -> None:
        """
        A valid key under another scheme counts as no key at all.
        """
        problem = authProblem(requestWith(authorization="Basic api-one"), KEYS, Permission.API)
        assert problem is not None
        self.assertIn("please provide an API key", problem)

    def test_authDisabled(self) -> None:
        """
        With auth off nothing is ever a problem.
        """
        disabled = Keys(enabled=False)
        for needed in Permission:
            self.assertIsNone(authProblem(requestWith(), disabled, needed))

    def test_nothingNeeded(self) -> None:
        """
        A route that needs no permission lets a key-less request through.
        """
        self.assertIsNone(authProblem(requestWith(), KEYS, Permission.NONE))

    def test_nonASCIIKey(self) -> None:
        """
        Keys are compared as UTF-8 bytes: a non-ASCII key works, and a wrong non-ASCII key is
        simply invalid rather than an error.
        """
        keys = Keys(enabled=True, apiKeys=("clé-ü",), adminKey="admin-key")
        self.assertIsNone(authProblem(requestWith(x_api_key="clé-ü"), keys, Permission.API))
        self.assertEqual(
            authProblem(requestWith(x_api_key="clé-ö"), keys, Permission.API), "invalid API key"
        )

    def test_adminHeaderTakesPrecedence(self) -> None:
        """
        When several key headers are sent, C{x-admin-key} is the one checked.
        """
        request = requestWith(x_admin_key="admin-key", authorization="Bearer nope")
        self.assertIsNone(authProblem(request, KEYS, Permission.ADMIN))


class KeyWatcherTests(SynchronousTestCase):
    """
    api_tokens.yml followed as TabbyAPI follows it: looked at every two seconds on the clock,
    read again when it changed, its previous keys kept while it is broken or gone.
    """

    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.stamp = 1_700_000_000 * 10**9
        self.write("api_key: api-one\nadmin_key: admin-one\n")
        self.clock = Clock()
        self.watcher = KeyWatcher(self.path, Keys(enabled=True, apiKeys=("api-one",), adminKey="admin-one"), self.clock)
        self.watcher.startService()
        self.addCleanup(self.watcher.stopService)

    def write(self, text: str) -> None:
        self.path.write_text(text)
        # A new modification time for each version, whatever the file system's resolution.
        self.stamp += 10**9
        os.utime(self.path, ns=(self.stamp, self.stamp))

    def test_changedFileIsReadAgain(self) -> None:
        """
        A new key and a rotated admin key take effect at the next look, not before.
        """
        self.write("api_key: [api-one, api-two]\nadmin_key: admin-two\n")
        self.clock.advance(KEY_FILE_INTERVAL - 0.1)
        self.assertEqual(self.watcher().adminKey, "admin-one")
        self.clock.advance(0.1)
        self.assertEqual(self.watcher(), Keys(enabled=True, apiKeys=("api-one", "api-two"), adminKey="admin-two"))

    def test_brokenOrMissingFileKeepsTheKeys(self) -> None:
        """
        A file that is not valid, or is gone, keeps the keys read last and says why once; a
        fixed file is read again.
        """
        kept = self.watcher()
        with capturedLogs() as events:
            for broken in ("api_key: [\n", "admin_key: only\n"):
                self.write(broken)
                self.clock.advance(KEY_FILE_INTERVAL)
                self.clock.advance(KEY_FILE_INTERVAL)
                self.assertEqual(self.watcher(), kept)
            self.path.unlink()
            self.clock.advance(KEY_FILE_INTERVAL)
            self.assertEqual(self.watcher(), kept)
        warnings = [event for event in events if event["log_level"] is LogLevel.warn]
        self.assertEqual(len(warnings), 3)
        self.write("api_key: api-three\nadmin_key: admin-three\n")
        self.clock.advance(KEY_FILE_INTERVAL)
        self.assertEqual(self.watcher().apiKeys, ("api-three",))

    def test_proxyFollowsTheFile(self) -> None:
        """
        Through the proxy, a revoked key is refused, a new key accepted, and the rotated admin
        key is the one sent to TabbyAPI.
        """
        proxy = InMemoryProxy(Path(self.mktemp()), {"qwen": {"model": {"model_name": "Qwen"}}},
                              keys=self.watcher(), currentKeys=self.watcher)

        def complete(key: str) -> Any:
            d = proxy.client.post("http://localhost/v1/completions", json={"model": "qwen", "prompt": "a"},
                                  headers={"Authorization": f"Bearer {key}"})
            proxy.flush()
            return self.successResultOf(d)

        self.assertEqual(complete("api-one").code, 200)
        self.write("api_key: api-two\nadmin_key: admin-two\n")
        self.clock.advance(KEY_FILE_INTERVAL)
        self.assertEqual(complete("api-one").code, 401)
        self.assertEqual(complete("api-two").code, 200)
        self.assertEqual([headers["authorization"] for _, _, headers in proxy.tabby.requests],
                         [["Bearer admin-one"], ["Bearer admin-two"]])
