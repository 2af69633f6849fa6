"""
The processes integration tests start (the simulator, C{twistd} itself) and the ones they only
watch by pid: one process protocol that collects a child's output, fires waiters when a
fragment appears and tells how the child ended, plus the waiters and pid helpers every
integration test shares (bounded by L{DEADLINE}, and aware of zombies).
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any, Callable

from twisted.internet import reactor as _globalReactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from tabbyproxy.listener import processStat

# The default reactor, typed loosely: it provides process, TCP and time interfaces at once.
reactor: Any = _globalReactor

# How long any wait in an integration test may take before it fails instead of hanging.
DEADLINE = 30.0


class ChildProcess(ProcessProtocol):
    """
    A child a test spawned: its combined stdout and stderr, waiters for what it prints, and how
    it ended.

    @ivar exitReason: the L{Failure} it ended with (L{ProcessDone} or L{ProcessTerminated}),
        None while it runs.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.output = bytearray()
        self.transport: IProcessTransport | None = None
        self.exitReason: Failure | None = None
        self.exitCode: int | None = None
        self.exitSignal: int | None = None
        self._printWaiters: list[tuple[bytes, Deferred[None]]] = []
        self._exitWaiters: list[Deferred[int]] = []

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    @property
    def finished(self) -> bool:
        return self.exitReason is not None

    @property
    def returnCode(self) -> int:
        """
        The exit code, or minus the signal that killed it (as L{subprocess} reports it).
        """
        if self.exitCode is not None:
            return self.exitCode
        return -(self.exitSignal or 0)

    # -- ProcessProtocol

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data
        for waiter in list(self._printWaiters):
            fragment, d = waiter
            if fragment in self.output:
                self._printWaiters.remove(waiter)
                d.callback(None)

    def processEnded(self, reason: Failure) -> None:
        self.exitReason = reason
        if isinstance(reason.value, ProcessTerminated):
            self.exitCode = reason.value.exitCode
            self.exitSignal = reason.value.signal
        else:
            self.exitCode = 0
        printWaiters, self._printWaiters = self._printWaiters, []
        for fragment, d in printWaiters:
            d.errback(AssertionError(f"{self.name} exited before printing {fragment!r}:\n{self.text}"))
        exitWaiters, self._exitWaiters = self._exitWaiters, []
        for exitWaiter in exitWaiters:
            exitWaiter.callback(self.returnCode)

    # -- what tests use

    def printed(self, fragment: str, timeout: float = DEADLINE) -> Deferred[None]:
        """
        Fires once the output holds C{fragment}; fails after C{timeout} seconds, or at once when
        the child exits without printing it.
        """
        raw = fragment.encode("utf-8")
        d: Deferred[None] = Deferred()
        if raw in self.output:
            d.callback(None)
        elif self.finished:
            d.errback(AssertionError(f"{self.name} exited without printing {fragment!r}:\n{self.text}"))
        else:
            self._printWaiters.append((raw, d))
            d.addTimeout(timeout, reactor)
        return d

    def exited(self, timeout: float = DEADLINE) -> Deferred[int]:
        """
        Fires with L{returnCode} once the child has exited and its pipes are closed; fails after
        C{timeout} seconds.
        """
        d: Deferred[int] = Deferred()
        if self.finished:
            d.callback(self.returnCode)
        else:
            self._exitWaiters.append(d)
            d.addTimeout(timeout, reactor)
        return d

    def signalProcess(self, name: str) -> None:
        """
        Send a signal (C{"TERM"}, C{"KILL"}, ...) unless the child is already gone.
        """
        if self.transport is not None and not self.finished:
            try:
                self.transport.signalProcess(name)
            except ProcessExitedAlready:
                pass

    def kill(self) -> Deferred[int]:
        """
        SIGKILL the child if it still runs, and fire once it is reaped.  Tests add this as a
        cleanup, so that no child outlives them.
        """
        self.signalProcess("KILL")
        return self.exited()


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


def pidAlive(pid: int) -> bool:
    """
    Whether a process with this pid exists and is not a zombie.
    """
    fields = processStat(pid)
    return fields is not None and fields[0] != "Z"


def killIfAlive(pid: int) -> None:
    """
    Cleanup for a process a test started but cannot reap (a daemon, a proxy's child): make sure
    it is gone.
    """
    if pid and pidAlive(pid):
        os.kill(pid, signal.SIGKILL)


async def waitForExit(pid: int, timeout: float) -> float:
    """
    Wait until the process C{pid} is gone (it is not ours to reap, so its exit is watched, not
    awaited); fail after C{timeout} seconds.

    @return: how long it took, in seconds.
    """
    started: float = reactor.seconds()
    await waitUntil(lambda: not pidAlive(pid), timeout)
    return float(reactor.seconds() - started)


def findFreePorts(count: int = 1) -> int:
    """
    Return a loopback port C{p} such that C{p} .. C{p+count-1} all look free right now.

    A simulator test asks for two, because TabbyAPI (and so the simulator) moves to port+1 when
    its port is busy; a test that owns both knows which one it will be served on.
    """
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count > 65535:
            continue
        if all(_portFree(base + i) for i in range(count)):
            return base
    raise RuntimeError("no run of free loopback ports found")


def _portFree(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
