"""
The real proxy service for integration tests: built by C{makeService} from command-line options,
listening on a loopback port, spawning the simulator as a real child process.  Blocking clients
(the C{openai} and C{ollama} packages) run in a thread so the reactor keeps serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import treq
import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from tabbyproxy.supervisor import Supervisor, pickFreePort
from tabbyproxy.tap import Options, makeService

T = TypeVar("T")

DEADLINE = 30.0


class RunningProxy:
    """
    A started proxy service and a treq client for it; stopped (child included) at test cleanup.
    """

    def __init__(self, testCase: TestCase, profiles: dict[str, dict[str, Any]], *arguments: str) -> None:
        root = Path(testCase.mktemp())
        configDir = root / "config"
        for profileId, document in profiles.items():
            path = configDir / f"{profileId}.yml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(document))
        self.port = pickFreePort()
        self.options = Options()
        self.options.parseOptions(
            ["--simulate", "--config-dir", str(configDir), "--listen", f"tcp:{self.port}:interface=127.0.0.1",
             *arguments]
        )
        self.service = makeService(self.options)
        self.service.startService()
        testCase.addCleanup(self.service.stopService)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        testCase.addCleanup(self.pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=self.pool))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def supervisor(self) -> Supervisor:
        [supervisor] = [s for s in self.service if isinstance(s, Supervisor)]  # type: ignore[attr-defined]
        return supervisor


def inThread(function: Callable[[], T]) -> Deferred[T]:
    """
    Run a blocking client call in a thread, bounded by L{DEADLINE}.
    """
    d: Deferred[T] = deferToThread(function)
    d.addTimeout(DEADLINE, reactor)
    return d


async def waitUntil(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """
    Check C{condition} after each short turn of the reactor until it holds; fail after
    C{timeout} seconds rather than hang.
    """
    waited = 0.0
    while not condition():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await deferLater(reactor, 0.02)
        waited += 0.02
