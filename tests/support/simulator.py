"""
Helpers for tests that run the TabbyAPI simulator (L{tabbyproxy.simulator}) as a real child.

They build a TabbyAPI-like working directory (config.yml, api_tokens.yml, models/<name>/), spawn
the simulator in it with the reactor, wait for readiness by polling /health with a deadline, and
stop and reap the child so no process or reactor state outlives a test.  The simulator's own
tests use them, and so can the proxy's integration tests.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml
from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support.processes import ChildProcess, reactor

REPO_ROOT = Path(__file__).resolve().parents[2]


def makeTabbyDirectory(
    base: Path,
    *,
    port: int,
    models: Sequence[str] = (),
    emptyModels: Sequence[str] = (),
    modelName: str | None = None,
    apiKey: str | None = "A" * 32,
    adminKey: str = "K" * 32,
    disableAuth: bool = False,
    simulator: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    maxPositionEmbeddings: int = 4096,
) -> Path:
    """
    Create a TabbyAPI working directory at C{base} and return it.

    It holds C{config.yml} (network on 127.0.0.1:C{port}, C{model_dir: models}, optional
    C{model_name}, the C{simulator:} knobs, and any C{extra} sections merged in per section),
    C{models/<name>/config.json} for each of C{models}, an empty C{models/<name>/} for each of
    C{emptyModels} (a folder TabbyAPI lists but cannot load), and C{api_tokens.yml} with
    C{apiKey}/C{adminKey} unless C{apiKey} is None (then the server generates the file).
    """
    base.mkdir(parents=True, exist_ok=True)
    for name in models:
        folder = base / "models" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(
            json.dumps({"max_position_embeddings": maxPositionEmbeddings,
                        "architectures": ["SimulatedForCausalLM"]})
        )
    for name in emptyModels:
        (base / "models" / name).mkdir(parents=True, exist_ok=True)
    (base / "models").mkdir(exist_ok=True)
    config: dict[str, Any] = {
        "network": {"host": "127.0.0.1", "port": port, "disable_auth": disableAuth},
        "model": {"model_dir": "models"},
    }
    if modelName is not None:
        config["model"]["model_name"] = modelName
    if simulator:
        config["simulator"] = dict(simulator)
    for section, values in (extra or {}).items():
        config.setdefault(section, {}).update(values)
    (base / "config.yml").write_text(yaml.safe_dump(config))
    if apiKey is not None:
        (base / "api_tokens.yml").write_text(
            yaml.safe_dump({"api_key": apiKey, "admin_key": adminKey}))
    return base


class SimulatorProcess(ChildProcess):
    """
    A spawned simulator, expected to serve on C{port}.
    """

    def __init__(self, port: int) -> None:
        super().__init__("simulator")
        self.port = port

    def url(self, path: str = "", port: int | None = None) -> str:
        return f"http://127.0.0.1:{port if port is not None else self.port}{path}"


def spawnSimulator(
    directory: Path,
    port: int,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> SimulatorProcess:
    """
    Start C{python -m tabbyproxy.simulator *args} with C{directory} as its working directory,
    the way the proxy starts TabbyAPI, and return its protocol.  C{port} is where callers expect
    it to serve (used by L{SimulatorProcess.url}).
    """
    process = SimulatorProcess(port)
    childEnv = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONUNBUFFERED": "1",
    }
    childEnv.update(env or {})
    process.transport = reactor.spawnProcess(
        process,
        sys.executable,
        [sys.executable, "-m", "tabbyproxy.simulator", *args],
        env=childEnv,
        path=str(directory),
    )
    return process


def makeHTTPClient(testCase: Any) -> HTTPClient:
    """
    A treq client whose connections are not kept alive, closed again in the test's cleanup,
    so no socket is left in the reactor when the test ends.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    testCase.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))


async def waitForHealth(
    client: HTTPClient,
    process: SimulatorProcess,
    timeout: float = 10.0,
    port: int | None = None,
) -> None:
    """
    Poll C{GET /health} every 50 ms until it answers 200, as a scheduler should; fail when
    C{timeout} passes or the process exits first.
    """
    clock: IReactorTime = reactor
    deadline = clock.seconds() + timeout
    while True:
        if process.finished:
            raise AssertionError(
                f"simulator exited ({process.exitCode}) before becoming healthy:\n{process.text}")
        try:
            response = await client.get(process.url("/health", port), timeout=1)
            await response.content()
            if response.code == 200:
                return
        except Exception:
            # Connection refused while the simulated model loads: keep polling.
            pass
        if clock.seconds() > deadline:
            raise AssertionError(f"simulator not healthy after {timeout}s:\n{process.text}")
        await deferLater(clock, 0.05)
