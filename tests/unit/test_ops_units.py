"""
The operations helpers on their own: the config check, the in-memory log, the metrics registry.
"""

from __future__ import annotations

import io
import json
import sys
import weakref
from pathlib import Path
from typing import cast

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from tabbyproxy.check import main as check
from tabbyproxy.logbuffer import LogBuffer, LogBufferService
from tabbyproxy.metrics import Metrics
from tests.support.fakes import InMemoryProxy, SiteAgent


def writeProfile(directory: Path, profileId: str, text: str) -> None:
    path = directory / f"{profileId}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class CheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.config = self.root / "config"
        writeProfile(self.config, "good", "model: {model_name: Good}\n")

    def check(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        return check(list(argv), out), out.getvalue()

    def test_simulateIsFine(self) -> None:
        """
        With --simulate and valid profiles the check passes and lists each profile.
        """
        code, report = self.check("--simulate", "--config-dir", str(self.config))
        self.assertEqual(code, 0)
        self.assertIn("ok: profile good: model Good", report)
        self.assertTrue(report.rstrip().endswith("OK: 1 profile(s) in " + str(self.config)))

    def test_brokenProfileFails(self) -> None:
        """
        A broken profile fails the check with a line naming the file.
        """
        writeProfile(self.config, "bad", "model: [\n")
        code, report = self.check("--simulate", "--config-dir", str(self.config))
        self.assertEqual(code, 1)
        self.assertIn("bad.yml: not valid YAML", report)

    def test_missingModelFolderFails(self) -> None:
        """
        Against a TabbyAPI folder, a profile whose model folder has no config.json fails the
        check, naming the folder; a present one passes.
        """
        tabby = self.root / "tabby"
        (tabby / "models" / "Good").mkdir(parents=True)
        (tabby / "main.py").write_text("")
        (tabby / "config.yml").write_text(yaml.safe_dump({"network": {"disable_auth": True}}))
        writeProfile(self.config, "absent", "model: {model_name: Absent}\n")
        (tabby / "models" / "Good" / "config.json").write_text("{}")
        code, report = self.check("--tabby-dir", str(tabby), "--config-dir", str(self.config), "--python", "/bin/sh")
        self.assertEqual(code, 1)
        self.assertIn("error: profile absent: no config.json in", report)
        self.assertIn("ok: profile good: model folder", report)
        self.assertIn("ok: profile good: any GPU, GPU memory 1.0 GiB, estimated: weights 0.0 GiB (no *.safetensors in", report)
        self.assertIn("auth off", report)

    def test_gpuMemoryShown(self) -> None:
        """
        Each profile's GPUs and memory are shown: declared ones even with --simulate.
        """
        writeProfile(self.config, "big", "model: {model_name: Big}\ngpus: [0, 1]\nmemory: 18GiB\npersistent: true\n")
        code, report = self.check("--simulate", "--config-dir", str(self.config))
        self.assertEqual(code, 0)
        self.assertIn("ok: profile big: GPU 0, 1, persistent, GPU memory 36.0 GiB, declared: 18.0 GiB on each of GPU 0, 1",
                      report)
        self.assertNotIn("profile good: any GPU", report)

    def checkout(self, config: dict[str, object], models: dict[str, str]) -> Path:
        """
        A TabbyAPI folder with C{config} as its config.yml and a model folder per profile, each
        of the given quantization (C{exl2} or C{exl3}).
        """
        tabby = self.root / "tabby"
        tabby.mkdir(parents=True, exist_ok=True)
        (tabby / "main.py").write_text("")
        (tabby / "config.yml").write_text(yaml.safe_dump(config))
        for name, method in models.items():
            writeProfile(self.config, name.lower(), f"model: {{model_name: {name}}}\n")
            (tabby / "models" / name).mkdir(parents=True, exist_ok=True)
            (tabby / "models" / name / "config.json").write_text(
                json.dumps({"quantization_config": {"quant_method": method}}))
        return tabby

    def interpreter(self, **packages: str) -> str:
        """
        An interpreter for TabbyAPI: this one, seeing stand-in packages whose __init__ holds the
        given code (C{raise ImportError(...)} for a broken install).
        """
        stubs = self.root / "stubs"
        for name, code in packages.items():
            (stubs / name).mkdir(parents=True)
            (stubs / name / "__init__.py").write_text(code)
        wrapper = self.root.absolute() / "python"
        wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={stubs.absolute()} exec {sys.executable} "$@"\n')
        wrapper.chmod(0o755)
        return str(wrapper)

    def test_writesNothing(self) -> None:
        """
        With auth on and no api_tokens.yml yet, the check creates no file: it says a start will
        create the keys.
        """
        tabby = self.checkout({}, {"Good": "exl3"})
        before = sorted(tabby.rglob("*"))
        code, report = self.check("--tabby-dir", str(tabby), "--config-dir", str(self.config),
                                  "--python", self.interpreter(torch="", exllamav3=""))
        self.assertEqual(sorted(tabby.rglob("*")), before)
        self.assertIn("it does not exist yet", report)
        self.assertEqual(code, 0, report)

    def test_backendThatCannotBeImported(self) -> None:
        """
        An exllamav3 that is installed but fails to import fails the check with its error line.
        """
        tabby = self.checkout({"network": {"disable_auth": True}}, {"Good": "exl3"})
        python = self.interpreter(torch="", exllamav3="raise ImportError('libcudart.so.13: cannot open shared object file')")
        code, report = self.check("--tabby-dir", str(tabby), "--config-dir", str(self.config), "--python", python)
        self.assertEqual(code, 1, report)
        self.assertIn("cannot import exllamav3 (ImportError: libcudart.so.13: cannot open shared object file): "
                      "every model would fail to load", report)

    def test_missingDependenciesWithoutUnsafeLaunch(self) -> None:
        """
        Without torch and exllamav3, TabbyAPI refuses to start unless developer.unsafe_launch:
        the check says so, and with unsafe_launch says that loads would fail.
        """
        tabby = self.checkout({"network": {"disable_auth": True}}, {"Good": "exl3"})
        python = self.interpreter()
        code, report = self.check("--tabby-dir", str(tabby), "--config-dir", str(self.config), "--python", python)
        self.assertEqual(code, 1, report)
        self.assertIn("TabbyAPI would refuse to start", report)
        self.assertIn("has no torch or exllamav3", report)
        self.checkout({"network": {"disable_auth": True}, "developer": {"unsafe_launch": True}}, {})
        code, report = self.check("--tabby-dir", str(tabby), "--config-dir", str(self.config), "--python", python)
        self.assertEqual(code, 1, report)
        self.assertNotIn("refuse to start", report)
        self.assertIn("has no exllamav3: every model would fail to load", report)

    def test_exl2Models(self) -> None:
        """
        An exl2 model needs a TabbyAPI with the exllamav2 backend, and exllamav2 in its
        interpreter.
        """
        tabby = self.checkout({"network": {"disable_auth": True}}, {"Good": "exl3", "Old": "exl2"})
        python = self.interpreter(torch="", exllamav3="")
        code, report = self.check("--tabby-dir", str(tabby), "--config-dir", str(self.config), "--python", python)
        self.assertEqual(code, 1, report)
        self.assertIn("profiles old: exl2 models, and this TabbyAPI has no exllamav2 backend", report)
        (tabby / "backends" / "exllamav2").mkdir(parents=True)
        code, report = self.check("--tabby-dir", str(tabby), "--config-dir", str(self.config), "--python", python)
        self.assertEqual(code, 1, report)
        self.assertIn("has no exllamav2: the exl2 models of old would fail to load", report)
        self.assertIn("imports exllamav3", report)


class LogBufferTests(SynchronousTestCase):
    def test_recordsAndSubscribers(self) -> None:
        """
        The buffer keeps the last records, marks TabbyAPI's lines, keeps structured fields, and
        hands each new record to subscribers until they unsubscribe.
        """
        publisher = LogPublisher()
        buffer = LogBuffer(size=2)
        service = LogBufferService(buffer, publisher)
        service.startService()
        log = Logger(observer=publisher)
        seen: list[str] = []
        unsubscribe = buffer.subscribe(lambda record: seen.append(record["text"]))
        log.info("Starting {model}", model="a")
        log.info("[{model}] {line}", model="a", line="Model successfully loaded.")
        unsubscribe()
        log.warn("late {model}", model="b")
        service.stopService()
        log.info("after stop")
        records = list(buffer)
        self.assertEqual([r["text"] for r in records], ["Model successfully loaded.", "late b"])
        self.assertEqual([r["source"] for r in records], ["tabby", "proxy"])
        self.assertEqual(records[1]["level"], LogLevel.warn.name)
        self.assertEqual(records[0]["model"], "a")
        self.assertEqual(seen, ["Starting a", "Model successfully loaded."])

    def test_recordsAsFormattedKeepingNothingAlive(self) -> None:
        """
        A record's text and time read later are what Twisted formats for the event, whatever its
        fields, and the buffer keeps neither the event's source nor the objects it names.
        """
        publisher = LogPublisher()
        buffer = LogBuffer()
        publisher.addObserver(buffer)

        class Source:
            log = Logger(observer=publisher)

            def __repr__(self) -> str:
                return "<a source>"

        source = Source()
        named = Source()
        formatted: list[str] = []
        publisher.addObserver(cast(ILogObserver, lambda event: formatted.append(formatEvent(event))))
        source.log.info("GET {path} {status} {seconds:.3f}s{forModel}", path="/health", status=200,
                        seconds=0.00123, forModel="", request_id="r1")
        source.log.info("Named {thing!r} and {thing.log.namespace}, {missing}", thing=named)
        source.log.info("{a[0]} {b}", a="xy", b=None)
        references = weakref.ref(source), weakref.ref(named)
        del source, named
        self.assertEqual([ref() for ref in references], [None, None])
        records = list(buffer)
        self.assertEqual([record["text"] for record in records], formatted)
        self.assertEqual(records[0]["text"], "GET /health 200 0.001s")
        self.assertEqual((records[0]["request_id"], records[0]["status"]), ("r1", 200))
        self.assertRegex(records[0]["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")


class MetricsTests(SynchronousTestCase):
    def test_requestSeriesFoundOnce(self) -> None:
        """
        L{Metrics.forRequest} gives the same series for the same route, model and status, and
        they count in the registry's own series; a request without a model has no first-byte or
        chunk series, so none with an empty model appears.
        """
        metrics = Metrics()
        series = metrics.forRequest("/v1/chat/completions", "qwen", 200)
        self.assertIs(metrics.forRequest("/v1/chat/completions", "qwen", 200), series)
        self.assertIsNot(metrics.forRequest("/v1/chat/completions", "qwen", 500), series)
        series.requests.inc()
        series.requests.inc()
        self.assertEqual(
            metrics.registry.get_sample_value(
                "tabbyproxy_requests_total", {"route": "/v1/chat/completions", "model": "qwen", "status": "200"}),
            2)
        modelless = metrics.forRequest("/status", "", 200)
        self.assertEqual((modelless.firstByte, modelless.chunks), (None, None))
        self.assertIsNone(metrics.registry.get_sample_value(
            "tabbyproxy_time_to_first_byte_seconds_count", {"route": "/status", "model": ""}))
        self.assertIsNone(metrics.registry.get_sample_value("tabbyproxy_stream_chunks_relayed_total", {"model": ""}))

    def test_exposition(self) -> None:
        """
        The registry's text parses with Prometheus' own parser and carries the counters, the
        histograms and the live state read at scrape time.
        """
        metrics = Metrics()
        state = {
            "in_flight": 2, "waiting": 1,
            "children": [
                {"model": "qwen", "state": "ready", "memory": {"accounted": {"0": 9 * 2**30, "1": 2**30}}},
                {"model": "embed", "state": "starting", "memory": {"accounted": {"1": 2**30}}},
            ],
            "gpus": [{"index": 0, "capacity_bytes": 24 * 2**30, "accounted_bytes": 9 * 2**30},
                     {"index": 1, "capacity_bytes": 24 * 2**30, "accounted_bytes": 2 * 2**30}],
        }
        metrics.watch(lambda: state)
        metrics.requests.labels("/v1/chat/completions", "qwen", "200").inc()
        metrics.loadSeconds.labels("qwen").observe(3.5)
        families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
        [request] = families["tabbyproxy_requests"].samples[:1]
        self.assertEqual(request.labels, {"route": "/v1/chat/completions", "model": "qwen", "status": "200"})
        self.assertEqual(request.value, 1)
        self.assertIn("tabbyproxy_model_load_seconds", families)
        self.assertEqual(families["tabbyproxy_requests_in_flight"].samples[0].value, 2)
        self.assertEqual(families["tabbyproxy_requests_waiting"].samples[0].value, 1)
        self.assertEqual([(sample.labels, sample.value) for sample in families["tabbyproxy_model_loaded"].samples],
                         [({"model": "qwen", "state": "ready"}, 1), ({"model": "embed", "state": "starting"}, 1)])
        self.assertEqual(
            {(sample.labels["model"], sample.labels["gpu"]): sample.value
             for sample in families["tabbyproxy_model_memory_bytes"].samples},
            {("qwen", "0"): 9 * 2**30, ("qwen", "1"): 2**30, ("embed", "1"): 2**30})
        self.assertEqual({sample.labels["gpu"]: sample.value for sample in families["tabbyproxy_gpu_accounted_bytes"].samples},
                         {"0": 9 * 2**30, "1": 2 * 2**30})
        self.assertEqual({sample.labels["gpu"]: sample.value for sample in families["tabbyproxy_gpu_capacity_bytes"].samples},
                         {"0": 24 * 2**30, "1": 24 * 2**30})


class RouteLabelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = InMemoryProxy(Path(self.mktemp()), {"alpha": {"model": {"model_name": "Alpha"}}})
        self.agent = SiteAgent(self.proxy.site)

    def get(self, target: bytes) -> int:
        """
        Send C{target} as it is, without a client's normalisation, and return the status.
        """
        answered = self.agent.request(b"GET", b"http://localhost" + target, Headers({b"Host": [b"localhost"]}))
        self.agent.flush()
        code: int = self.successResultOf(answered).code
        return code

    def routeLabels(self) -> dict[str, float]:
        return {sample.labels["route"]: sample.value
                for family in self.proxy.state.metrics.registry.collect() if family.name == "tabbyproxy_requests"
                for sample in family.samples if sample.name == "tabbyproxy_requests_total"}

    def test_labelledByTheMatchedRoute(self) -> None:
        """
        Every spelling of a route's path counts under the route's rule (variable parts as
        C{{name}}), and every path no route matches under one C{unmatched} label, however many
        different paths are tried: the metrics cannot be grown by requests.
        """
        for target in (b"/health", b"//health", b"/h%65alth", b"///status", b"/v1/models/alpha",
                       b"/v1/models/%61lpha"):
            self.assertEqual(self.get(target), 200, target)
        for number in range(50):
            self.assertEqual(self.get(b"/nope/%d" % (number,)), 404)
            self.assertEqual(self.get(b"/v1/nope%d" % (number,)), 404)
        self.assertEqual(self.routeLabels(),
                         {"/health": 3, "/status": 1, "/v1/models/{name}": 2, "unmatched": 100})
