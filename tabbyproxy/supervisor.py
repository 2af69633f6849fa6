"""
The TabbyAPI child process and the scheduler that decides which model runs.

TabbyAPI holds one model per process, so the proxy runs at most one child at a time.  All the
scheduling state lives here and is only touched from the reactor thread, so the rules need no
locks:

  - a request for the model that is ready is served at once;
  - requests for the model that is starting join that start (one spawn for all of them);
  - a request for another model waits, in arrival order, until the running model has no request
    in flight, then the swap happens; no stream is ever cut to make room;
  - the idle timer is stopped while any request is in flight and armed when the count drops to
    zero, for the duration of the latest request that carried C{keep_alive}.

A child is started with C{PYTHON main.py --config FILE} in the TabbyAPI directory, is ready once
C{GET /health} answers 200, and is stopped with SIGTERM, then SIGKILL after a grace period.  A
ready child whose C{/health} stops answering 200 (TabbyAPI makes a failed generation sticky) is
replaced: new requests wait, and once its requests in flight are done it is stopped and the next
request starts a fresh one.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections import deque
from enum import Enum
from pathlib import Path
from signal import SIGINT, SIGKILL, SIGTERM
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml
from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from tabbyproxy.config import Profile, TabbyInstall, writePrivate
from tabbyproxy.keepalive import FOREVER, IdleTimer, describeDuration
from tabbyproxy.listener import listenerOwnedBy
from tabbyproxy.metrics import Metrics

LAST_LINES = 30


class ChildState(Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


class StopReason(Enum):
    """
    Why the supervisor stopped a child: a metrics label and the start of a log line.
    """

    IDLE = "idle"
    KEEP_ALIVE_ZERO = "keep_alive_zero"
    UNLOAD = "unload"
    SWAP = "swap"
    UNHEALTHY = "unhealthy"
    LOAD_TIMEOUT = "load_timeout"
    ABANDONED = "abandoned"
    PORT_TAKEN = "port_taken"
    SHUTDOWN = "shutdown"


class SchedulingError(Exception):
    """
    A request could not be given a model; the message is fit for the client.

    @ivar status: the HTTP status the client should see.
    """

    status = 503


class QueueFull(SchedulingError):
    pass


class StartFailed(SchedulingError):
    pass


class ShuttingDown(SchedulingError):
    pass


class _ChildProtocol(ProcessProtocol):
    """
    Logs the child's output line by line under its model's name, keeps the last lines for error
    reports, and reports the exit.
    """

    log = Logger()

    def __init__(self, modelId: str, onExit: Callable[[Failure], None], secrets: Iterable[str] = ()) -> None:
        """
        @param secrets: strings never to log (the API and admin keys): a line that holds one is
            logged, and kept for error reports, with the key replaced by C{[redacted]}.
        """
        self.modelId = modelId
        self.lastLines: deque[str] = deque(maxlen=LAST_LINES)
        self._onExit = onExit
        self._partial = {1: b"", 2: b""}
        self._secrets = tuple(secret for secret in secrets if secret)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            self._emit(childFD, line)

    def _emit(self, childFD: int, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if not line.strip():
            return
        for secret in self._secrets:
            if secret in line:
                line = line.replace(secret, "[redacted]")
        self.lastLines.append(line)
        self.log.info(
            "[{model}] {line}", model=self.modelId, line=line, stream="stderr" if childFD == 2 else "stdout"
        )

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in self._partial.items():
            if rest:
                self._emit(childFD, rest)
        self._onExit(reason)


def describeExit(reason: Failure) -> str:
    """
    A process exit in words: C{"exited with status 1"}, C{"was killed by signal 9"}.
    """
    value = reason.value
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return f"was killed by signal {value.signal}"
        return f"exited with status {value.exitCode}"
    if isinstance(value, ProcessDone):
        return "exited with status 0"
    return f"ended: {value}"


def pickFreePort() -> int:
    """
    A loopback port nobody listens on right now.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@define(eq=False)
class Child:
    """
    One TabbyAPI process and its bookkeeping.
    """

    profile: Profile
    port: int
    configPath: Path
    protocol: _ChildProtocol
    keepAlive: float
    state: ChildState = ChildState.STARTING
    transport: IProcessTransport | None = None
    startedAt: float = field(factory=time.time)
    readyAt: float | None = None
    inFlight: int = 0
    drainThenStop: bool = False
    drainReason: StopReason = field(factory=lambda: StopReason.UNLOAD)
    stopReason: StopReason | None = None
    ended: Deferred[None] = field(factory=Deferred)
    loadTimeoutCall: IDelayedCall | None = None
    killCall: IDelayedCall | None = None
    readinessPoll: Deferred[None] | None = None
    healthCheck: Deferred[None] | None = None
    spawnedPid: int | None = None
    lastIdleCheck: float = float("-inf")
    signalsSent: set[str] = field(factory=set)

    @property
    def baseURL(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """
        The child's pid; still known once it has exited, for the reports about it.
        """
        if self.transport is not None and self.transport.pid is not None:
            return self.transport.pid
        return self.spawnedPid

    def lastLines(self) -> str:
        return "\n".join(self.protocol.lastLines)


@define(eq=False)
class Lease:
    """
    Permission for one request to use a ready child; give it back with L{release} when the
    request ends, however it ends.
    """

    child: Child
    _supervisor: Supervisor
    waited: float
    _released: bool = False

    @property
    def baseURL(self) -> str:
        return self.child.baseURL

    @property
    def profile(self) -> Profile:
        return self.child.profile

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._supervisor._release(self.child)

    def suspect(self) -> None:
        """
        Say that the child answered in a way that suggests it is broken (TabbyAPI answers a
        generation with 503 once its generator failed): its C{/health} is checked now, and an
        unhealthy child is replaced once its requests in flight are done.
        """
        self._supervisor._checkHealth(self.child)


@define(eq=False)
class _Waiter:
    profile: Profile
    keepAlive: float | None
    deferred: Deferred[Lease]
    since: float


@frozen
class SupervisorSettings:
    """
    @ivar unloadTimer: the idle time when neither the request nor the profile says otherwise.
    @ivar loadTimeout: how long a start may take before it is abandoned.
    @ivar stopGrace: how long a child has to exit after SIGTERM before SIGKILL.
    @ivar maxWaiting: how many requests may wait for a model before new ones get a 503.
    @ivar healthInterval: how often a starting child's C{/health} is polled; short, because a
        cold start costs on average half of it on top of TabbyAPI's own start.
    @ivar idleHealthInterval: how often, at most, a child's C{/health} is checked when its last
        request in flight ends (a request that saw a failure checks at once, see
        L{Lease.suspect}).
    @ivar healthTimeout: how long one C{/health} request may take before the child counts as
        not answering.
    """

    unloadTimer: float = 900.0
    loadTimeout: float = 600.0
    stopGrace: float = 10.0
    maxWaiting: int = 512
    healthInterval: float = 0.05
    healthTimeout: float = 5.0
    idleHealthInterval: float = 5.0


class Supervisor(Service):
    """
    Owns the TabbyAPI child: starts it for the requested model, swaps models, unloads it when
    idle, and stops it with the proxy.

    @param reactor: provides spawnProcess and callLater (the real reactor, or a fake in tests).
    @param http: a treq-like client used to poll the child's C{/health}.
    @param runtimeDirectory: a private directory for the generated TabbyAPI config files.
    @param wrapCommand: turns the child's command line into the one spawned; L{diesWithParent}
        makes the child die with the proxy even when the proxy is killed.
    @param metrics: counts starts, stops, failures and crashes, and times loads.
    @param ownsListener: whether the sockets listening on a port (the first argument) all belong
        to a process (the second) or its descendants; a child whose port another process holds
        is never trusted.

    @ivar defaultModel: the profile to start again whenever an idle model has been unloaded
        and nothing else is wanted (C{--default-model}), or C{None}.
    """

    log = Logger()

    def __init__(
        self,
        install: TabbyInstall,
        reactor: Any,
        http: Any,
        runtimeDirectory: Path,
        settings: SupervisorSettings = SupervisorSettings(),
        pickPort: Callable[[], int] = pickFreePort,
        wallClock: Callable[[], float] = time.time,
        wrapCommand: Callable[[Sequence[str]], Sequence[str]] = tuple,
        metrics: Metrics | None = None,
        ownsListener: Callable[[int, int], bool] = listenerOwnedBy,
    ) -> None:
        self.install = install
        self.ownsListener = ownsListener
        self.reactor = reactor
        self.http = http
        self.runtimeDirectory = runtimeDirectory
        self.settings = settings
        self.pickPort = pickPort
        self.wallClock = wallClock
        self.wrapCommand = wrapCommand
        self.metrics = metrics if metrics is not None else Metrics()
        self.defaultModel: Callable[[], Profile | None] = lambda: None
        self.current: Child | None = None
        self.lastError: str | None = None
        self.starts = 0
        self._waiting: deque[_Waiter] = deque()
        self._timer = IdleTimer(reactor, self._idleExpired)
        self._pumping = False
        self._pumpAgain = False
        self._shuttingDown = False
        self._stopped: Deferred[None] = Deferred()

    # -- what routes call

    def acquire(self, profile: Profile, keepAlive: float | None = None) -> Deferred[Lease]:
        """
        Wait until C{profile}'s model is ready for one more request.

        @param keepAlive: the request's idle time in seconds, if it sent one.
        @return: a L{Lease} to release when the request ends.  Cancel the Deferred to leave the
            queue.  It fails with a L{SchedulingError} when the model cannot be had.
        """
        if self._shuttingDown:
            return _failed(ShuttingDown("tabbyproxy is shutting down"))
        child = self.current
        if (
            not self._waiting
            and child is not None
            and child.profile.id == profile.id
            and child.state is ChildState.READY
            and not child.drainThenStop
        ):
            return succeed(self._grant(child, keepAlive, waited=0.0))
        if len(self._waiting) >= self.settings.maxWaiting:
            return _failed(
                QueueFull(
                    f"server busy: {len(self._waiting)} requests are already waiting for a "
                    f"model (the limit is {self.settings.maxWaiting}); try again later"
                )
            )

        def leave(d: Deferred[Lease]) -> None:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
                self._pump()

        waiter = _Waiter(profile, keepAlive, Deferred(leave), self.reactor.seconds())
        self._waiting.append(waiter)
        self._pump()
        return waiter.deferred

    def unload(self) -> Deferred[None]:
        """
        Stop the running model once its requests in flight have finished.

        @return: fires when the child has exited (at once when nothing runs).
        """
        child = self.current
        if child is None:
            return succeed(None)
        if child.state is ChildState.STARTING:
            self._failStart(child, f"the start of {child.profile.id} was cancelled by an unload")
            self._stop(child, StopReason.UNLOAD, "unload requested")
        elif child.inFlight == 0 and child.state is ChildState.READY:
            self._stop(child, StopReason.UNLOAD, "unload requested")
        else:
            child.drainThenStop = True
        return _chain(child.ended)

    def unloadIdle(self, profile: Profile) -> Deferred[None]:
        """
        Make C{profile}'s idle time zero: it unloads now if idle, else when its last request ends.
        Does nothing (and starts nothing) when another model runs.
        """
        child = self.current
        if child is None or child.profile.id != profile.id:
            return succeed(None)
        child.keepAlive = 0.0
        return self.unload()

    def status(self) -> dict[str, Any]:
        """
        What runs now, as JSON-ready data for C{/status}.
        """
        child = self.current
        deadline = self._timer.deadline
        firesIn = None if deadline is None else max(0.0, deadline - self.reactor.seconds())
        return {
            "model": child.profile.id if child else None,
            "state": child.state.value if child else "stopped",
            "pid": child.pid if child else None,
            "port": child.port if child else None,
            "started_at": _iso(child.startedAt) if child else None,
            "ready_at": _iso(child.readyAt) if child and child.readyAt else None,
            "in_flight": child.inFlight if child else 0,
            "waiting": len(self._waiting),
            "waiting_models": sorted({w.profile.id for w in self._waiting}),
            "unload": None
            if child is None
            else {
                "keep_alive_seconds": None if child.keepAlive == FOREVER else child.keepAlive,
                "keep_alive": describeDuration(child.keepAlive),
                "fires_in_seconds": None if firesIn is None else round(firesIn, 3),
                "fires_at": None if firesIn is None else _iso(self.wallClock() + firesIn),
            },
            "starts": self.starts,
            "last_error": self.lastError,
        }

    def expiresAt(self) -> float | None:
        """
        Wall-clock time when the running model unloads if it stays idle; C{None} for "never"
        or "not idle yet" (then the keep-alive duration counts from the end of its requests).
        """
        child = self.current
        deadline = self._timer.deadline
        if child is None:
            return None
        if deadline is not None:
            return self.wallClock() + (deadline - self.reactor.seconds())
        if child.keepAlive == FOREVER:
            return None
        return self.wallClock() + child.keepAlive

    # -- Service

    def stopService(self) -> Deferred[None]:
        """
        Refuse new work, fail the waiting requests, and stop the child.

        @return: fires only when the child has really exited.
        """
        super().stopService()
        self._shuttingDown = True
        while self._waiting:
            self._waiting.popleft().deferred.errback(ShuttingDown("tabbyproxy is shutting down"))
        child = self.current
        if child is None:
            self._markStopped(None)
            return succeed(None)
        if child.state is not ChildState.STOPPING:
            self._stop(child, StopReason.SHUTDOWN, "the proxy is stopping")
        return _chain(child.ended).addCallback(self._markStopped)

    def _markStopped(self, result: None) -> None:
        if not self._stopped.called:
            self._stopped.callback(None)

    def whenStopped(self) -> Deferred[None]:
        """
        @return: fires once the service has stopped and its child, if any, has exited.
        """
        return _chain(self._stopped)

    # -- scheduling

    def _grant(self, child: Child, keepAlive: float | None, waited: float) -> Lease:
        child.inFlight += 1
        self._timer.stop()
        if keepAlive is not None:
            child.keepAlive = keepAlive
        return Lease(child, self, waited)

    def _release(self, child: Child) -> None:
        child.inFlight -= 1
        idle = child is self.current and child.inFlight == 0
        if idle:
            self._becameIdle(child)
        self._pump()
        now = self.reactor.seconds()
        if idle and now - child.lastIdleCheck >= self.settings.idleHealthInterval:
            # A generation that failed inside TabbyAPI leaves its /health at 503 for good; finding
            # out now, while nothing runs, lets the next request get a fresh child.  Not after
            # every request: at one request at a time that would double the proxy's work.
            child.lastIdleCheck = now
            self._checkHealth(child)

    def _becameIdle(self, child: Child) -> None:
        if child.state is not ChildState.READY:
            return
        if child.drainThenStop:
            self._stop(child, child.drainReason, f"{child.drainReason.value} requested")
        elif self._waiting and self._waiting[0].profile.id != child.profile.id:
            pass  # _pump swaps the model for the waiting request.
        elif child.keepAlive <= 0:
            self._stop(child, StopReason.KEEP_ALIVE_ZERO, "keep_alive is 0")
        else:
            self._timer.arm(child.keepAlive)

    def _idleExpired(self) -> None:
        child = self.current
        if child is not None and child.state is ChildState.READY and child.inFlight == 0:
            self._stop(child, StopReason.IDLE, f"idle for {describeDuration(child.keepAlive)}")

    def _checkHealth(self, child: Child) -> None:
        """
        Ask a ready child's C{/health} (once at a time) and replace the child if it is unhealthy.
        """
        if child.healthCheck is not None or child.state is not ChildState.READY or child.drainThenStop:
            return

        def judged(problem: str | None) -> None:
            child.healthCheck = None
            if problem is not None:
                self._unhealthy(child, problem)

        check: Deferred[None] = Deferred.fromCoroutine(self._judgeHealth(child)).addCallback(judged)
        check.addErrback(self._checkBroke, child)
        if not check.called:
            child.healthCheck = check

    def _checkBroke(self, failure: Failure, child: Child) -> None:
        child.healthCheck = None
        if not failure.check(CancelledError):
            self.log.failure("Checking the health of {model} failed", failure, model=child.profile.id)

    def _unhealthy(self, child: Child, problem: str) -> None:
        if child is not self.current or child.state is not ChildState.READY or child.drainThenStop:
            return
        self.lastError = f"TabbyAPI for {child.profile.id} (pid {child.pid}) is unhealthy: {problem}"
        self.log.warn(
            "{message}; replacing it once its {inFlight} requests in flight are done",
            message=self.lastError,
            model=child.profile.id,
            inFlight=child.inFlight,
        )
        child.drainThenStop = True
        child.drainReason = StopReason.UNHEALTHY
        if child.inFlight == 0:
            self._stop(child, StopReason.UNHEALTHY, problem)

    def _pump(self) -> None:
        """
        Serve the waiting requests in arrival order as far as the running model allows.
        Re-entrant calls (a lease released while granting) are folded into the running loop.
        """
        if self._pumping:
            self._pumpAgain = True
            return
        self._pumping = True
        try:
            self._pumpAgain = True
            while self._pumpAgain:
                self._pumpAgain = False
                self._pumpOnce()
        finally:
            self._pumping = False

    def _pumpOnce(self) -> None:
        while self._waiting and not self._shuttingDown:
            head = self._waiting[0]
            child = self.current
            if child is None:
                self._start(head.profile)
                return
            if child.profile.id == head.profile.id:
                if child.state is not ChildState.READY or child.drainThenStop:
                    return
                self._waiting.popleft()
                waited = self.reactor.seconds() - head.since
                head.deferred.callback(self._grant(child, head.keepAlive, waited))
                continue
            if child.state is ChildState.STARTING:
                self._failStart(child, f"the start of {child.profile.id} was abandoned: no request wants it any more")
                self._stop(child, StopReason.ABANDONED, f"swapping to {head.profile.id}")
            elif child.state is ChildState.READY and child.inFlight == 0:
                self._stop(child, StopReason.SWAP, f"swapping to {head.profile.id}")
            return

    # -- the child's life

    def _start(self, profile: Profile) -> None:
        port = self.pickPort()
        self.starts += 1
        configPath = self.runtimeDirectory / f"tabby-{self.starts}.yml"
        writePrivate(configPath, yaml.safe_dump(self.install.childConfig(profile, port)))
        keepAlive = profile.unloadTimer if profile.unloadTimer is not None else self.settings.unloadTimer
        child = Child(
            profile=profile,
            port=port,
            configPath=configPath,
            protocol=_ChildProtocol(profile.id, lambda reason: self._exited(child, reason), self._secrets()),
            keepAlive=keepAlive,
            startedAt=self.wallClock(),
        )
        self.current = child
        self.metrics.starts.labels(profile.id).inc()
        command = (*self.install.command, "--config", str(configPath))
        self.log.info(
            "Starting {model} on port {port}: {command}", model=profile.id, port=port, command=" ".join(command)
        )
        spawned = list(self.wrapCommand(command))
        try:
            child.transport = self.reactor.spawnProcess(
                child.protocol,
                spawned[0],
                spawned,
                env=_childEnvironment(),
                path=str(self.install.directory),
            )
        except OSError as e:
            self.current = None
            configPath.unlink(missing_ok=True)
            self._failWaitersFor(profile, f"could not start TabbyAPI for {profile.id}: {e}")
            return
        child.spawnedPid = child.transport.pid
        child.loadTimeoutCall = self.reactor.callLater(self.settings.loadTimeout, self._loadTimedOut, child)
        child.readinessPoll = Deferred.fromCoroutine(self._awaitReady(child))
        child.readinessPoll.addErrback(lambda failure: failure.trap(CancelledError))

    def _secrets(self) -> tuple[str, ...]:
        keys = self.install.keys
        return (*keys.apiKeys, keys.adminKey) if keys.enabled else ()

    async def _awaitReady(self, child: Child) -> None:
        url = child.baseURL + "/health"
        while True:
            healthy = await self._healthy(url)
            if child.state is not ChildState.STARTING or child is not self.current:
                return
            if healthy:
                if child.pid is not None and not self.ownsListener(child.port, child.pid):
                    child.readinessPoll = None
                    self._portTaken(child)
                else:
                    self._ready(child)
                return
            await deferLater(self.reactor, self.settings.healthInterval)

    def _portTaken(self, child: Child) -> None:
        self._failStart(
            child,
            f"port {child.port} is held by a process that is not TabbyAPI for {child.profile.id} "
            f"(pid {child.pid}) or its child, which bound it first: the proxy sends it no request and "
            "no key; try again (the next start picks another port)",
        )
        self.metrics.failedStarts.labels(child.profile.id).inc()
        self._stop(child, StopReason.PORT_TAKEN, "its port is held by another process")

    async def _healthy(self, url: str) -> bool:
        answered, problem = await self._healthProblem(url)
        return problem is None

    async def _judgeHealth(self, child: Child) -> str | None:
        """
        What is wrong with a ready child, or C{None} when its C{/health} answers 200.  A child
        that does not answer at all is asked once more after a short while: it may be dying,
        and then its exit, not its health, is what to report.
        """
        url = child.baseURL + "/health"
        answered, problem = await self._healthProblem(url)
        # A stop cancels the check; the cancelled request reads as "no answer", and there is
        # nothing left to ask.
        if problem is not None and not answered and child.state is ChildState.READY:
            await deferLater(self.reactor, self.settings.healthInterval)
            answered, problem = await self._healthProblem(url)
        return problem

    async def _healthProblem(self, url: str) -> tuple[bool, str | None]:
        """
        Ask C{url} once.

        @return: whether an HTTP answer came, and what is wrong (C{None} for a 200).
        """
        timeout = self.settings.healthTimeout
        try:
            response = await self.http.get(url, timeout=timeout, reactor=self.reactor)
            raw = await response.content()
        except (ConnectError, ConnectingCancelledError, DNSLookupError, ResponseFailed, ResponseNeverReceived) as e:
            return False, f"GET /health failed: {e}"
        except CancelledError:
            # The request's own timeout cancels it (and so does a stop, which ignores the answer).
            return False, f"GET /health did not answer within {timeout:g}s"
        if response.code == 200:
            return True, None
        return True, f"GET /health answered {response.code}{_healthIssues(raw)}"

    def _ready(self, child: Child) -> None:
        if child.loadTimeoutCall is not None and child.loadTimeoutCall.active():
            child.loadTimeoutCall.cancel()
        child.state = ChildState.READY
        child.readyAt = self.wallClock()
        self.lastError = None
        self.metrics.loadSeconds.labels(child.profile.id).observe(child.readyAt - child.startedAt)
        self.log.info(
            "{model} is ready (pid {pid}) after {seconds:.2f}s",
            model=child.profile.id,
            pid=child.pid,
            seconds=child.readyAt - child.startedAt,
        )
        self._pump()
        if child is self.current and child.inFlight == 0:
            self._becameIdle(child)

    def _loadTimedOut(self, child: Child) -> None:
        if child is self.current and child.state is ChildState.STARTING:
            self._failStart(
                child,
                f"{child.profile.id} did not become ready within "
                f"{describeDuration(self.settings.loadTimeout)} (--load-timeout)",
            )
            self.metrics.failedStarts.labels(child.profile.id).inc()
            self._stop(child, StopReason.LOAD_TIMEOUT, "load timeout")

    def _failStart(self, child: Child, message: str) -> None:
        lines = child.lastLines()
        full = f"{message}; last output of TabbyAPI:\n{lines}" if lines else message
        self.lastError = full
        self.log.error("{message}", message=full, model=child.profile.id)
        self._failWaitersFor(child.profile, full)

    def _failWaitersFor(self, profile: Profile, message: str) -> None:
        failing = [w for w in self._waiting if w.profile.id == profile.id]
        for waiter in failing:
            self._waiting.remove(waiter)
        for waiter in failing:
            waiter.deferred.errback(StartFailed(message))

    def _stop(self, child: Child, reason: StopReason, why: str) -> None:
        if child.state is ChildState.STOPPING:
            return
        child.stopReason = reason
        self.metrics.stops.labels(child.profile.id, reason.value).inc()
        if child.state is ChildState.STARTING and child.loadTimeoutCall is not None:
            if child.loadTimeoutCall.active():
                child.loadTimeoutCall.cancel()
        child.state = ChildState.STOPPING
        if child.readinessPoll is not None:
            child.readinessPoll.cancel()
        if child.healthCheck is not None:
            child.healthCheck.cancel()
        if child is self.current:
            self._timer.stop()
        self.log.info("Stopping {model} (pid {pid}): {why}", model=child.profile.id, pid=child.pid, why=why)
        self._signal(child, "TERM")
        child.killCall = self.reactor.callLater(self.settings.stopGrace, self._kill, child)

    def _kill(self, child: Child) -> None:
        self.log.warn(
            "{model} (pid {pid}) did not exit within {grace}s of SIGTERM; sending SIGKILL",
            model=child.profile.id,
            pid=child.pid,
            grace=self.settings.stopGrace,
        )
        self._signal(child, "KILL")

    def _signal(self, child: Child, signal: str) -> None:
        if child.transport is None:
            return
        child.signalsSent.add(signal)
        try:
            child.transport.signalProcess(signal)
        except ProcessExitedAlready:
            pass
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise

    def _exited(self, child: Child, reason: Failure) -> None:
        if child.killCall is not None and child.killCall.active():
            child.killCall.cancel()
        if child.loadTimeoutCall is not None and child.loadTimeoutCall.active():
            child.loadTimeoutCall.cancel()
        stateAtExit = child.state
        child.state = ChildState.STOPPING
        if child.readinessPoll is not None:
            child.readinessPoll.cancel()
        if child.healthCheck is not None:
            child.healthCheck.cancel()
        child.configPath.unlink(missing_ok=True)
        how = describeExit(reason)
        if stateAtExit is ChildState.STARTING:
            self.metrics.failedStarts.labels(child.profile.id).inc()
            self._failStart(child, f"TabbyAPI for {child.profile.id} {how} while loading the model")
        elif stateAtExit is ChildState.READY or _killedByOthers(reason, child.signalsSent):
            # A stop can race a crash (a health check fails because the child is dying): the
            # crash is what the status should tell.
            self.metrics.crashes.labels(child.profile.id).inc()
            self.lastError = f"TabbyAPI for {child.profile.id} (pid {child.pid}) {how} unexpectedly"
            self.log.error("{message}", message=self.lastError, model=child.profile.id)
        else:
            self.log.info("{model} stopped: {how}", model=child.profile.id, how=how)
        if child is self.current:
            self.current = None
            self._timer.stop()
        child.ended.callback(None)
        self._pump()
        if child.stopReason in (StopReason.IDLE, StopReason.KEEP_ALIVE_ZERO):
            self._returnToDefault()

    def _returnToDefault(self) -> None:
        """
        After an idle unload, start the default model (if one is set) when nothing else runs or
        waits.  It stays loaded until a request for another model swaps it out.
        """
        profile = self.defaultModel()
        if profile is None or self.current is not None or self._waiting or self._shuttingDown:
            return
        self.log.info("Starting the default model {model} again", model=profile.id)
        self.preload(profile, FOREVER)

    def preload(self, profile: Profile, keepAlive: float | None = None) -> Deferred[None]:
        """
        Load C{profile}'s model without a request: it starts (or waits its turn) and then idles
        for C{keepAlive}, or its usual idle time.

        @return: fires when the model is ready, or has failed to start (which is logged).
        """

        def loaded(lease: Lease) -> None:
            lease.release()

        def failed(failure: Failure) -> None:
            failure.trap(SchedulingError)
            self.log.error("Could not load {model}: {why}", model=profile.id, why=failure.getErrorMessage())

        return self.acquire(profile, keepAlive).addCallbacks(loaded, failed)


def _killedByOthers(reason: Failure, signalsSent: set[str]) -> bool:
    """
    Whether a process ended by a signal the supervisor did not send it.
    """
    value = reason.value
    if not isinstance(value, ProcessTerminated) or value.signal is None:
        return False
    ours = {_SIGNAL_NUMBERS[name] for name in signalsSent if name in _SIGNAL_NUMBERS}
    return value.signal not in ours


_SIGNAL_NUMBERS = {"TERM": int(SIGTERM), "KILL": int(SIGKILL), "INT": int(SIGINT)}


def _failed(error: Exception) -> Deferred[Lease]:
    d: Deferred[Lease] = Deferred()
    d.errback(error)
    return d


def _chain(ended: Deferred[None]) -> Deferred[None]:
    """
    A new Deferred that fires with C{ended} without consuming its result, so many callers can
    wait for one exit.
    """
    if ended.called:
        return succeed(None)
    follower: Deferred[None] = Deferred()

    def passOn(result: object) -> object:
        follower.callback(None)
        return result

    ended.addBoth(passOn)
    return follower


def _healthIssues(raw: bytes) -> str:
    """
    The issues TabbyAPI lists in an unhealthy C{/health} answer, as C{": a; b"}, or C{""}.
    """
    try:
        document = json.loads(raw)
    except ValueError:
        return ""
    issues = document.get("issues") if isinstance(document, dict) else None
    if not isinstance(issues, list):
        return ""
    described = [str(issue.get("description", issue)) if isinstance(issue, dict) else str(issue) for issue in issues]
    return ": " + "; ".join(described) if described else ""


# Run by the interpreter that spawns the child: ask Linux to SIGKILL this process when its parent
# (the proxy) dies, check the parent did not die before that took effect, then become the child.
_PARENT_DEATH_PACT = (
    "import ctypes, os, signal, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:\n"  # PR_SET_PDEATHSIG
    "    raise OSError(ctypes.get_errno(), 'prctl(PR_SET_PDEATHSIG) failed')\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('tabbyproxy exited before TabbyAPI started')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def diesWithParent(command: Sequence[str]) -> Sequence[str]:
    """
    On Linux, C{command} run through a small wrapper that makes it die (SIGKILL) when the process
    that spawned it dies, even by SIGKILL; elsewhere C{command} unchanged.

    The wrapper costs one short interpreter start (tens of milliseconds) per model start; the pid
    the supervisor sees is the real child's, as the wrapper replaces itself with it.
    """
    if not sys.platform.startswith("linux"):
        return tuple(command)
    return (sys.executable, "-I", "-S", "-c", _PARENT_DEATH_PACT, str(os.getpid()), *command)


def _childEnvironment() -> Mapping[str, str]:
    environment = dict(os.environ)
    # A piped Rich console wraps at 80 columns; a wide console keeps each log line whole.
    environment.setdefault("TABBY_LOG_CONSOLE_WIDTH", "1000")
    environment.setdefault("PYTHONUNBUFFERED", "1")
    return environment


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"
