"""
The proxy under load (issue 4, fault tests 6 and 10): many concurrent clients over several
models, and a slow client reading a fast generation, with the simulator as a real child.
"""

from __future__ import annotations

import json
import select
import socket
import time
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.support.processes import reactor as _reactor
from tests.support.processes import DEADLINE, waitUntil
from tests.support.proxy import RunningProxy, TwistdProxy
from tests.support.logs import CapturedEvents

# The global reactor, typed as what these tests use of it.
reactor: Any = _reactor

CLIENTS = 20
ROUNDS = 10
MODELS = ("m0", "m1", "m2")


class ConcurrentLoadTests(TestCase):
    timeout = 90

    async def test_twoHundredRequestsAcrossThreeModels(self) -> None:
        """
        200 requests from 20 concurrent clients over 3 models, streaming and not, in 10 rounds:
        in each round half the clients ask for the loaded model and, once the proxy has taken all
        of those (most still in flight), the other half ask for the next one.  Every request gets its own model's complete answer
        (the simulator's text starts with the model folder name; streams end with [DONE]), no
        stream is cut by the swaps, and the spawns are exactly what the rules predict: the first
        model, then one per round (the second half's model, which the next round's first half
        then finds loaded), 11 in all.
        """
        events = CapturedEvents(self)
        profiles: dict[str, dict[str, Any]] = {
            name: {"model": {"model_name": name.upper() + "-exl3"}, "simulator": {"token_delay": 0.005}}
            for name in MODELS}
        proxy = RunningProxy(self, profiles)
        failures: list[str] = []

        async def one(client: int, model: str) -> None:
            problem = await proxy.answerProblem(model, f"client {client}", 12, streaming=client % 2 == 0)
            if problem is not None:
                failures.append(f"client {client} {problem}")

        for round in range(ROUNDS):
            loaded, following = MODELS[round % 3], MODELS[(round + 1) % 3]
            first = [Deferred.fromCoroutine(one(client, loaded)) for client in range(CLIENTS // 2)]
            # The second half goes out once the proxy has granted every request of the first half
            # (each is in flight or done): arrival order across connections is not send order.
            await waitUntil(lambda: proxy.scheduler.status()["in_flight"] + sum(d.called for d in first)
                            >= CLIENTS // 2)
            second = [Deferred.fromCoroutine(one(client, following)) for client in range(CLIENTS // 2, CLIENTS)]
            await gatherResults(first + second).addTimeout(30, reactor)

        self.assertEqual(failures, [])
        expected = [MODELS[0]] + [MODELS[(round + 1) % 3] for round in range(ROUNDS)]
        self.assertEqual(events.starts(), expected)
        self.assertEqual(proxy.scheduler.starts, ROUNDS + 1)
        self.assertEqual(set(events.stops()), {f"making room for {model}" for model in MODELS})
        status = proxy.scheduler.status()
        self.assertEqual((status["in_flight"], status["waiting"], status["last_error"]), (0, 0, None))


# ------------------------------------------------------------------------------------------------
# Fault 10: a slow client does not grow the proxy's memory


class _SlowReader(Protocol):
    """
    Sends one raw HTTP request and then reads its answer slowly: after each read it stops
    reading for C{pause} seconds, so the proxy's writes back up.
    """

    def __init__(self, request: bytes, pause: float) -> None:
        self.request = request
        self.pause = pause
        self.received = 0
        self.reads = 0
        self.closed: Deferred[None] = Deferred()
        self._resume: Any = None

    def connectionMade(self) -> None:
        # A small receive buffer, so the kernel cannot absorb the stream for the proxy.
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # type: ignore[union-attr]
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.reads += 1
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self._resume = reactor.callLater(self.pause, self.transport.resumeProducing)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self.closed.callback(None)

    def stop(self) -> Deferred[None]:
        self.transport.abortConnection()  # type: ignore[union-attr]
        return self.closed


class SlowClientTests(TestCase):
    timeout = 60

    async def test_slowReaderDoesNotGrowProxyMemory(self) -> None:
        """
        A client that reads a long, fast generation in small sips (a 4 KiB receive buffer, a
        pause after every read; about 2.5 s in all) does not make the proxy buffer it: the
        upstream is paused (backpressure), so the twistd process's RSS grows by less than 8 MB,
        while the simulator produces over 10 MB a second (with registerProducer disabled, the
        proxy grew by 65 MB here).  When the client leaves, the proxy closes the upstream
        request.
        """
        proxy = TwistdProxy(self, {"fast": {"model": {"model_name": "Fast"}, "simulator": {"token_delay": 0}}})
        await proxy.started()
        warm = await proxy.http.post(proxy.url + "/v1/completions", json={"model": "fast", "prompt": "x"})
        await warm.content()
        await proxy.childPid()

        body = json.dumps({"model": "fast", "stream": True, "max_tokens": 400000,
                           "messages": [{"role": "user", "content": "go on"}]}).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        reader = _SlowReader(request, pause=0.05)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port).connect(Factory.forProtocol(lambda: reader))
        await waitUntil(lambda: reader.reads >= 3, timeout=10)
        baseline = proxy.rss()
        await waitUntil(lambda: reader.reads >= 15, timeout=20)
        grown = proxy.rss() - baseline
        await reader.stop()
        self.assertLess(grown, 8 * 1024 * 1024, f"the proxy grew by {grown / 1e6:.1f} MB")
        await proxy.printed("cancelled by user")


# ------------------------------------------------------------------------------------------------
# Issue 10, item 8: a burst of connections is queued by the kernel, not reset


BURST = 300


def _connectAll(port: int, count: int, within: float) -> tuple[list[socket.socket], int]:
    """
    Open C{count} non-blocking connections to C{port} at once, and wait at most C{within}
    seconds for their handshakes (the proxy's reactor, which runs this, accepts none meanwhile:
    only the kernel's listen backlog holds them).

    @return: the sockets, and how many of them connected.
    """
    sockets = []
    for _ in range(count):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        sockets.append(client)
    pending = {client.fileno(): client for client in sockets}
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLOUT)
    deadline = time.monotonic() + within
    connected = 0
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(max(deadline - time.monotonic(), 0) * 1000):
            poller.unregister(fd)
            if pending.pop(fd).getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                connected += 1
    return sockets, connected


def _askAll(sockets: list[socket.socket]) -> list[bytes]:
    """
    Send C{GET /health} on each connection and read each answer to its end (in a thread, while
    the reactor serves them).
    """
    answers = []
    for client in sockets:
        client.setblocking(True)
        client.settimeout(DEADLINE)
        client.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    for client in sockets:
        received = b""
        while chunk := client.recv(65536):
            received += chunk
        answers.append(received)
    return answers


class ConnectionBurstTests(TestCase):
    timeout = 60

    async def test_burstIsQueuedNotDropped(self) -> None:
        """
        300 clients connecting at the same moment, while the proxy accepts none, all complete
        their TCP handshake at once (the listen backlog is the system's somaxconn, not Twisted's
        50, which left all but 51 retrying their SYN a second later or reset), and each gets
        its answer.
        """
        proxy = RunningProxy(self, {"m0": {"model": {"model_name": "M0"}}})
        sockets, connected = _connectAll(proxy.port, BURST, within=0.9)
        for client in sockets:
            self.addCleanup(client.close)
        self.assertEqual(connected, BURST)
        answers = await deferToThread(_askAll, sockets)
        self.assertEqual([answer.split(b"\r\n", 1)[0] for answer in answers], [b"HTTP/1.1 200 OK"] * BURST)
