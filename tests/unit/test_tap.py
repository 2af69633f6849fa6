"""
The twistd glue: the options of C{twistd tabbyproxy} and the plugin that makes them available.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.config import Keys
from tabbyproxy.tap import Options


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class OptionsTests(SynchronousTestCase):
    """
    L{Options} parses and checks the command line.
    """

    def setUp(self) -> None:
        self.configDir = Path(self.mktemp())
        write(self.configDir / "qwen.yml", "model: {model_name: Qwen, unload_timer: 15m}\n")
        write(self.configDir / "coding" / "x.yml", "model: {model_name: X}\n")

    def parse(self, *arguments: str) -> Options:
        options = Options()
        options.parseOptions(["--config-dir", str(self.configDir), *arguments])
        return options

    def assertUsageError(self, *arguments: str) -> str:
        """
        Parsing C{arguments} (after C{--config-dir}) fails with a L{UsageError}; its message.
        """
        error = self.assertRaises(UsageError, self.parse, *arguments)
        return str(error)

    def checkout(self) -> Path:
        directory = Path(self.mktemp())
        write(directory / "main.py", "")
        write(directory / "config.yml", "network: {disable_auth: true}\n")
        return directory

    def test_simulate(self) -> None:
        """
        C{--simulate} with a valid config directory loads the catalog and asks for no checkout.
        """
        options = self.parse("--simulate")
        self.assertEqual(sorted(options.catalog.profiles), ["coding/x", "qwen"])
        self.assertEqual(options.catalog.profiles["qwen"].unloadTimer, 900.0)
        self.assertIsNone(options.install)
        self.assertTrue(options["simulate"])
        self.assertFalse(options["simulate-auth"])

    def test_simulateAuth(self) -> None:
        """
        C{--simulate-auth} goes with C{--simulate}.
        """
        options = self.parse("--simulate", "--simulate-auth")
        self.assertTrue(options["simulate-auth"])

    def test_openModelList(self) -> None:
        """
        C{--open-model-list} is off by default, and C{--help} shows it with its trade-off.
        """
        self.assertFalse(self.parse("--simulate")["open-model-list"])
        self.assertTrue(self.parse("--simulate", "--open-model-list")["open-model-list"])
        shown = " ".join(str(Options()).split())
        self.assertIn("--open-model-list", shown)
        self.assertIn("anyone who can reach the proxy then sees the profiles' names", shown)

    def test_tabbyDir(self) -> None:
        """
        C{--tabby-dir} names a TabbyAPI checkout, inspected at once (absolute path, auth as its
        config says, the interpreter given by C{--python}).
        """
        directory = self.checkout()
        options = self.parse("--tabby-dir", str(directory), "--python", "/opt/py")
        assert options.install is not None
        self.assertEqual(options.install.directory, directory.absolute())
        self.assertEqual(options.install.command, ("/opt/py", "main.py"))
        self.assertEqual(options.install.keys, Keys(enabled=False))

    def test_helpShowsEveryOptionWithItsDefault(self) -> None:
        """
        C{twistd tabbyproxy --help} shows each option that has a default with it, --cors-origin
        included, each as one readable paragraph.
        """
        usage = " ".join(Options().getUsage().split())
        for text in ("--cors-origin= Also let browser pages from ORIGIN", "any other origin gets a 403. "
                     "[default: local pages only]", "--client-timeout=", "[default: 60.0]", "--max-body-size=",
                     "[default: 16777216]", "--max-waiting=", "[default: 512]", "--stop-grace=", "[default: 10.0]",
                     "--first-token-timeout=", "[default: 300.0]", "--chunk-timeout=", "[default: 120.0]",
                     "--health-interval=", "whether it hangs. [default: 30.0]", "--hang-timeout=",
                     "starts a fresh one. [default: 60.0]", "--load-timeout=", "[default: 600.0]"):
            self.assertIn(text, usage)
        self.assertNotRegex(Options().getUsage(), r"\S {3,}\S.*extensions")

    def test_defaults(self) -> None:
        """
        Without options: listen on loopback port 9000, unload after 15 minutes, give a model
        start 10 minutes.
        """
        options = self.parse("--simulate")
        self.assertEqual(options["listen"], "tcp:9000:interface=127.0.0.1")
        self.assertEqual(options["unload-timer"], 900.0)
        self.assertEqual(options["load-timeout"], 600.0)
        self.assertEqual(options["stop-grace"], 10.0)
        self.assertEqual(options["max-waiting"], 512)
        self.assertIsNone(options["tabby-dir"])
        self.assertIsNone(options["python"])

    def test_coercedValues(self) -> None:
        """
        Durations and numbers given on the command line are converted.
        """
        options = self.parse(
            "--simulate",
            "--unload-timer", "1h30m",
            "--load-timeout", "120",
            "--stop-grace", "2.5",
            "--max-waiting", "7",
            "--listen", "unix:/tmp/tabbyproxy.sock",
        )
        self.assertEqual(options["unload-timer"], 5400.0)
        self.assertEqual(options["load-timeout"], 120.0)
        self.assertEqual(options["stop-grace"], 2.5)
        self.assertEqual(options["max-waiting"], 7)
        self.assertEqual(options["listen"], "unix:/tmp/tabbyproxy.sock")

    def test_unloadTimerNegativeIsForever(self) -> None:
        """
        A negative C{--unload-timer} means never unload.
        """
        self.assertEqual(self.parse("--simulate", "--unload-timer", "-1")["unload-timer"],
                         float("inf"))

    def test_unloadTimerBeyondGoRangeIsUsageError(self) -> None:
        """
        An C{--unload-timer} beyond Go's duration range is a usage error naming the limit, not a
        timer that later breaks C{/status}.
        """
        message = self.assertUsageError("--simulate", "--unload-timer", "99999999h")
        self.assertIn("99999999h", message)
        self.assertIn("at most 9223372037 seconds", message)

    def test_brokenProfile(self) -> None:
        """
        A broken profile is a usage error naming the file.
        """
        broken = write(self.configDir / "coding" / "broken.yml", "model: {max_seq_len: 1}\n")
        message = self.assertUsageError("--simulate")
        self.assertIn(str(broken), message)
        self.assertIn("model_name", message)

    def test_emptyConfigDir(self) -> None:
        """
        A config directory without profiles is a usage error naming it.
        """
        empty = Path(self.mktemp())
        empty.mkdir()
        error = self.assertRaises(
            UsageError, Options().parseOptions, ["--config-dir", str(empty), "--simulate"]
        )
        self.assertIn(str(empty), str(error))
        self.assertIn("no model profiles", str(error))

    def test_missingConfigDir(self) -> None:
        """
        A config directory that does not exist is a usage error naming it.
        """
        missing = self.mktemp()
        error = self.assertRaises(
            UsageError, Options().parseOptions, ["--config-dir", missing, "--simulate"]
        )
        self.assertIn(missing, str(error))

    def test_neitherTabbyDirNorSimulate(self) -> None:
        """
        Without C{--tabby-dir} or C{--simulate} there is nothing to run; the message names both.
        """
        message = self.assertUsageError()
        self.assertIn("--tabby-dir", message)
        self.assertIn("--simulate", message)

    def test_tabbyDirWithoutMainPy(self) -> None:
        """
        A C{--tabby-dir} that is not a TabbyAPI checkout is a usage error naming it and main.py.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        message = self.assertUsageError("--tabby-dir", str(directory))
        self.assertIn(str(directory.absolute()), message)
        self.assertIn("main.py", message)

    def test_tabbyDirMissing(self) -> None:
        """
        A C{--tabby-dir} that does not exist is a usage error naming it.
        """
        missing = Path(self.mktemp())
        message = self.assertUsageError("--tabby-dir", str(missing))
        self.assertIn(str(missing.absolute()), message)

    def test_bothTabbyDirAndSimulate(self) -> None:
        """
        C{--tabby-dir} and C{--simulate} exclude each other.
        """
        message = self.assertUsageError("--tabby-dir", str(self.checkout()), "--simulate")
        self.assertIn("not both", message)

    def test_simulateAuthWithoutSimulate(self) -> None:
        """
        C{--simulate-auth} alone is a usage error.
        """
        message = self.assertUsageError("--tabby-dir", str(self.checkout()), "--simulate-auth")
        self.assertIn("--simulate-auth", message)

    def test_badUnloadTimer(self) -> None:
        """
        An C{--unload-timer} that is not a duration is a usage error naming the option, quoting
        the value and showing the accepted forms.
        """
        message = self.assertUsageError("--simulate", "--unload-timer", "5 minutes")
        self.assertIn("--unload-timer '5 minutes': give seconds, or a duration such as 15m", message)

    def test_badLoadTimeout(self) -> None:
        """
        A C{--load-timeout} that is not a positive number of seconds is a usage error.
        """
        for value in ["0", "-5", "nan", "inf", "soon"]:
            message = self.assertUsageError("--simulate", "--load-timeout", value)
            self.assertIn(f"--load-timeout '{value}': give a positive number of seconds", message)

    def test_keepRequestBodies(self) -> None:
        """
        C{--keep-request-bodies} is 0 (keep no prompt) unless given; it takes a whole number of
        requests, 0 included, and refuses anything else naming the option.
        """
        self.assertEqual(self.parse("--simulate")["keep-request-bodies"], 0)
        self.assertEqual(self.parse("--simulate", "--keep-request-bodies", "20")["keep-request-bodies"], 20)
        for value in ["-1", "1.5", "all"]:
            message = self.assertUsageError("--simulate", "--keep-request-bodies", value)
            self.assertIn(f"--keep-request-bodies '{value}': give a whole number of requests", message)

    def test_badCounts(self) -> None:
        """
        C{--max-waiting} and C{--max-body-size} must be positive whole numbers.
        """
        for option in ["--max-waiting", "--max-body-size"]:
            for value in ["0", "-1", "1.5", "many"]:
                message = self.assertUsageError("--simulate", option, value)
                self.assertIn(f"{option} '{value}': give a positive whole number", message)


class PluginTests(SynchronousTestCase):
    """
    The twistd plugin.
    """

    def test_discoverable(self) -> None:
        """
        Twisted's plugin system finds exactly one service maker named C{tabbyproxy}, pointing at
        L{tabbyproxy.tap}.
        """
        makers = [maker for maker in getPlugins(IServiceMaker) if maker.tapname == "tabbyproxy"]
        self.assertEqual(len(makers), 1)
        [maker] = makers
        self.assertIs(maker.options, Options)
        self.assertTrue(maker.description)


class CollectorThresholdTests(SynchronousTestCase):
    def test_startHeapFrozenWhileServing(self) -> None:
        """
        While the proxy runs, what existed when it started is out of the collector's way
        (C{gc.freeze}), and back in once it stops.
        """
        import gc

        from tabbyproxy.tap import _CollectorThreshold

        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        service = _CollectorThreshold()
        service.startService()
        self.addCleanup(gc.unfreeze)
        self.assertGreater(gc.get_freeze_count(), 0)
        service.stopService()
        self.assertEqual(gc.get_freeze_count(), 0)

    def test_youngThresholdWhileServing(self) -> None:
        """
        While the proxy runs, a young collection comes after C{YOUNG_THRESHOLD} allocations
        (never sooner than it did), the older generations' thresholds stay as they were, and
        all three are as before once it stops.
        """
        import gc

        from tabbyproxy.tap import _CollectorThreshold

        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        for before in [(700, 10, 10), (50000, 5, 20)]:
            gc.set_threshold(*before)
            service = _CollectorThreshold()
            service.startService()
            self.assertEqual(gc.get_threshold(), (max(2000, before[0]), *before[1:]))
            service.stopService()
            self.assertEqual(gc.get_threshold(), before)


class FirstContactTests(SynchronousTestCase):
    def test_listeningAnnouncesDashboardAndCurlNotKeys(self) -> None:
        """
        Once it listens, the proxy logs its URL, the dashboard's URL, one curl to try (with a
        key placeholder when auth is on), and the file holding the simulator's keys; an address
        on every interface is shown as loopback, which is where a curl on the box reaches it.
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.defer import succeed
        from twisted.logger import capturedLogs, formatEvent

        from tabbyproxy.tap import _Announced

        class Port:
            def getHost(self) -> IPv4Address:
                return IPv4Address("TCP", "0.0.0.0", 9000)

        class Endpoint:
            def listen(self, factory: object) -> object:
                return succeed(Port())

        announced = _Announced(Endpoint(), "alpha", True, Path("/run/x/api_tokens.yml"))  # type: ignore[arg-type]
        with capturedLogs() as events:
            self.successResultOf(announced.listen(object()))
        lines = [formatEvent(event) for event in events]
        self.assertEqual(lines[:2], ["tabbyproxy listens on http://127.0.0.1:9000", "Dashboard: http://127.0.0.1:9000/ui/"])
        self.assertIn("curl http://127.0.0.1:9000/v1/chat/completions", lines[2])
        self.assertIn('"model": "alpha"', lines[2])
        self.assertIn("Authorization: Bearer $KEY", lines[2])
        self.assertEqual(lines[3], "The simulator's keys (KEY above) are in /run/x/api_tokens.yml")


class GpuOptionTests(SynchronousTestCase):
    """
    C{--gpu-memory} and C{--simulate-gpus}.
    """

    def parse(self, *arguments: str) -> Options:
        configDir = Path(self.mktemp())
        write(configDir / "m.yml", "model: {model_name: M}\n")
        options = Options()
        options.parseOptions(["--config-dir", str(configDir), *arguments])
        return options

    def test_values(self) -> None:
        """
        Both give each GPU's size in bytes by index; neither is set by default.
        """
        self.assertEqual(self.parse("--simulate", "--simulate-gpus", "2x24GiB")["simulate-gpus"],
                         {0: 24 * 1024**3, 1: 24 * 1024**3})
        self.assertEqual(self.parse("--simulate", "--gpu-memory", "1=8GiB")["gpu-memory"], {1: 8 * 1024**3})
        options = self.parse("--simulate")
        self.assertEqual((options["gpu-memory"], options["simulate-gpus"]), (None, None))

    def test_refused(self) -> None:
        """
        A malformed value, --simulate-gpus without --simulate, and both at once are usage errors
        that say what to do.
        """
        for arguments, message in [
            (("--simulate", "--gpu-memory", "24GiB"), "--gpu-memory '24GiB': give INDEX=SIZE pairs"),
            (("--simulate", "--simulate-gpus", "two"), "--simulate-gpus 'two': give a count and a size"),
            (("--tabby-dir", "x", "--simulate-gpus", "1x8G"), "--simulate-gpus only makes sense with --simulate"),
            (("--simulate", "--simulate-gpus", "1x8G", "--gpu-memory", "0=8G"), "not both"),
        ]:
            with self.subTest(arguments=arguments):
                self.assertIn(message, str(self.assertRaises(UsageError, self.parse, *arguments)))


class FailedStartTests(SynchronousTestCase):
    def test_failedBuildLeavesNoRuntimeDirectory(self) -> None:
        """
        When building the service fails after the runtime directory was made (here the
        --listen endpoint cannot be parsed), the directory is removed before the error goes on.
        """
        import tempfile

        from tabbyproxy.tap import makeService

        configDir = Path(self.mktemp())
        configDir.mkdir()
        (configDir / "alpha.yml").write_text("model: {model_name: Alpha}\n")
        options = Options()
        options.parseOptions(["--simulate", "--config-dir", str(configDir), "--listen", "nosuchendpoint:1"])
        made: list[str] = []
        original = tempfile.mkdtemp

        def recording(*args: Any, **kwargs: Any) -> str:
            path = original(*args, **kwargs)
            made.append(path)
            return path

        self.patch(tempfile, "mkdtemp", recording)
        self.assertRaises(Exception, makeService, options)
        [path] = made
        self.assertFalse(Path(path).exists())

    def test_busyListenPortLeavesNoRuntimeDirectory(self) -> None:
        """
        A start that fails because the --listen port is busy leaves no runtime directory
        behind in the temp folder.
        """
        import socket

        from twisted.internet.error import CannotListenError

        from tabbyproxy.tap import _ProxyService, makeService

        configDir = Path(self.mktemp())
        configDir.mkdir()
        (configDir / "alpha.yml").write_text("model: {model_name: Alpha}\n")
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            options = Options()
            options.parseOptions(["--simulate", "--config-dir", str(configDir),
                                  "--listen", f"tcp:{port}:interface=127.0.0.1"])
            service = makeService(options)
            assert isinstance(service, _ProxyService)
            runtime = service.runtime
            self.assertTrue(runtime.is_dir())
            self.assertRaises(CannotListenError, service.privilegedStartService)
        self.assertFalse(runtime.exists())
