"""
Security (issue 4): keys never reach a log line, admin routes need the admin key, the proxy
listens on loopback by default, browser pages from other origins and rebound hosts are refused, and the generated TabbyAPI
config and the other runtime files are private (0600 in a 0700 directory) and removed on exit.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any, Iterable, cast

import yaml
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogEvent, capturedLogs, formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tabbyproxy.auth import KeyWatcher
from tabbyproxy.config import Keys
from tabbyproxy.tap import Options
from tests.support.fakes import InMemoryProxy, writeProfiles
from tests.support.processes import ChildProcess, pidAlive, reactor, waitUntil
from tests.support.proxy import RunningProxy

PROFILES: dict[str, dict[str, Any]] = {
    "alpha": {"model": {"model_name": "Alpha"}},
    "deep/beta": {"model": {"model_name": "Beta"}},
}
WRONG_KEY = "wrong-key-5f0c2a9d1e7b"


def everything(event: LogEvent) -> str:
    """
    All an observer could write about C{event}: its formatted text and every field.
    """
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += failure.getTraceback()
    return text + repr(event)


class KeysNeverLoggedTests(TestCase):
    timeout = 60

    async def test_keysAbsentFromEveryLogEvent(self) -> None:
        """
        With auth on, a session that uses every way of sending keys (right, wrong, missing, API
        key on an admin route; Bearer and x-api-key), starts and crashes a child and unloads
        it, leaves no key, nor the wrong key a client sent, in any log event the proxy emitted.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        proxy = RunningProxy(self, PROFILES, "--simulate-auth", "--stop-grace", "1")
        keys = proxy.scheduler.install.keys
        self.assertTrue(keys.enabled)
        secrets = [*keys.apiKeys, keys.adminKey, WRONG_KEY]
        api, admin = keys.apiKeys[0], keys.adminKey

        async def call(method: str, path: str, headers: dict[str | bytes, str | bytes], body: Any = None) -> int:
            response = await proxy.http.request(method, proxy.url + path, headers=headers, json=body)
            await response.content()
            code: int = response.code
            return code

        chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        self.assertEqual(await call("GET", "/v1/models", {}), 401)
        self.assertEqual(await call("GET", "/v1/models", {"Authorization": f"Bearer {WRONG_KEY}"}), 401)
        self.assertEqual(await call("GET", "/api/tags", {"x-api-key": WRONG_KEY}), 401)
        self.assertEqual(await call("POST", "/v1/chat/completions", {"Authorization": f"Bearer {api}"}, chat), 200)
        self.assertEqual(await call("POST", "/api/chat", {"x-api-key": api}, {**chat, "stream": False}), 200)
        self.assertEqual(await call("POST", "/v1/chat/completions", {"x-api-key": api},
                                    {**chat, "model": "nope/../alpha"}), 404)
        self.assertEqual(await call("POST", "/unload", {"Authorization": f"Bearer {api}"}), 401)
        self.assertEqual(await call("POST", "/unload", {"x-admin-key": admin}), 200)
        self.assertEqual(await call("POST", "/api/generate", {"x-api-key": api},
                                    {"model": "deep/beta", "prompt": "x", "stream": False}), 200)
        await proxy.service.stopService()

        self.assertGreater(len(events), 20)
        for event in events:
            text = everything(event)
            for secret in secrets:
                self.assertNotIn(secret, text, formatEvent(event))

    def test_childOutputIsRedacted(self) -> None:
        """
        A line the child prints that holds a key (TabbyAPI prints the keys it generates) is
        logged, and kept for error reports, with the key replaced by C{[redacted]}.
        """
        keys = Keys(enabled=True, apiKeys=("api-secret-1",), adminKey="admin-secret-2")
        proxy = InMemoryProxy(Path(self.mktemp()), PROFILES, keys=keys)
        proxy.tabby.healthy = False
        waiting = proxy.scheduler.acquire(proxy.catalog.profiles["alpha"])
        [process] = proxy.reactor.spawned
        with capturedLogs() as events:
            process.print("Your API key is: api-secret-1\nYour admin key is: admin-secret-2\n")
            process.exit(1)
        failure = self.failureResultOf(waiting)
        lines = [event["line"] for event in events if "line" in event]
        self.assertEqual(lines, ["Your API key is: [redacted]", "Your admin key is: [redacted]"])
        self.assertNotIn("secret", str(failure.value))
        self.assertIn("Your admin key is: [redacted]", str(failure.value))

    def test_keysAddedLaterAreRedacted(self) -> None:
        """
        The key file is followed while a child runs: a key added to it is redacted from the
        child's output from then on, and a key taken out of it still is.
        """
        keys = [Keys(enabled=True, apiKeys=("api-old-1",), adminKey="admin-old-2")]
        proxy = InMemoryProxy(Path(self.mktemp()), PROFILES, keys=keys[0], currentKeys=lambda: keys[-1])
        proxy.tabby.healthy = False
        waiting = proxy.scheduler.acquire(proxy.catalog.profiles["alpha"])
        [process] = proxy.reactor.spawned
        with capturedLogs() as events:
            process.print("old api-old-1\n")
            keys.append(Keys(enabled=True, apiKeys=("api-new-3",), adminKey="admin-new-4"))
            process.print("new api-new-3 admin-new-4, old api-old-1 admin-old-2\n")
            process.exit(1)
        self.failureResultOf(waiting)
        lines = [event["line"] for event in events if "line" in event]
        self.assertEqual(lines, ["old [redacted]", "new [redacted] [redacted], old [redacted] [redacted]"])

    def test_keysNotInRepr(self) -> None:
        """
        The keys' container never shows them in its repr (which ends up in logs and tracebacks).
        """
        text = repr(Keys(enabled=True, apiKeys=("api-secret-1",), adminKey="admin-secret-2"))
        self.assertNotIn("secret", text)


# A local user's squatter: binds the port given, says so, answers every request with 200 and
# prints what each one carried (its request line, its Authorization header, its body).
_SQUATTER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Answer(BaseHTTPRequestHandler):
    def answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        print("GOT", self.command, self.path, self.headers.get("Authorization"), body, flush=True)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = answer

    def log_message(self, *args):
        pass

server = HTTPServer(("127.0.0.1", int(sys.argv[1])), Answer)
print("LISTENING", flush=True)
server.serve_forever()
"""


class PortSquattingTests(TestCase):
    """
    Issue 10, item 1: a local user who binds the child's port before TabbyAPI does (the port is
    in /status while the model loads) gets neither a request nor a key.
    """

    timeout = 60

    async def test_squatterGetsNoRequestAndNoKey(self) -> None:
        """
        A squatter process that binds the starting child's port and answers /health with 200
        is not taken for TabbyAPI: the waiting client gets a 503 saying the port is held by
        another process, the squatter saw no request but /health and no key at all, and the
        child is stopped.
        """
        proxy = RunningProxy(self, {"slow": {"model": {"model_name": "Slow"}, "simulator": {"load_time": 60}}},
                             "--simulate-auth", "--stop-grace", "1")
        keys = proxy.scheduler.install.keys
        headers: dict[str | bytes, str | bytes] = {"Authorization": f"Bearer {keys.apiKeys[0]}"}
        waiting = proxy.http.post(proxy.url + "/v1/completions", headers=headers,
                                  json={"model": "slow", "prompt": "a secret prompt"})
        await waitUntil(lambda: proxy.scheduler.status()["pid"] is not None)
        status = proxy.scheduler.status()
        squatter = ChildProcess("squatter")
        reactor.spawnProcess(squatter, sys.executable, [sys.executable, "-c", _SQUATTER, str(status["port"])],
                             env=dict(os.environ))
        self.addCleanup(squatter.kill)
        await squatter.printed("LISTENING")

        response = await waiting
        self.assertEqual(response.code, 503)
        message = (await response.json())["error"]["message"]
        self.assertIn(f"port {status['port']} is held by a process that is not TabbyAPI for slow", message)
        await waitUntil(lambda: not proxy.scheduler.snapshot())
        self.assertFalse(pidAlive(status["pid"]))
        seen = [line for line in squatter.text.splitlines() if line.startswith("GOT")]
        self.assertTrue(seen)
        self.assertEqual({line.split()[1:4] == ["GET", "/health", "None"] for line in seen}, {True})
        for secret in (*keys.apiKeys, keys.adminKey, "a secret prompt"):
            self.assertNotIn(secret, squatter.text)


class KeyFileTests(TestCase):
    timeout = 60

    async def test_keysFollowTheFile(self) -> None:
        """
        Keys added to or revoked from api_tokens.yml while the proxy runs take effect without a
        restart, as in TabbyAPI: the new key is accepted and the revoked one refused.
        """
        proxy = RunningProxy(self, PROFILES, "--simulate-auth")
        keys = proxy.scheduler.install.keys
        old = keys.apiKeys[0]

        async def models(key: str) -> int:
            headers: dict[str | bytes, str | bytes] = {"Authorization": f"Bearer {key}"}
            response = await proxy.http.get(proxy.url + "/v1/models", headers=headers)
            await response.content()
            code: int = response.code
            return code

        self.assertEqual(await models(old), 200)
        path = proxy.scheduler.install.directory / "api_tokens.yml"
        [watcher] = [service for service in cast(Iterable[object], proxy.service) if isinstance(service, KeyWatcher)]
        self.assertEqual(await models("new-api-key"), 401)
        path.write_text(yaml.safe_dump({"api_key": ["new-api-key"], "admin_key": keys.adminKey}))
        await waitUntil(lambda: watcher().apiKeys == ("new-api-key",))
        self.assertEqual(await models("new-api-key"), 200)
        self.assertEqual(await models(old), 401)


class AdminKeyTests(SynchronousTestCase):
    def test_unloadNeedsTheAdminKey(self) -> None:
        """
        POST /unload refuses a missing key and any API key, in every header form, and
        takes the admin key in every header form.
        """
        keys = Keys(enabled=True, apiKeys=("api-1", "api-2"), adminKey="admin-key")
        proxy = InMemoryProxy(Path(self.mktemp()), PROFILES, keys=keys)
        forms = [lambda key: {"Authorization": f"Bearer {key}"}, lambda key: {"x-api-key": key},
                 lambda key: {"x-admin-key": key}]
        for method in ("POST",):
            def call(headers: dict[str, str]) -> tuple[int, Any]:
                response = self.successResultOf(proxy.client.request(method, "http://localhost/unload", headers=headers))
                return response.code, json.loads(self.successResultOf(response.content()))

            code, document = call({})
            self.assertEqual((code, document["error"]), (401, "please provide an admin key "
                                                               "(Authorization: Bearer KEY, or x-api-key: KEY)"))
            for form in forms:
                for apiKey in keys.apiKeys:
                    self.assertEqual(call(form(apiKey)), (401, {"error": "this route needs the admin key"}))
                self.assertEqual(call(form("admin-key"))[0], 200)


class ListenTests(SynchronousTestCase):
    def test_loopbackByDefault(self) -> None:
        """
        Without --listen the proxy listens on 127.0.0.1 only.
        """
        configDir = Path(self.mktemp())
        writeProfiles(configDir, PROFILES)
        options = Options()
        options.parseOptions(["--simulate", "--config-dir", str(configDir)])
        self.assertEqual(options["listen"], "tcp:9000:interface=127.0.0.1")


class CORSTests(TestCase):
    timeout = 30

    async def call(self, proxy: RunningProxy, method: str, path: str, headers: dict[str | bytes, str | bytes]) -> Any:
        response = await proxy.http.request(method, proxy.url + path, headers=headers)
        await response.content()
        return response

    async def test_foreignPagesRefusedByDefault(self) -> None:
        """
        Over a real socket, without --cors-origin: a foreign page's request and preflight get a
        403 with no CORS header, a local page's preflight a 204, and a rebound C{Host} a 403.
        """
        proxy = RunningProxy(self, PROFILES)
        response = await self.call(proxy, "GET", "/v1/models", {"Origin": "https://evil.example"})
        self.assertEqual(response.code, 403)
        self.assertFalse([name for name, _ in response.headers.getAllRawHeaders() if name.lower().startswith(b"access-control")])
        preflight = await self.call(proxy, "OPTIONS", "/v1/chat/completions", {
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        self.assertEqual(preflight.code, 403)
        local = await self.call(proxy, "OPTIONS", "/api/chat", {
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
        self.assertEqual(local.code, 204)
        self.assertEqual(local.headers.getRawHeaders("access-control-allow-origin"), ["http://localhost:3000"])
        rebound = await self.call(proxy, "GET", "/health", {"Host": "rebind.evil.example:9000"})
        self.assertEqual(rebound.code, 403)

    async def test_configuredOrigins(self) -> None:
        """
        With --cors-origin (repeatable), a preflight from a listed origin gets a 204 with the
        methods and headers it may use, its requests carry C{Access-Control-Allow-Origin} (with
        C{Vary: Origin}), errors too, and other origins get a 403.
        """
        proxy = RunningProxy(self, PROFILES, "--cors-origin", "https://chat.example", "--cors-origin", "http://lan.example:3000/")
        preflight = await self.call(proxy, "OPTIONS", "/api/chat", {
            "Origin": "http://lan.example:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        self.assertEqual(preflight.code, 204)
        self.assertEqual(preflight.headers.getRawHeaders("access-control-allow-origin"), ["http://lan.example:3000"])
        self.assertIn("POST", preflight.headers.getRawHeaders("access-control-allow-methods")[0])
        allowedHeaders = preflight.headers.getRawHeaders("access-control-allow-headers")[0].lower()
        for header in ("authorization", "content-type", "x-api-key"):
            self.assertIn(header, allowedHeaders)

        response = await self.call(proxy, "GET", "/v1/models", {"Origin": "https://chat.example"})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("access-control-allow-origin"), ["https://chat.example"])
        self.assertEqual(response.headers.getRawHeaders("vary"), ["Origin"])

        other = await self.call(proxy, "GET", "/v1/models", {"Origin": "https://evil.example"})
        self.assertEqual(other.code, 403)
        self.assertIsNone(other.headers.getRawHeaders("access-control-allow-origin"))
        errors = await self.call(proxy, "GET", "/v1/nothing", {"Origin": "https://chat.example"})
        self.assertEqual(errors.code, 404)
        self.assertEqual(errors.headers.getRawHeaders("access-control-allow-origin"), ["https://chat.example"])

    async def test_anyOrigin(self) -> None:
        """
        --cors-origin '*' lets any origin in, with C{Access-Control-Allow-Origin: *}.
        """
        proxy = RunningProxy(self, PROFILES, "--cors-origin", "*")
        response = await self.call(proxy, "GET", "/api/tags", {"Origin": "https://anything.example"})
        self.assertEqual(response.headers.getRawHeaders("access-control-allow-origin"), ["*"])

    def test_badOrigin(self) -> None:
        """
        An origin without a scheme is refused at start-up with a message saying what to give.
        """
        configDir = Path(self.mktemp())
        writeProfiles(configDir, PROFILES)
        error = self.assertRaises(UsageError, Options().parseOptions,
                                  ["--simulate", "--config-dir", str(configDir), "--cors-origin", "chat.example"])
        self.assertIn("give an origin such as https://chat.example.org, or *", str(error))


class PrivateFilesTests(TestCase):
    timeout = 30

    async def test_runtimeFilesArePrivateAndRemoved(self) -> None:
        """
        The runtime directory is 0700 and every file in it (the generated TabbyAPI config, the
        simulator's config and keys) is 0600, whatever the umask; the child's config file is
        gone once the child exits, and the whole directory once the proxy has stopped.
        """
        import os

        previous = os.umask(0)
        self.addCleanup(os.umask, previous)
        proxy = RunningProxy(self, PROFILES, "--simulate-auth")
        os.umask(previous)
        apiKey: dict[str | bytes, str | bytes] = {"x-api-key": proxy.scheduler.install.keys.apiKeys[0]}
        response = await proxy.http.post(proxy.url + "/v1/completions", json={"model": "alpha", "prompt": "x"},
                                         headers=apiKey)
        self.assertEqual(response.code, 200)
        await response.content()
        runtime = proxy.scheduler.runtimeDirectory
        childConfig = runtime / "tabby-1.yml"
        self.assertTrue(childConfig.exists())
        seen = 0
        for path in [runtime, *runtime.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            self.assertEqual(mode, 0o700 if path.is_dir() else 0o600, f"{path}: {oct(mode)}")
            seen += 1
        self.assertGreaterEqual(seen, 6)

        await proxy.service.stopService()
        self.assertFalse(childConfig.exists())
        self.assertFalse(runtime.exists())

    async def test_directoryRemovedOnlyAfterTheChildExits(self) -> None:
        """
        Stopping the proxy removes the runtime directory only once the child, which reads its
        files, has exited (even when that takes the whole grace period).
        """
        proxy = RunningProxy(self, {"deaf": {"model": {"model_name": "Deaf"}, "simulator": {"ignore_sigterm": True}}},
                             "--stop-grace", "0.5")
        response = await proxy.http.post(proxy.url + "/v1/completions", json={"model": "deaf", "prompt": "x"})
        await response.content()
        runtime = proxy.scheduler.runtimeDirectory
        stopped = proxy.service.stopService()
        await waitUntil(lambda: proxy.scheduler.status()["state"] == "stopping")
        self.assertTrue(runtime.exists())
        await stopped
        self.assertFalse(runtime.exists())


class QueryKeysNotLoggedTests(SynchronousTestCase):
    def test_keyInQueryIsMasked(self) -> None:
        """
        A key sent in the query string (which the proxy does not accept) never reaches the access
        line: values of credential-like parameters are masked, the rest of the target is kept.
        """
        from tabbyproxy.server import maskedTarget

        proxy = InMemoryProxy(Path(self.mktemp()), PROFILES,
                              keys=Keys(enabled=True, apiKeys=("api-secret-1",), adminKey="admin-secret-2"))
        with capturedLogs() as events:
            response = self.successResultOf(proxy.client.get(
                "http://localhost/v1/models?api_key=api-secret-1&x=1&Token=admin-secret-2"))
        self.assertEqual(response.code, 401)
        for event in events:
            self.assertNotIn("secret", everything(event))
        [access] = [event for event in events if event.get("route") is not None]
        self.assertEqual(access["path"], "/v1/models?api_key=***&x=1&Token=***")
        self.assertEqual(maskedTarget(b"/a?access_token=t;password=p&q=ok"), b"/a?access_token=***;password=***&q=ok")
        self.assertEqual(maskedTarget(b"/plain"), b"/plain")

    def test_encodedNamesAreMasked(self) -> None:
        """
        A credential-like parameter name is recognised once percent-decoded (C{%6B} is C{k}),
        as the server that reads it would decode it; other parameters and bare words stay.
        """
        from tabbyproxy.server import maskedTarget

        self.assertEqual(maskedTarget(b"/v1/models?%61pi_%6Bey=s1&x=%6Bey&pass%77ord=s2&session_id=s3&flag&q=a=b"),
                         b"/v1/models?%61pi_%6Bey=***&x=%6Bey&pass%77ord=***&session_id=***&flag&q=a=b")
