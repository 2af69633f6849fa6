#!/usr/bin/env python3
"""
The proxy's own cost, measured: one TabbyAPI simulator run directly, nginx in front of it (the
practical limit of a streaming relay), Twisted's own TCP relay in front of it (the least any relay
on the proxy's stack can cost), and the proxy (which runs its own simulator child with the same
knobs), driven with the same loads in the same run, in interleaved rounds, and reported as the
proxy's ratios to direct, to nginx and to the Twisted relay.

The simulator runs with zero token delay for the throughput scenarios, so what separates the
paths is the relay, and writes each token in its own reactor turn as TabbyAPI does.  Load comes from compiled clients: C{wrk} for throughput and latency, C{curl
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
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

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

# The contenders, in the order of a round's first turn (later rounds rotate it).
CONTENDERS = ("direct", "nginx", "twisted", "proxy")

# Simulator knobs per proxy profile: zero delay measures the relay's cost; "slow" is the
# realistic load (about 50 tokens/s per stream); "hold" keeps many streams open for a while.
# token_turns: even with no delay, each token is written in its own reactor turn (its own TCP
# write), as TabbyAPI does, so that no relay is handed whole answers to coalesce.
FAST = {"token_delay": 0, "tokens": 256, "token_turns": True}
SLOW = {"token_delay": 0.02, "tokens": 256}

# The proxy's profile for each kind of simulator (the other contenders ignore the model name).
PROFILES = {"fast": "bench", "slow": "bench-slow", "hold": "bench-hold", "twin": "bench-twin"}


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
    rounds: int
    settle: float

    @classmethod
    def make(cls, quick: bool, seconds: float | None, rounds: int | None) -> Settings:
        if quick:
            return cls(True, seconds or 1.0, (4,), (4,), lambda c: 8, 8, 32, 50,
                       {"token_delay": 0.05, "tokens": 10}, rounds or 1, 0.3)
        return cls(False, seconds or 3.0, (1, 16, 64, 256), (1, 16, 64), lambda c: max(4 * c, 64), 64,
                   256, 1000, {"token_delay": 0.2, "tokens": 40}, rounds or 3, 2.0)


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


class Sigterm:
    """
    SIGTERM (a timeout, a CI job cancelled) ends the run like an exception, so that the cleanup
    stops every process the run started and removes its directory; a second SIGTERM waits for it.
    While a process is being started and handed to whoever stops it (L{owning}), the exit waits:
    raised between the fork and that hand-over, it would leave the process running, stopped by
    nobody.
    """

    def __init__(self) -> None:
        self.owning = 0
        self.pending: int | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.received)

    def received(self, signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.owning:
            self.pending = signum
            return
        raise SystemExit(128 + signum)

    @contextmanager
    def handingOver(self) -> Iterator[None]:
        """
        Hold a SIGTERM back while the block starts a process and gives it to its owner.
        """
        self.owning += 1
        try:
            yield
        finally:
            self.owning -= 1
            if not self.owning and self.pending is not None:
                raise SystemExit(128 + self.pending)


SIGTERM = Sigterm()


def runTool(command: Sequence[str], check: bool) -> str:
    """
    Run a load generator to its end and return what it printed; stopped with the run.
    """
    process: subprocess.Popen[str] | None = None
    try:
        with SIGTERM.handingOver():
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        output, errors = process.communicate()
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
    if check and process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command, output, errors)
    return output


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


def nginxBinary() -> str | None:
    return shutil.which("nginx") or next(
        (str(path) for path in (Path("/usr/sbin/nginx"), Path("/usr/local/sbin/nginx")) if path.exists()), None)


NGINX_CONF = """\
# nginx as a plain streaming reverse proxy, the reference for what a relay costs: one worker
# process (no master, so its CPU and memory are this one process's), no response buffering,
# HTTP/1.1 keep-alive to the upstream, an access log line per request as the proxy writes.
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 8192;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {root}/nginx-access.log;
    client_body_temp_path {root}/nginx-tmp/body;
    proxy_temp_path {root}/nginx-tmp/proxy;
    fastcgi_temp_path {root}/nginx-tmp/fastcgi;
    uwsgi_temp_path {root}/nginx-tmp/uwsgi;
    scgi_temp_path {root}/nginx-tmp/scgi;
    keepalive_requests 1000000;
{servers}
}}
"""

NGINX_SERVER = """\
    upstream {kind} {{ server 127.0.0.1:{upstream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://{kind};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}"""


@dataclass
class Servers:
    """
    The processes of one run, stopped at the end whatever happens.
    """

    root: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    directPorts: dict[str, int] = field(default_factory=dict)
    directPids: dict[str, int] = field(default_factory=dict)
    nginxPorts: dict[str, int] = field(default_factory=dict)
    nginx: subprocess.Popen[bytes] | None = None
    # Twisted's relay: one process in front of each direct simulator, by kind.
    twistedPorts: dict[str, int] = field(default_factory=dict)
    twisted: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    proxyPort: int = 0
    proxy: subprocess.Popen[bytes] | None = None
    # Each process's RSS at rest before its first burst of streams, by pid (see memory).
    idleRSS: dict[int, float] = field(default_factory=dict)

    def startDirect(self, name: str, knobs: dict[str, Any]) -> int:
        directory = self.root / f"direct-{name}"
        port = freePort()
        writeSimulatorDirectory(directory, port, knobs)
        with SIGTERM.handingOver():
            process = spawnSimulator(directory)
            self.processes.append(process)
        waitForHealth(port, process, f"the {name} simulator")
        self.directPorts[name] = port
        self.directPids[name] = process.pid
        return port

    def startNginx(self) -> str | None:
        """
        Start nginx in the foreground, as a child stopped with the others, in front of each
        direct simulator.

        @return: why nginx is not measured, or C{None} once it answers on every port.
        """
        binary = nginxBinary()
        if binary is None:
            return "nginx is not installed (apt-get install -y nginx)"
        (self.root / "nginx-tmp").mkdir()
        self.nginxPorts = {kind: freePort() for kind in self.directPorts}
        servers = "\n".join(NGINX_SERVER.format(kind=kind, upstream=self.directPorts[kind], port=port)
                            for kind, port in self.nginxPorts.items())
        config = self.root / "nginx.conf"
        config.write_text(NGINX_CONF.format(root=self.root, servers=servers))
        with open(self.root / "nginx-stderr.log", "wb") as log, SIGTERM.handingOver():
            self.nginx = subprocess.Popen(
                [binary, "-p", str(self.root), "-e", str(self.root / "nginx-error.log"), "-c", str(config)],
                cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            self.processes.append(self.nginx)
        for port in self.nginxPorts.values():
            waitForHealth(port, self.nginx, "nginx")
        return None

    def startTwisted(self) -> None:
        """
        Start Twisted's own TCP relay (bench/floor.py) in front of each direct simulator: the
        bytes of each client connection copied to a new connection upstream and back, with no
        HTTP in between, on the proxy's reactor and interpreter.  No relay built on them can cost
        less; what the proxy costs above it is the proxy's own code.
        """
        for kind, upstream in self.directPorts.items():
            port = freePort()
            with open(self.root / f"twisted-{kind}.log", "wb") as log, SIGTERM.handingOver():
                process = subprocess.Popen([sys.executable, str(HERE / "floor.py"), str(port), str(upstream)],
                                           cwd=self.root, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT)
                self.processes.append(process)
            self.twisted[kind], self.twistedPorts[kind] = process, port
        for kind, port in self.twistedPorts.items():
            waitForHealth(port, self.twisted[kind], f"Twisted's relay to the {kind} simulator")

    def startProxy(self, profiles: dict[str, dict[str, Any]], repo: Path = REPO, name: str = "proxy") -> int:
        """
        Start the proxy from the source tree C{repo} (bench/ab.py starts one per tree, each
        with its own C{name} for its files).
        """
        configDirectory = self.root / ("config" if name == "proxy" else f"config-{name}")
        configDirectory.mkdir()
        for profileId, knobs in profiles.items():
            document = {"model": {"model_name": MODEL_NAME, "max_seq_len": 8192}, "simulator": knobs}
            (configDirectory / f"{profileId}.yml").write_text(yaml.safe_dump(document))
        self.proxyPort = freePort()
        command = [*twistdCommand(), "-n", "--pidfile=", f"--logfile={self.root / f'{name}.log'}",
                   "tabbyproxy", "--simulate", "--config-dir", str(configDirectory),
                   "--listen", f"tcp:{self.proxyPort}:interface=127.0.0.1", "--unload-timer", "-1",
                   # Room for every profile at once (each is estimated at 1 GiB), so scenarios never
                   # swap models; scenario m unloads to compare one model with two.
                   "--simulate-gpus", "2x24GiB"]
        with SIGTERM.handingOver():
            self.proxy = subprocess.Popen(command, cwd=self.root, env={**os.environ, "PYTHONPATH": str(repo)},
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

    def port(self, contender: str, kind: str) -> int:
        if contender == "direct":
            return self.directPorts[kind]
        if contender == "nginx":
            return self.nginxPorts[kind]
        if contender == "twisted":
            return self.twistedPorts[kind]
        return self.proxyPort

    def pid(self, contender: str, kind: str) -> int:
        """
        The process whose CPU and memory are the contender's cost (for direct: the simulator's).
        """
        if contender == "direct":
            return self.directPids[kind]
        if contender == "nginx":
            assert self.nginx is not None
            return self.nginx.pid
        if contender == "twisted":
            return self.twisted[kind].pid
        return self.proxyPid

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
    # One script per body, so that two runs at once (scenario m) each send their own.
    script = root / f"wrk-post-{zlib.crc32(json.dumps(body).encode()):08x}.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [==[{json.dumps(body)}]==]\n")
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "60s", "--latency",
               "-s", str(script), f"http://127.0.0.1:{port}{path}"]
    cpu = CPUWatch(watch)
    output = runTool(command, check=True)
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
    output = runTool(command, check=False)
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


@dataclass(frozen=True)
class Target:
    """
    A target of issue 5 or 15 for one figure, judged on the medians of its contenders.

    @ivar met: given the medians by contender, whether the target is met, or C{None} when a
        contender it needs was not measured.
    """

    text: str
    met: Callable[[dict[str, float]], bool | None]


def atLeastTimes(share: float, of: str = "direct") -> Target:
    return Target(f">= x{share:.2f} {of}",
                  lambda m: None if of not in m or "proxy" not in m else m["proxy"] >= share * m[of])


def atMostTimes(share: float, of: str = "nginx") -> Target:
    return Target(f"<= x{share:.2f} {of}",
                  lambda m: None if of not in m or "proxy" not in m else m["proxy"] <= share * m[of])


def atMostAdded(limit: float, unit: str = "ms") -> Target:
    return Target(f"<= +{limit:g} {unit} direct",
                  lambda m: None if "direct" not in m or "proxy" not in m else m["proxy"] - m["direct"] <= limit)


def atMost(limit: float, fmt: str = "{:g}") -> Target:
    return Target(f"<= {fmt.format(limit)}", lambda m: None if "proxy" not in m else m["proxy"] <= limit)


def atLeast(limit: float, fmt: str = "{:g}") -> Target:
    return Target(f">= {fmt.format(limit)}", lambda m: None if "proxy" not in m else m["proxy"] >= limit)


@dataclass
class Figure:
    """
    One row of the table: a metric at one load, one value per contender and round.

    @ivar kind: C{"ratio"} for rates, costs and sizes (compared as proxy / other), C{"time"}
        for times in ms (compared as proxy - other, with the ratio beside it), C{"plain"} for a
        figure of the proxy's alone.
    """

    scenario: str
    load: str
    metric: str
    kind: str
    fmt: str
    target: Target | None
    values: dict[str, list[float]] = field(default_factory=dict)

    def medians(self) -> dict[str, float]:
        return {name: statistics.median(found) for name, found in self.values.items() if found}

    def verdict(self) -> str:
        if self.target is None:
            return ""
        met = self.target.met(self.medians())
        return "n/a" if met is None else ("met" if met else "MISSED")

    def compared(self, other: str, subject: str = "proxy") -> str:
        medians = self.medians()
        if self.kind == "plain" or subject not in medians or other not in medians:
            return "-"
        value, base = medians[subject], medians[other]
        ratio = f"x{value / base:.2f}" if base else "x-"
        if self.kind == "time":
            return f"{value - base:+.2f} ms ({ratio})"
        return ratio


ROW_HEADER = ("scenario", "load", "metric", "direct", "nginx", "twisted", "proxy", "proxy vs direct",
              "proxy vs nginx", "twisted vs nginx", "proxy vs twisted", "target", "")


class Report:
    """
    The figures of every round, shown as medians over the rounds.
    """

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.figures: dict[tuple[str, str, str], Figure] = {}
        self.notes: list[str] = []

    def record(self, scenario: str, load: str, metric: str, contender: str, value: float, kind: str = "ratio",
               fmt: str = "{:,.1f}", target: Target | None = None) -> None:
        key = (scenario, load, metric)
        figure = self.figures.get(key)
        if figure is None:
            figure = self.figures[key] = Figure(scenario, load, metric, kind, fmt, target)
        figure.values.setdefault(contender, []).append(value)
        print(f"  {scenario} {load}: {metric} {contender} {fmt.format(value)}", file=sys.stderr, flush=True)

    def median(self, scenario: str, load: str, metric: str, contender: str) -> float | None:
        figure = self.figures.get((scenario, load, metric))
        return None if figure is None else figure.medians().get(contender)

    def cells(self, figure: Figure) -> tuple[str, ...]:
        medians = figure.medians()
        shown = tuple(figure.fmt.format(medians[name]) if name in medians else "-" for name in CONTENDERS)
        return (figure.scenario, figure.load, figure.metric, *shown, figure.compared("direct"),
                figure.compared("nginx"), figure.compared("nginx", "twisted"), figure.compared("twisted"),
                figure.target.text if figure.target else "", figure.verdict())

    def render(self) -> str:
        table = [ROW_HEADER, *(self.cells(figure) for figure in self.figures.values())]
        widths = [max(len(row[column]) for row in table) for column in range(len(ROW_HEADER))]
        lines = []
        for index, row in enumerate(table):
            lines.append("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |")
            if index == 0:
                lines.append("|" + "|".join("-" * (width + 2) for width in widths) + "|")
        return "\n".join(lines + [""] + [f"- {note}" for note in self.notes])

    def verdicts(self) -> list[str]:
        return [figure.verdict() for figure in self.figures.values()]


# -- scenarios


@dataclass
class Round:
    """
    What a scenario needs to run one round: the servers, the contenders in this round's order,
    and where the figures go.
    """

    servers: Servers
    report: Report
    settings: Settings
    contenders: tuple[str, ...]
    number: int

    def prepare(self, contender: str, kind: str) -> None:
        if contender == "proxy":
            self.servers.use(PROFILES[kind])

    def watch(self, contender: str, kind: str) -> list[int]:
        return [self.servers.pid(contender, kind)]


def coldStart(run: Round) -> None:
    """
    (d) The simulator's own start (spawn to first token, polling every 5 ms) against the proxy's
    first request with no model loaded (request to first token).  The relays have no start of
    their own to compare.
    """
    servers, report = run.servers, run.report
    body = json.dumps(chatBody("bench", True, 16)).encode()
    load = f"median of {run.settings.rounds}"
    for contender in run.contenders:
        if contender == "direct":
            directory = servers.root / f"cold-{run.number}"
            port = freePort()
            writeSimulatorDirectory(directory, port, FAST)
            started = time.perf_counter()
            with SIGTERM.handingOver():
                process = spawnSimulator(directory)
                servers.processes.append(process)
            try:
                took = firstTokenWhenUp(port, CHAT, body) - started
            finally:
                process.terminate()
                process.wait(15)
        elif contender == "proxy":
            status, raw = request(servers.proxyPort, "POST", "/unload")
            if status != 200:
                raise SystemExit(f"/unload answered {status}: {raw[:200]!r}")
            started = time.perf_counter()
            took = firstTokenWhenUp(servers.proxyPort, CHAT, body) - started
        else:
            continue
        report.record("d cold start", load, "start to first token ms", contender, 1000 * took, "time", "{:.2f}",
                      atMostAdded(150))


def memory(run: Round) -> None:
    """
    (e) The relay's RSS at rest, at the peak of many concurrent slow streams, and after them.
    """
    settings, report = run.settings, run.report
    tokens = settings.holdKnobs["tokens"]
    body = json.dumps(chatBody(PROFILES["hold"], True, tokens)).encode()
    load = f"{settings.holdStreams} streams"
    for contender in run.contenders:
        if contender == "direct":
            continue
        run.prepare(contender, "hold")
        pid = run.servers.pid(contender, "hold")
        time.sleep(settings.settle)
        # The idle figure is the one before the process's first burst: CPython keeps the arenas
        # a burst grew, so a later round's "idle" is the last burst's high-water mark, and the
        # figure after the streams would be judged against itself.
        rest = run.servers.idleRSS.setdefault(pid, rssMB(pid))
        samples: list[float] = [rssMB(pid)]
        streams = runStreams(run.servers.port(contender, "hold"), CHAT, body, settings.holdStreams, kind="sse",
                             timeout=300, onTick=lambda: samples.append(rssMB(pid)))
        failed = [s for s in streams if s.error or s.status != 200 or len(s.events) < tokens]
        time.sleep(settings.settle)
        after = rssMB(pid)
        report.record("e memory", "idle, before the first streams", "RSS MB", contender, rest)
        report.record("e memory", load, "RSS MB, peak", contender, max(samples), target=atMost(64))
        report.record("e memory", load, "KB per stream at the peak", contender,
                      1024 * (max(samples) - rest) / settings.holdStreams, fmt="{:.1f}")
        report.record("e memory", f"{settings.settle:g} s after them", "RSS / idle RSS", contender, after / rest,
                      fmt="{:.2f}", target=atMost(1.10, "{:.2f}"))
        if failed:
            report.notes.append(f"e {contender} round {run.number}: {len(failed)} of {settings.holdStreams} held "
                                f"streams failed, e.g. {failed[0].status} {failed[0].error}")


def streaming(run: Round, perAnswer: dict[str, int]) -> dict[int, float]:
    """
    (a) 256-token streaming chats: relayed chunks per second, CPU, and time to first byte.

    @param perAnswer: events per answer by contender, counted once per run (filled here).
    @return: the proxy's chunks per second at each concurrency this round, for the Ollama path.
    """
    servers, report, settings = run.servers, run.report, run.settings
    body = chatBody(PROFILES["fast"], True, 256)
    for contender in run.contenders:
        run.prepare(contender, "fast")
        if contender not in perAnswer:
            perAnswer[contender] = eventsPerAnswer(servers.port(contender, "fast"), CHAT, body, "sse")
            if perAnswer[contender] != perAnswer.get("direct", perAnswer[contender]):
                report.notes.append(f"a: {contender} relayed {perAnswer[contender]} events per answer, "
                                    f"direct {perAnswer['direct']}")
    proxyChunks: dict[int, float] = {}
    for connections in settings.concurrency:
        load = f"c={connections}"
        for contender in run.contenders:
            result = runWrk(servers.root, servers.port(contender, "fast"), CHAT, body, connections,
                            settings.seconds, run.watch(contender, "fast"))
            chunks = result.requestsPerSecond * perAnswer[contender]
            if contender == "proxy":
                proxyChunks[connections] = chunks
            report.record("a stream 256", load, "chunks/s", contender, chunks, fmt="{:,.0f}",
                          target=atLeastTimes(0.90))
            report.record("a stream 256", load, "CPU % of a core (direct: sim)", contender, result.cpu[0],
                          fmt="{:.0f}")
            report.record("a stream 256", load, "CPU us per chunk (direct: sim)", contender,
                          1e6 * result.cpuSeconds[0] / max(result.requests * perAnswer[contender], 1),
                          fmt="{:.2f}", target=atMostTimes(1.3))
            if result.errors:
                report.notes.append(f"a {load} {contender} round {run.number}: {result.errors} wrk errors")
        transfers = settings.ttfbTransfers(connections)
        for contender in run.contenders:
            times, failed = runCurlTTFB(servers.root, servers.port(contender, "fast"), CHAT, body, connections,
                                        transfers)
            report.record("a stream 256", load, "TTFB p50 ms", contender, 1000 * percentile(times, 0.5), "time",
                          "{:.2f}", atMostAdded(2) if connections <= 16 else None)
            report.record("a stream 256", load, "TTFB p99 ms", contender, 1000 * percentile(times, 0.99), "time",
                          "{:.2f}")
            if failed:
                report.notes.append(f"a {load} {contender} round {run.number}: {failed} curl failures")
    return proxyChunks


def small(run: Round) -> None:
    """
    (b) Non-streaming requests of 16 tokens: requests per second, CPU per request and latency.
    """
    servers, report, settings = run.servers, run.report, run.settings
    body = chatBody(PROFILES["fast"], False, 16)
    for connections in settings.smallConcurrency:
        load = f"c={connections}"
        for contender in run.contenders:
            run.prepare(contender, "fast")
            result = runWrk(servers.root, servers.port(contender, "fast"), CHAT, body, connections,
                            settings.seconds, run.watch(contender, "fast"))
            report.record("b small", load, "requests/s", contender, result.requestsPerSecond, fmt="{:,.0f}")
            report.record("b small", load, "CPU us per request (direct: sim)", contender,
                          1e6 * result.cpuSeconds[0] / max(result.requests, 1), fmt="{:.0f}", target=atMost(350))
            report.record("b small", load, "latency p50 ms", contender, 1000 * result.latencyP50, "time", "{:.2f}")
            report.record("b small", load, "latency p99 ms", contender, 1000 * result.latencyP99, "time", "{:.2f}")
            if result.errors:
                report.notes.append(f"b {load} {contender} round {run.number}: {result.errors} errors")


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


def ollama(run: Round, openaiChunks: dict[int, float]) -> None:
    """
    (c) The Ollama /api/chat translation path against the OpenAI path, both through the proxy
    (the other contenders have no such path: the ratio is to the proxy's own OpenAI figure of the
    same round).
    """
    servers, report, settings = run.servers, run.report, run.settings
    run.prepare("proxy", "fast")
    body = ollamaBody(PROFILES["fast"], True, 256)
    perAnswer = eventsPerAnswer(servers.proxyPort, OLLAMA_CHAT, body, "ndjson")
    for connections in settings.concurrency:
        load = f"c={connections}"
        result = runWrk(servers.root, servers.proxyPort, OLLAMA_CHAT, body, connections, settings.seconds,
                        run.watch("proxy", "fast"))
        chunks = result.requestsPerSecond * perAnswer
        report.record("c ollama", load, "chunks/s", "proxy", chunks, "plain", "{:,.0f}")
        if connections in openaiChunks:
            report.record("c ollama", load, "chunks/s / OpenAI path's", "proxy",
                          chunks / openaiChunks[connections] if openaiChunks[connections] else 0, "plain", "{:.2f}",
                          atLeast(0.80, "{:.2f}"))
        report.record("c ollama", load, "CPU us per chunk", "proxy",
                      1e6 * result.cpuSeconds[0] / max(result.requests * perAnswer, 1), "plain", "{:.2f}")
        times, failed = runCurlTTFB(servers.root, servers.proxyPort, OLLAMA_CHAT, body, connections,
                                    settings.ttfbTransfers(connections))
        report.record("c ollama", load, "TTFB p50 ms", "proxy", 1000 * percentile(times, 0.5), "plain", "{:.2f}")
        if result.errors or failed:
            report.notes.append(f"c {load} round {run.number}: {result.errors} wrk errors, {failed} curl failures")


def timedStreams(port: int, path: str, body: dict[str, Any], count: int, kind: str,
                 watch: Sequence[int]) -> tuple[list[Stream], list[float], float]:
    """
    C{count} streams opened at once (as many clients arriving together do), timed event by event.
    """
    cpu = CPUWatch(watch)
    streams = runStreams(port, path, json.dumps(body).encode(), count, kind=kind, timeout=300, openPerTurn=count)
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


def realistic(run: Round, ollamaReason: str | None) -> None:
    """
    (r) 64 concurrent streams at about 50 tokens/s each, opened at once: the relay's CPU, the
    jitter it adds to the arrival of each chunk, and the time to first byte.
    """
    report, settings = run.report, run.settings
    count, tokens = settings.realisticStreams, settings.realisticTokens
    load = f"{count} x {1 / SLOW['token_delay']:.0f} tok/s"
    body = chatBody(PROFILES["slow"], True, tokens)
    proxyCPU = None
    for contender in run.contenders:
        run.prepare(contender, "slow")
        streams, [cpu], _ = timedStreams(run.servers.port(contender, "slow"), CHAT, body, count, "sse",
                                         run.watch(contender, "slow"))
        bad = [s for s in streams if s.error or s.status != 200]
        if bad:
            report.notes.append(f"r {contender} round {run.number}: {len(bad)} streams failed, e.g. "
                                f"{bad[0].status} {bad[0].error}")
        if contender == "proxy":
            proxyCPU = cpu
        report.record("r realistic", load, "CPU % of a core (direct: sim)", contender, cpu, fmt="{:.1f}",
                      target=atMost(30))
        found = gaps(streams)
        report.record("r realistic", load, "chunk gap p50 ms", contender, percentile(found, 0.5), "time", "{:.2f}")
        report.record("r realistic", load, "chunk gap p99 ms", contender, percentile(found, 0.99), "time", "{:.2f}",
                      atMostAdded(2))
        firstBytes = [1000 * s.ttfb for s in streams if s.ttfb is not None]
        report.record("r realistic", load, "TTFB p50 ms", contender, percentile(firstBytes, 0.5), "time", "{:.2f}",
                      atMostAdded(10))
        report.record("r realistic", load, "TTFB p99 ms", contender, percentile(firstBytes, 0.99), "time", "{:.2f}",
                      atMostAdded(20))
    if ollamaReason is None and proxyCPU is not None:
        run.prepare("proxy", "slow")
        _, [ollamaCPU], _ = timedStreams(run.servers.proxyPort, OLLAMA_CHAT, ollamaBody(PROFILES["slow"], True, tokens),
                                         count, "ndjson", run.watch("proxy", "slow"))
        report.record("r realistic", load, "Ollama CPU / OpenAI path's", "proxy",
                      ollamaCPU / proxyCPU if proxyCPU else 0, "plain", "{:.2f}", atMost(2.0, "{:.2f}"))


# The agents' APIs: their streaming bodies for the same answer as chatBody's.
AGENT_PATHS = {
    "/v1/messages": lambda model, tokens: {"model": model, "stream": True, "max_tokens": tokens, "messages": MESSAGES},
    "/v1/responses": lambda model, tokens: {"model": model, "stream": True, "max_output_tokens": tokens,
                                            "input": MESSAGES[0]["content"], "store": False},
}


def agentAPIs(run: Round, openaiChunks: dict[int, float]) -> None:
    """
    (c) The Anthropic Messages and OpenAI Responses translations, streaming 256 tokens, beside
    /api/chat: events per second as a ratio to the proxy's OpenAI path of the same round.
    """
    servers, report, settings = run.servers, run.report, run.settings
    run.prepare("proxy", "fast")
    for path, makeBody in AGENT_PATHS.items():
        body = makeBody(PROFILES["fast"], 256)
        perAnswer = eventsPerAnswer(servers.proxyPort, path, body, "sse")
        scenario = f"c {path.rsplit('/', 1)[1]}"
        for connections in settings.concurrency:
            load = f"c={connections}"
            result = runWrk(servers.root, servers.proxyPort, path, body, connections, settings.seconds,
                            run.watch("proxy", "fast"))
            chunks = result.requestsPerSecond * perAnswer
            report.record(scenario, load, "events/s", "proxy", chunks, "plain", "{:,.0f}")
            if openaiChunks.get(connections):
                report.record(scenario, load, "events/s / OpenAI path's chunks/s", "proxy",
                              chunks / openaiChunks[connections], "plain", "{:.2f}")
            report.record(scenario, load, "CPU us per event", "proxy",
                          1e6 * result.cpuSeconds[0] / max(result.requests * perAnswer, 1), "plain", "{:.2f}")
            if result.errors:
                report.notes.append(f"{scenario} {load} round {run.number}: {result.errors} wrk errors")


def severalModels(run: Round) -> None:
    """
    (m) Two models served at once against one: 256-token streams at c=16 to the one model alone
    (the other unloaded), then c=8 to each of two loaded models at the same time.  The proxy's CPU
    per relayed chunk, two models over one, shows what a second child costs the relay.
    """
    servers, report, settings = run.servers, run.report, run.settings
    connections = 16
    bodies = {kind: chatBody(PROFILES[kind], True, 256) for kind in ("fast", "twin")}
    perAnswer = eventsPerAnswer(servers.proxyPort, CHAT, bodies["fast"], "sse")
    status, raw = request(servers.proxyPort, "POST", f"/unload?model={PROFILES['twin']}")
    if status != 200:
        raise SystemExit(f"/unload answered {status}: {raw[:200]!r}")
    run.prepare("proxy", "fast")
    one = runWrk(servers.root, servers.proxyPort, CHAT, bodies["fast"], connections, settings.seconds,
                 run.watch("proxy", "fast"))
    run.prepare("proxy", "twin")
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda body: runWrk(servers.root, servers.proxyPort, CHAT, body, connections // 2,
                                                 settings.seconds, run.watch("proxy", "fast")),
                             bodies.values()))
    load = f"c={connections}"
    oneChunks = one.requests * perAnswer
    bothChunks = sum(result.requests for result in both) * perAnswer
    # The two runs overlap but for their start: the longer CPU interval covers both.
    bothCPU = max(result.cpuSeconds[0] for result in both)
    oneCost = 1e6 * one.cpuSeconds[0] / max(oneChunks, 1)
    bothCost = 1e6 * bothCPU / max(bothChunks, 1)
    report.record("m two models", load, "chunks/s, one model", "proxy", one.requestsPerSecond * perAnswer,
                  "plain", "{:,.0f}")
    report.record("m two models", load, "chunks/s, two models", "proxy",
                  sum(result.requestsPerSecond for result in both) * perAnswer, "plain", "{:,.0f}")
    report.record("m two models", load, "CPU us per chunk, one model", "proxy", oneCost, "plain", "{:.2f}")
    report.record("m two models", load, "CPU us per chunk, two models", "proxy", bothCost, "plain", "{:.2f}")
    report.record("m two models", load, "CPU per chunk, two models / one", "proxy", bothCost / oneCost, "plain",
                  "{:.2f}", atMost(1.05, "{:.2f}"))
    errors = one.errors + sum(result.errors for result in both)
    if errors:
        report.notes.append(f"m round {run.number}: {errors} wrk errors")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: every scenario, tiny loads, one round")
    parser.add_argument("--seconds", type=float, help="duration of each wrk run [3, or 1 with --quick]")
    parser.add_argument("--rounds", type=int, help="interleaved rounds; the table shows medians [3, or 1 with --quick]")
    parser.add_argument("--only", default="abcderm", help="scenarios to run, e.g. --only ad [abcderm]")
    parser.add_argument("--without", default="", help="contenders to leave out, e.g. --without nginx")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs) and print its path")
    options = parser.parse_args(argv)
    missing = [tool for tool in ("wrk", "curl") if shutil.which(tool) is None]
    if missing:
        print(f"bench: {' and '.join(missing)} not found; install with: apt-get install -y wrk curl",
              file=sys.stderr)
        return 2
    settings = Settings.make(options.quick, options.seconds, options.rounds)
    root = Path(tempfile.mkdtemp(prefix="tabbyproxy-bench-"))
    servers = Servers(root)
    report = Report(settings.rounds)
    contenders = [name for name in CONTENDERS if name not in options.without.split(",")]
    started = datetime.now(timezone.utc)
    loadBefore = os.getloadavg()[0]
    SIGTERM.install()
    try:
        print(f"bench: starting simulators, nginx, Twisted's relay and the proxy in {root}", file=sys.stderr)
        servers.startDirect("fast", FAST)
        servers.startDirect("slow", SLOW)
        servers.startDirect("hold", settings.holdKnobs)
        if "nginx" in contenders:
            why = servers.startNginx()
            if why is not None:
                contenders.remove("nginx")
                report.notes.append(f"nginx was not measured: {why}")
        if "twisted" in contenders:
            servers.startTwisted()
        servers.startProxy({PROFILES["fast"]: FAST, PROFILES["slow"]: SLOW, PROFILES["hold"]: settings.holdKnobs,
                            PROFILES["twin"]: FAST})
        servers.use(PROFILES["fast"])
        reason = ollamaAvailable(servers)
        if reason is not None and "c" in options.only:
            report.notes.append(f"c: the Ollama path was not measured: {reason}")
        perAnswer: dict[str, int] = {}
        for number in range(settings.rounds):
            # Each round starts with the next contender, so none is always the first after a swap.
            shift = number % len(contenders)
            run = Round(servers, report, settings, tuple(contenders[shift:] + contenders[:shift]), number + 1)
            print(f"bench: round {number + 1} of {settings.rounds}: {', '.join(run.contenders)}", file=sys.stderr)
            if "d" in options.only:
                coldStart(run)
            if "e" in options.only:
                memory(run)
            openaiChunks: dict[int, float] = {}
            if "a" in options.only or "c" in options.only:
                openaiChunks = streaming(run, perAnswer)
            if "b" in options.only:
                small(run)
            if "c" in options.only and reason is None:
                ollama(run, openaiChunks)
            if "c" in options.only:
                agentAPIs(run, openaiChunks)
            if "r" in options.only:
                realistic(run, reason)
            if "m" in options.only:
                severalModels(run)
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
    print(f"wrk runs: {settings.seconds:g} s each, one thread; medians of {settings.rounds} interleaved rounds; "
          f"simulator token delay 0 unless noted; contenders: {', '.join(contenders)}")
    print()
    print(report.render())
    verdicts = report.verdicts()
    print(f"\ntargets: {verdicts.count('met')} met, {verdicts.count('MISSED')} missed, "
          f"{verdicts.count('n/a')} not judged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
