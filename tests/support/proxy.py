"""
The real proxy service for integration tests: built by C{makeService} from command-line options,
listening on a loopback port, spawning the simulator as a real child process.  Blocking clients
(the C{openai} and C{ollama} packages) run in a thread so the reactor keeps serving.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar, cast

import treq
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from tabbyproxy.server import ProxySite
from tabbyproxy.scheduler import Scheduler
from tabbyproxy.tap import Options, makeService
from tests.support.fakes import writeProfiles
from tests.support.processes import DEADLINE, ChildProcess, findFreePorts, killIfAlive, reactor, waitUntil
from tests.support.wire import streamedText

T = TypeVar("T")
P = TypeVar("P")


class RunningProxy:
    """
    A started proxy service and a treq client for it; stopped (child included) at test cleanup.
    """

    def __init__(self, testCase: TestCase, profiles: dict[str, dict[str, Any]], *arguments: str) -> None:
        self.profiles = profiles
        configDir = Path(testCase.mktemp()) / "config"
        writeProfiles(configDir, profiles)
        self.port = findFreePorts()
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

    async def answerProblem(self, model: str, prompt: str, maxTokens: int, streaming: bool) -> str | None:
        """
        Ask the simulated C{model} for C{maxTokens} tokens, as a streamed chat or a plain
        completion, and say what is wrong with its answer: C{None} when it is whole, carries no
        error and comes from C{model}'s folder (the simulator's text starts with its name).
        """
        folder = self.profiles[model]["model"]["model_name"] + " "
        if streaming:
            response = await self.http.post(self.url + "/v1/chat/completions", json={
                "model": model, "stream": True, "max_tokens": maxTokens,
                "messages": [{"role": "user", "content": prompt}]})
            text, events = streamedText(await response.content())
            if response.code != 200 or not text.startswith(folder) or events[-1] != "[DONE]" or \
                    any("error" in event for event in events):
                return f"{model}: {response.code} {events[-2:]}"
        else:
            response = await self.http.post(self.url + "/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": maxTokens})
            document = await response.json()
            if response.code != 200 or not document["choices"][0]["text"].startswith(folder):
                return f"{model}: {response.code} {document}"
        return None

    @property
    def scheduler(self) -> Scheduler:
        [scheduler] = [s for s in self.service if isinstance(s, Scheduler)]  # type: ignore[attr-defined]
        return scheduler

    @property
    def site(self) -> ProxySite:
        services = cast(MultiService, self.service)
        [site] = [s.factory for s in services if isinstance(getattr(s, "factory", None), ProxySite)]
        return site


class StalledClient(Generic[P]):
    """
    A raw loopback client of a streaming route that never reads its socket, with small kernel
    buffers on both ends (send buffers grow on their own and would absorb megabytes): what it
    is sent piles up in the proxy, where the test can see it.

    @ivar producer: the route's producer object for this client's request.
    """

    def __init__(self, socket_: socket.socket, producer: P) -> None:
        self.socket = socket_
        self.producer = producer
        self.transport: Any = producer.request.transport  # type: ignore[attr-defined]
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    @classmethod
    async def open(cls, testCase: TestCase, proxy: RunningProxy, producerType: type[P], path: str) -> StalledClient[P]:
        """
        Send C{GET path} and wait for the route to make its C{producerType} for it.
        """
        made: list[P] = []
        original = producerType.__init__

        def recording(producer: P, *args: Any, **kwargs: Any) -> None:
            original(producer, *args, **kwargs)
            made.append(producer)

        testCase.patch(producerType, "__init__", recording)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", proxy.port))
        testCase.addCleanup(client.close)
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode("ascii"))
        await waitUntil(lambda: bool(made))
        [producer] = made
        return cls(client, producer)

    @property
    def buffered(self) -> int:
        """
        How many bytes the proxy's transport holds for this client.
        """
        return len(self.transport.dataBuffer) + int(self.transport._tempDataLen)


def inThread(function: Callable[[], T]) -> Deferred[T]:
    """
    Run a blocking client call in a thread, bounded by L{DEADLINE}.
    """
    d: Deferred[T] = deferToThread(function)
    d.addTimeout(DEADLINE, reactor)
    return d


class TwistdProxy(ChildProcess):
    """
    The proxy as users run it: C{twistd -n tabbyproxy --simulate ...} in its own process, on a
    free loopback port.  At test cleanup a proxy still running is SIGKILLed, and so is every
    TabbyAPI child it reported, so no process outlives the test.

    @ivar childPids: the pid of each child the proxy started, as far as a test looked it up
        with L{childPid}.
    """

    def __init__(self, testCase: TestCase, profiles: dict[str, dict[str, Any]], *arguments: str) -> None:
        super().__init__("twistd")
        self.root = Path(testCase.mktemp()).absolute()
        configDir = self.root / "config"
        writeProfiles(configDir, profiles)
        self.port = findFreePorts()
        self.childPids: set[int] = set()
        # twisted.scripts.twistd has no __main__ guard, so `-m twisted.scripts.twistd` would do
        # nothing: call its run() the way the twistd script does.
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logfile=-", "tabbyproxy", "--simulate",
                "--config-dir", str(configDir), "--listen", f"tcp:{self.port}:interface=127.0.0.1", *arguments]
        process = reactor.spawnProcess(self, sys.executable, argv, env=dict(os.environ), path=str(self.root))
        self.pid: int = process.pid
        testCase.addCleanup(self._cleanUp)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=self.pool))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return not self.finished

    async def started(self) -> None:
        """
        Wait until the proxy listens.
        """
        await self.printed(f" starting on {self.port}")

    async def status(self) -> dict[str, Any]:
        response = await self.http.get(self.url + "/status")
        document: dict[str, Any] = await response.json()
        return document

    async def childPid(self) -> int | None:
        """
        The pid of the running TabbyAPI child (from C{/status}), remembered for cleanup.
        """
        pid: int | None = (await self.status())["pid"]
        if pid is not None:
            self.childPids.add(pid)
        return pid

    def rss(self) -> int:
        """
        The proxy process's resident memory in bytes, from C{/proc/PID/status}.
        """
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def runtimeDirectories(self) -> set[Path]:
        """
        The private directories of the children twistd started, from its log.
        """
        return {Path(match) for match in re.findall(r"--config (\S+)/tabby-\d+\.yml", self.text)}

    async def _cleanUp(self) -> None:
        await self.pool.closeCachedConnections()
        await self.kill()
        for pid in self.childPids:
            killIfAlive(pid)
        # A SIGKILLed twistd cannot remove its runtime directory; the test does.
        for directory in self.runtimeDirectories():
            shutil.rmtree(directory, ignore_errors=True)
