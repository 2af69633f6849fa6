#!/usr/bin/env python3
"""
The proxy's own cost, measured: one TabbyAPI simulator run directly and the proxy (which runs its
own simulator child with the same knobs) driven with the same loads in the same run, reported as
ratios proxy/direct.

The simulator runs with zero token delay for the throughput scenarios, so what separates the two
paths is the proxy.  Load comes from compiled clients: C{wrk} for throughput and latency, C{curl
--parallel} for the time to first byte of each request; L{streams} (raw sockets) times every
event of the slow-stream scenarios.  See bench/README.md.

    python bench/run.py            # the whole benchmark, a few minutes
    python bench/run.py --quick    # a smoke run of every scenario, a few seconds of load
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from streams import Stream, firstTokenWhenUp, runStreams  # noqa: E402

MODEL_NAME = "BenchModel"
MESSAGES = [{"role": "user", "content": "Tell me the story of the lighthouse keeper and the storm."}]
CHAT = "/v1/chat/completions"
OLLAMA_CHAT = "/api/chat"
TICK = os.sysconf("SC_CLK_TCK")

# Simulator knobs per proxy profile: zero delay measures the proxy's cost; "slow" is the
# realistic load (about 50 tokens/s per stream); "hold" keeps many streams open for a while.
FAST = {"token_delay": 0, "tokens": 256}
SLOW = {"token_delay": 0.02, "tokens": 256}


@dataclass(frozen=True)
class Settings:
    quick: bool
    seconds: float
    concurrency: tuple[int, ...]
    smallConcurrency: tuple[int, ...]
    ttfbTransfers: Callable[[int], int]
    realisticStreams: int
    realisticTokens: int
    holdStreams: int
    holdKnobs: dict[str, Any]
    coldRepeats: int
    settle: float

    @classmethod
    def make(cls, quick: bool, seconds: float | None) -> Settings:
        if quick:
            return cls(True, seconds or 1.0, (4,), (4,), lambda c: 8, 8, 32, 50,
                       {"token_delay": 0.05, "tokens": 10}, 1, 0.3)
        return cls(False, seconds or 5.0, (1, 16, 64, 256), (1, 16, 64), lambda c: max(4 * c, 64), 64,
                   256, 1000, {"token_delay": 0.2, "tokens": 40}, 3, 2.0)


# -- processes


def freePort() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpuSeconds(pid: int) -> float:
    """
    User plus system CPU time of a process (all its threads), in seconds.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rssMB(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class CPUWatch:
    """
    CPU used by some processes over a stretch of wall time.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.wall = time.perf_counter()
        self.cpu = [cpuSeconds(pid) for pid in self.pids]

    def percent(self) -> list[float]:
        """
        Percent of one core used by each process since this watch started.
        """
        wall = time.perf_counter() - self.wall
        return [100 * (cpuSeconds(pid) - before) / wall for pid, before in zip(self.pids, self.cpu)]

    def seconds(self) -> list[float]:
        return [cpuSeconds(pid) - before for pid, before in zip(self.pids, self.cpu)]


def request(port: int, method: str, path: str, body: Any = None, timeout: float = 120) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        connection.request(method, path, payload, {"Content-Type": "application/json"} if payload else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def waitForHealth(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with status {process.returncode} before answering on port {port}")
        try:
            if request(port, "GET", "/health", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"{what} did not answer /health on port {port} within {timeout:g}s")


def writeSimulatorDirectory(directory: Path, port: int, knobs: dict[str, Any]) -> None:
    (directory / "models" / MODEL_NAME).mkdir(parents=True, exist_ok=True)
    (directory / "models" / MODEL_NAME / "config.json").write_text(
        json.dumps({"max_position_embeddings": 8192, "architectures": ["LlamaForCausalLM"]}))
    config = {
        "network": {"host": "127.0.0.1", "port": port, "disable_auth": True},
        "model": {"model_dir": "models", "model_name": MODEL_NAME, "max_seq_len": 8192},
        "simulator": knobs,
    }
    (directory / "config.yml").write_text(yaml.safe_dump(config))


def spawnSimulator(directory: Path) -> subprocess.Popen[bytes]:
    log = open(directory / "simulator.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "tabbyproxy.simulator", "--config", "config.yml"],
        cwd=directory, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def twistdCommand() -> list[str]:
    sibling = Path(sys.executable).parent / "twistd"
    if sibling.exists():
        return [str(sibling)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


@dataclass
class Servers:
    """
    The processes of one run, stopped at the end whatever happens.
    """

    root: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    directPorts: dict[str, int] = field(default_factory=dict)
    directPids: dict[str, int] = field(default_factory=dict)
    proxyPort: int = 0
    proxy: subprocess.Popen[bytes] | None = None

    def startDirect(self, name: str, knobs: dict[str, Any]) -> int:
        directory = self.root / f"direct-{name}"
        port = freePort()
        writeSimulatorDirectory(directory, port, knobs)
        process = spawnSimulator(directory)
        self.processes.append(process)
        waitForHealth(port, process, f"the {name} simulator")
        self.directPorts[name] = port
        self.directPids[name] = process.pid
        return port

    def startProxy(self, profiles: dict[str, dict[str, Any]]) -> int:
        configDirectory = self.root / "config"
        configDirectory.mkdir()
        for profileId, knobs in profiles.items():
            document = {"model": {"model_name": MODEL_NAME, "max_seq_len": 8192}, "simulator": knobs}
            (configDirectory / f"{profileId}.yml").write_text(yaml.safe_dump(document))
        self.proxyPort = freePort()
        command = [*twistdCommand(), "-n", "--pidfile=", f"--logfile={self.root / 'proxy.log'}",
                   "tabbyproxy", "--simulate", "--config-dir", str(configDirectory),
                   "--listen", f"tcp:{self.proxyPort}:interface=127.0.0.1", "--unload-timer", "-1"]
        self.proxy = subprocess.Popen(command, cwd=self.root, env={**os.environ, "PYTHONPATH": str(REPO)},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.processes.append(self.proxy)
        waitForHealth(self.proxyPort, self.proxy, "the proxy")
        return self.proxyPort

    @property
    def proxyPid(self) -> int:
        assert self.proxy is not None
        return self.proxy.pid

    def proxyChildPid(self) -> int | None:
        status, raw = request(self.proxyPort, "GET", "/status")
        pid = json.loads(raw).get("pid") if status == 200 else None
        return int(pid) if pid else None

    def use(self, profile: str) -> None:
        """
        Make C{profile} the running model (a swap if another runs) and warm it with one request.
        """
        status, raw = request(self.proxyPort, "POST", CHAT, chatBody(profile, stream=False, maxTokens=4))
        if status != 200:
            raise SystemExit(f"the proxy could not serve {profile}: {status} {raw[:300]!r}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- loads


def chatBody(model: str, stream: bool, maxTokens: int) -> dict[str, Any]:
    return {"model": model, "stream": stream, "max_tokens": maxTokens, "messages": MESSAGES}


def ollamaBody(model: str, stream: bool, tokens: int) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": MESSAGES, "options": {"num_predict": tokens}}


@dataclass
class WrkResult:
    requestsPerSecond: float
    latencyP50: float
    latencyP99: float
    requests: int
    errors: int
    cpu: list[float]
    cpuSeconds: list[float]


def _seconds(text: str) -> float:
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("m", 60.0), ("s", 1.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def runWrk(root: Path, port: int, path: str, body: dict[str, Any], connections: int, seconds: float,
           watch: Sequence[int]) -> WrkResult:
    """
    Drive C{path} with C{connections} keep-alive connections for C{seconds}, watching the CPU of
    the processes C{watch}.
    """
    script = root / "wrk-post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [==[{json.dumps(body)}]==]\n")
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "60s", "--latency",
               "-s", str(script), f"http://127.0.0.1:{port}{path}"]
    cpu = CPUWatch(watch)
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    usage, used = cpu.percent(), cpu.seconds()
    percentiles: dict[str, float] = {}
    requests = errors = 0
    perSecond = 0.0
    inDistribution = False
    for line in output.splitlines():
        words = line.split()
        if line.strip() == "Latency Distribution":
            inDistribution = True
        elif inDistribution and len(words) == 2 and words[0].endswith("%"):
            percentiles[words[0]] = _seconds(words[1])
        elif " requests in " in line:
            requests = int(words[0])
            inDistribution = False
        elif line.startswith("Requests/sec:"):
            perSecond = float(words[1])
        elif line.strip().startswith("Non-2xx"):
            errors += int(words[-1])
        elif line.strip().startswith("Socket errors:"):
            # Timeouts only: wrk ends a run by closing the connections it still has open, which it
            # counts as read errors.
            errors += sum(int(part.split()[-1]) for part in line.split(":", 1)[1].split(",")
                          if "timeout" in part)
    return WrkResult(perSecond, percentiles.get("50%", 0.0), percentiles.get("99%", 0.0),
                     requests, errors, usage, used)


def runCurlTTFB(root: Path, port: int, path: str, body: dict[str, Any], parallel: int,
                transfers: int) -> tuple[list[float], int]:
    """
    Send C{transfers} requests, C{parallel} at a time, with curl; return each one's time to
    first byte and the count of failed ones.
    """
    bodyFile = root / "curl-body.json"
    bodyFile.write_text(json.dumps(body))
    config = root / "curl-urls.cfg"
    config.write_text(f'url = "http://127.0.0.1:{port}{path}"\noutput = "/dev/null"\n' * transfers)
    command = ["curl", "--silent", "--parallel", "--parallel-immediate", "--parallel-max", str(parallel),
               "-H", "Content-Type: application/json", "--data-binary", f"@{bodyFile}",
               "--write-out", "%{time_starttransfer} %{http_code}\\n", "--config", str(config)]
    output = subprocess.run(command, check=False, capture_output=True, text=True).stdout
    times = [float(first) for first, code in (line.split() for line in output.splitlines()) if code == "200"]
    return times, transfers - len(times)


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(share * len(ordered) + 0.5)) - 1))
    return ordered[index]


def eventsPerAnswer(port: int, path: str, body: dict[str, Any], kind: str) -> int:
    [stream] = runStreams(port, path, json.dumps(body).encode(), 1, kind=kind, timeout=60)
    if stream.error or stream.status != 200:
        raise SystemExit(f"{path} on port {port}: {stream.status} {stream.error}")
    return len(stream.events)


# -- the table


@dataclass
class Row:
    scenario: str
    load: str
    metric: str
    direct: str
    proxy: str
    compared: str
    target: str = ""
    verdict: str = ""


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.notes: list[str] = []

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"  {row.scenario} {row.load}: {row.metric} direct {row.direct} proxy {row.proxy}"
              f" -> {row.compared} {row.verdict}", file=sys.stderr, flush=True)

    def ratio(self, scenario: str, load: str, metric: str, direct: float, proxy: float, target: float | None,
              fmt: str = "{:,.0f}") -> None:
        value = proxy / direct if direct else float("nan")
        verdict = "" if target is None else ("met" if value >= target else "MISSED")
        self.add(Row(scenario, load, metric, fmt.format(direct), fmt.format(proxy), f"x{value:.2f}",
                     "" if target is None else f">= x{target:.2f}", verdict))

    def added(self, scenario: str, load: str, metric: str, direct: float, proxy: float, limit: float | None,
              unit: str = "ms") -> None:
        delta = proxy - direct
        verdict = "" if limit is None else ("met" if delta <= limit else "MISSED")
        self.add(Row(scenario, load, metric, f"{direct:.2f}", f"{proxy:.2f}", f"{delta:+.2f} {unit}",
                     "" if limit is None else f"<= +{limit:g} {unit}", verdict))

    def value(self, scenario: str, load: str, metric: str, proxy: float, limit: float | None = None,
              fmt: str = "{:.1f}", direct: str = "-", targetText: str | None = None) -> None:
        verdict = "" if limit is None else ("met" if proxy <= limit else "MISSED")
        target = targetText if targetText is not None else ("" if limit is None else f"<= {fmt.format(limit)}")
        self.add(Row(scenario, load, metric, direct, fmt.format(proxy), "", target, verdict))

    def render(self) -> str:
        header = Row("scenario", "load", "metric", "direct", "proxy", "proxy vs direct", "target", "")
        table = [header, *self.rows]
        widths = [max(len(getattr(row, name)) for row in table) for name in Row.__dataclass_fields__]
        lines = []
        for index, row in enumerate(table):
            cells = [getattr(row, name) for name in Row.__dataclass_fields__]
            lines.append("| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |")
            if index == 0:
                lines.append("|" + "|".join("-" * (width + 2) for width in widths) + "|")
        return "\n".join(lines + [""] + [f"- {note}" for note in self.notes])


# -- scenarios


def coldStart(servers: Servers, report: Report, settings: Settings) -> None:
    """
    (d) The simulator's own start (spawn to first token, polling every 5 ms) against the proxy's
    first request with no model loaded (request to first token).
    """
    body = json.dumps(chatBody("bench", True, 16)).encode()
    direct, proxied = [], []
    for attempt in range(settings.coldRepeats):
        directory = servers.root / f"cold-{attempt}"
        port = freePort()
        writeSimulatorDirectory(directory, port, FAST)
        started = time.perf_counter()
        process = spawnSimulator(directory)
        try:
            direct.append(firstTokenWhenUp(port, CHAT, body) - started)
        finally:
            process.terminate()
            process.wait(15)
        status, raw = request(servers.proxyPort, "POST", "/unload")
        if status != 200:
            raise SystemExit(f"/unload answered {status}: {raw[:200]!r}")
        started = time.perf_counter()
        proxied.append(firstTokenWhenUp(servers.proxyPort, CHAT, body) - started)
    report.added("d cold start", f"median of {settings.coldRepeats}", "start to first token ms",
                 1000 * statistics.median(direct), 1000 * statistics.median(proxied), 150)


def memory(servers: Servers, report: Report, settings: Settings) -> None:
    """
    (e) The proxy's RSS at rest, at the peak of many concurrent slow streams, and after them.
    """
    servers.use("bench-hold")
    pid = servers.proxyPid
    time.sleep(settings.settle)
    rest = rssMB(pid)
    samples: list[float] = []
    tokens = settings.holdKnobs["tokens"]
    body = json.dumps(chatBody("bench-hold", True, tokens)).encode()
    streams = runStreams(servers.proxyPort, CHAT, body, settings.holdStreams, kind="sse", timeout=300,
                         onTick=lambda: samples.append(rssMB(pid)))
    failed = [s for s in streams if s.error or s.status != 200 or len(s.events) < tokens]
    time.sleep(settings.settle)
    after = rssMB(pid)
    load = f"{settings.holdStreams} streams"
    report.value("e memory", "idle, model loaded", "proxy RSS MB", rest)
    report.value("e memory", load, "proxy RSS MB, peak", max(samples), 100)
    report.value("e memory", f"{settings.settle:g} s after them", "proxy RSS MB", after, targetText=f"<= {1.1 * rest:.1f} (rest +10%)",
                 limit=1.1 * rest)
    if failed:
        report.notes.append(f"e: {len(failed)} of {settings.holdStreams} held streams failed, e.g. "
                            f"{failed[0].status} {failed[0].error}")


def streaming(servers: Servers, report: Report, settings: Settings) -> dict[int, float]:
    """
    (a) 256-token streaming chats: relayed chunks per second and time to first byte.

    @return: the proxy's chunks per second at each concurrency, for the Ollama comparison.
    """
    servers.use("bench")
    direct, proxy = servers.directPorts["fast"], servers.proxyPort
    child = servers.proxyChildPid()
    body = chatBody("bench", True, 256)
    perAnswer = {port: eventsPerAnswer(port, CHAT, body, "sse") for port in (direct, proxy)}
    if perAnswer[direct] != perAnswer[proxy]:
        report.notes.append(f"a: the proxy relayed {perAnswer[proxy]} events per answer, direct {perAnswer[direct]}")
    proxyChunks: dict[int, float] = {}
    for connections in settings.concurrency:
        load = f"c={connections}"
        straight = runWrk(servers.root, direct, CHAT, body, connections, settings.seconds, [servers.directPids["fast"]])
        relayed = runWrk(servers.root, proxy, CHAT, body, connections, settings.seconds,
                         [servers.proxyPid] + ([child] if child else []))
        directChunks = straight.requestsPerSecond * perAnswer[direct]
        proxyChunks[connections] = relayed.requestsPerSecond * perAnswer[proxy]
        report.ratio("a stream 256", load, "chunks/s", directChunks, proxyChunks[connections], 0.90)
        report.add(Row("a stream 256", load, "CPU % of a core", f"{straight.cpu[0]:.0f} (sim)",
                       f"{relayed.cpu[0]:.0f} (+{relayed.cpu[1] if child else 0:.0f} sim)", ""))
        report.value("a stream 256", load, "proxy CPU us per chunk",
                     1e6 * relayed.cpu[0] / 100 / proxyChunks[connections] if proxyChunks[connections] else 0)
        transfers = settings.ttfbTransfers(connections)
        straightTimes, straightFailed = runCurlTTFB(servers.root, direct, CHAT, body, connections, transfers)
        relayedTimes, relayedFailed = runCurlTTFB(servers.root, proxy, CHAT, body, connections, transfers)
        limit = 2.0 if connections <= 16 else None
        report.added("a stream 256", load, "TTFB p50 ms", 1000 * percentile(straightTimes, 0.5),
                     1000 * percentile(relayedTimes, 0.5), limit)
        report.added("a stream 256", load, "TTFB p99 ms", 1000 * percentile(straightTimes, 0.99),
                     1000 * percentile(relayedTimes, 0.99), None)
        for what, result, failed in (("direct", straight, straightFailed), ("proxy", relayed, relayedFailed)):
            if result.errors or failed:
                report.notes.append(f"a {load} {what}: {result.errors} wrk errors, {failed} curl failures")
    return proxyChunks


def small(servers: Servers, report: Report, settings: Settings) -> None:
    """
    (b) Non-streaming requests of 16 tokens: requests per second and latency.
    """
    body = chatBody("bench", False, 16)
    for connections in settings.smallConcurrency:
        load = f"c={connections}"
        straight = runWrk(servers.root, servers.directPorts["fast"], CHAT, body, connections, settings.seconds,
                          [servers.directPids["fast"]])
        relayed = runWrk(servers.root, servers.proxyPort, CHAT, body, connections, settings.seconds,
                         [servers.proxyPid])
        report.ratio("b small", load, "requests/s", straight.requestsPerSecond, relayed.requestsPerSecond, None)
        report.ratio("b small", load, "CPU us per request (direct: sim)",
                     1e6 * straight.cpuSeconds[0] / max(straight.requests, 1),
                     1e6 * relayed.cpuSeconds[0] / max(relayed.requests, 1), None, fmt="{:.0f}")
        report.added("b small", load, "latency p50 ms", 1000 * straight.latencyP50, 1000 * relayed.latencyP50, None)
        report.added("b small", load, "latency p99 ms", 1000 * straight.latencyP99, 1000 * relayed.latencyP99, None)
        for what, result in (("direct", straight), ("proxy", relayed)):
            if result.errors:
                report.notes.append(f"b {load} {what}: {result.errors} errors")


def ollamaAvailable(servers: Servers) -> str | None:
    """
    Why the Ollama path cannot be measured, or C{None} when it can.
    """
    try:
        status, raw = request(servers.proxyPort, "POST", OLLAMA_CHAT, ollamaBody("bench", False, 4))
    except OSError as e:
        return f"POST {OLLAMA_CHAT} failed: {e}"
    if status != 200:
        return f"POST {OLLAMA_CHAT} answered {status}: {raw[:120].decode(errors='replace')}"
    return None


def ollama(servers: Servers, report: Report, settings: Settings, openaiChunks: dict[int, float]) -> None:
    """
    (c) The Ollama /api/chat translation path against the OpenAI path, both through the proxy.
    """
    proxy, child = servers.proxyPort, servers.proxyChildPid()
    body = ollamaBody("bench", True, 256)
    perAnswer = eventsPerAnswer(proxy, OLLAMA_CHAT, body, "ndjson")
    for connections in settings.concurrency:
        load = f"c={connections}"
        result = runWrk(servers.root, proxy, OLLAMA_CHAT, body, connections, settings.seconds,
                        [servers.proxyPid] + ([child] if child else []))
        chunks = result.requestsPerSecond * perAnswer
        report.add(Row("c ollama", load, "chunks/s (direct = OpenAI path)", f"{openaiChunks[connections]:,.0f}",
                       f"{chunks:,.0f}", f"x{chunks / openaiChunks[connections]:.2f}", ">= x0.80",
                       "met" if chunks >= 0.8 * openaiChunks[connections] else "MISSED"))
        times, failed = runCurlTTFB(servers.root, proxy, OLLAMA_CHAT, body, connections,
                                    settings.ttfbTransfers(connections))
        report.value("c ollama", load, "TTFB p50 ms", 1000 * percentile(times, 0.5), fmt="{:.2f}")
        if result.errors or failed:
            report.notes.append(f"c {load}: {result.errors} wrk errors, {failed} curl failures")


def timedStreams(port: int, path: str, body: dict[str, Any], count: int, kind: str,
                 watch: Sequence[int]) -> tuple[list[Stream], list[float], float]:
    cpu = CPUWatch(watch)
    streams = runStreams(port, path, json.dumps(body).encode(), count, kind=kind, timeout=300)
    return streams, cpu.percent(), time.perf_counter() - cpu.wall


def gaps(streams: list[Stream]) -> list[float]:
    """
    The time between consecutive events of each stream, in ms, leaving out the last event (the
    usage or C{[DONE]} event, sent right after the last token).
    """
    found: list[float] = []
    for stream in streams:
        times = stream.events[:-1]
        found.extend(1000 * (later - earlier) for earlier, later in zip(times, times[1:]))
    return found


def realistic(servers: Servers, report: Report, settings: Settings, ollamaReason: str | None) -> None:
    """
    (r) 64 concurrent streams at about 50 tokens/s each: the proxy's CPU and the jitter it adds
    to the arrival of each chunk.
    """
    servers.use("bench-slow")
    count, tokens = settings.realisticStreams, settings.realisticTokens
    load = f"{count} x {1 / SLOW['token_delay']:.0f} tok/s"
    body = chatBody("bench-slow", True, tokens)
    direct, _, _ = timedStreams(servers.directPorts["slow"], CHAT, body, count, "sse", [])
    relayed, [cpu], _ = timedStreams(servers.proxyPort, CHAT, body, count, "sse", [servers.proxyPid])
    for what, streams in (("direct", direct), ("proxy", relayed)):
        bad = [s for s in streams if s.error or s.status != 200]
        if bad:
            report.notes.append(f"r {what}: {len(bad)} streams failed, e.g. {bad[0].status} {bad[0].error}")
    report.value("r realistic", load, "proxy CPU % of a core", cpu, 30, fmt="{:.1f}")
    directGaps, proxyGaps = gaps(direct), gaps(relayed)
    report.added("r realistic", load, "chunk gap p50 ms", percentile(directGaps, 0.5), percentile(proxyGaps, 0.5), None)
    report.added("r realistic", load, "chunk gap p99 ms", percentile(directGaps, 0.99), percentile(proxyGaps, 0.99), 2)
    report.added("r realistic", load, "TTFB p50 ms", 1000 * statistics.median(s.ttfb or 0 for s in direct),
                 1000 * statistics.median(s.ttfb or 0 for s in relayed), None)
    if ollamaReason is None:
        ollamaStreams, [ollamaCPU], _ = timedStreams(servers.proxyPort, OLLAMA_CHAT, ollamaBody("bench-slow", True, tokens),
                                                     count, "ndjson", [servers.proxyPid])
        report.add(Row("r realistic", load, "Ollama CPU % (direct = OpenAI path)", f"{cpu:.1f}", f"{ollamaCPU:.1f}",
                       f"x{ollamaCPU / cpu:.2f}", "<= x2.00", "met" if ollamaCPU <= 2 * cpu else "MISSED"))
        report.added("r realistic", load, "Ollama chunk gap p99 ms (direct = sim)", percentile(directGaps, 0.99),
                     percentile(gaps(ollamaStreams), 0.99), None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: every scenario, tiny loads")
    parser.add_argument("--seconds", type=float, help="duration of each wrk run [5, or 1 with --quick]")
    parser.add_argument("--only", default="abcder", help="scenarios to run, e.g. --only ad [abcder]")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs) and print its path")
    options = parser.parse_args(argv)
    missing = [tool for tool in ("wrk", "curl") if shutil.which(tool) is None]
    if missing:
        print(f"bench: {' and '.join(missing)} not found; install with: apt-get install -y wrk curl",
              file=sys.stderr)
        return 2
    settings = Settings.make(options.quick, options.seconds)
    root = Path(tempfile.mkdtemp(prefix="tabbyproxy-bench-"))
    servers = Servers(root)
    report = Report()
    started = datetime.now(timezone.utc)
    loadBefore = os.getloadavg()[0]
    try:
        print(f"bench: starting simulators and the proxy in {root}", file=sys.stderr)
        servers.startDirect("fast", FAST)
        servers.startDirect("slow", SLOW)
        servers.startProxy({"bench": FAST, "bench-slow": SLOW, "bench-hold": settings.holdKnobs})
        servers.use("bench")
        if "d" in options.only:
            coldStart(servers, report, settings)
        if "e" in options.only:
            memory(servers, report, settings)
        openaiChunks: dict[int, float] = {}
        if "a" in options.only or "c" in options.only:
            openaiChunks = streaming(servers, report, settings)
        if "b" in options.only:
            small(servers, report, settings)
        reason = ollamaAvailable(servers)
        if "c" in options.only:
            if reason is None:
                ollama(servers, report, settings, openaiChunks)
            else:
                report.notes.append(f"c: the Ollama path was not measured: {reason}")
        if "r" in options.only:
            realistic(servers, report, settings, reason)
    finally:
        servers.stop()
        if options.keep:
            print(f"bench: logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    arguments = list(sys.argv[1:] if argv is None else argv)
    print(f"command: {shlex.join(['python', 'bench/run.py', *arguments])}")
    print(f"date: {started:%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} cores, {platform.machine()}, "
          f"Python {platform.python_version()}; 1-minute load average at start: {loadBefore:.2f}")
    print(f"wrk runs: {settings.seconds:g} s each, one thread; simulator token delay 0 unless noted")
    print()
    print(report.render())
    missed = [row for row in report.rows if row.verdict == "MISSED"]
    print(f"\ntargets: {sum(row.verdict == 'met' for row in report.rows)} met, {len(missed)} missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
