"""
Which model runs: the leases requests hold on a child, the queue of waiting requests, the idle
timer, unloads, preloads and the read-only view of what runs.

TabbyAPI holds one model per process, so the proxy runs at most one child (L{tabbyproxy.child})
at a time.  All the scheduling state lives here and is only touched from the reactor thread, so
the rules need no locks:

  - a request for the model that is ready is served at once;
  - requests for the model that is starting join that start (one spawn for all of them);
  - a request for another model waits, in arrival order, until the running model has no request
    in flight, then the swap happens; no stream is ever cut to make room;
  - the idle timer is stopped while any request is in flight and armed when the count drops to
    zero, for the duration of the latest request that carried C{keep_alive}.

A ready child whose C{/health} stops answering 200 (TabbyAPI makes a failed generation sticky)
drains: new requests wait, and once its requests in flight are done it is stopped and the next
request starts a fresh one.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

from attrs import define, frozen
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent

from tabbyproxy.child import LAST_OUTPUT, Child, ChildSettings, ChildState, StopReason, pickFreePort
from tabbyproxy.config import Profile, TabbyInstall
from tabbyproxy.keepalive import FOREVER, IdleTimer, describeDuration
from tabbyproxy.listener import listenerOwnedBy
from tabbyproxy.metrics import Metrics
from tabbyproxy.tabbywire import causeLine


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


@define(eq=False)
class Lease:
    """
    Permission for one request to use a ready child; give it back with L{release} when the
    request ends, however it ends.
    """

    child: Child
    _scheduler: Scheduler
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
            self._scheduler._release(self.child)

    def suspect(self) -> None:
        """
        Say that the child answered in a way that suggests it is broken (TabbyAPI answers a
        generation with 503 once its generator failed): its C{/health} is checked now, and an
        unhealthy child is replaced once its requests in flight are done.
        """
        self._scheduler._checkHealth(self.child)


@frozen
class RunningModel:
    """
    A child as the routes see it: a copy of its state when it was asked for, never a handle.

    @ivar expiresAt: wall-clock time when it unloads if it stays idle; C{None} for "never" or
        "not idle yet" (then the keep-alive duration counts from the end of its requests).
    """

    profile: Profile
    state: ChildState
    pid: int | None
    port: int
    inFlight: int
    keepAlive: float
    expiresAt: float | None


@define(eq=False)
class _Waiter:
    profile: Profile
    keepAlive: float | None
    deferred: Deferred[Lease]
    since: float


@frozen
class SchedulerSettings:
    """
    @ivar unloadTimer: the idle time when neither the request nor the profile says otherwise.
    @ivar maxWaiting: how many requests may wait for a model before new ones get a 503.
    @ivar idleHealthInterval: how often, at most, a child's C{/health} is checked when its last
        request in flight ends (a request that saw a failure checks at once, see
        L{Lease.suspect}).
    @ivar child: the start, health and stop settings of each child.
    """

    unloadTimer: float = 900.0
    maxWaiting: int = 512
    idleHealthInterval: float = 5.0
    child: ChildSettings = ChildSettings()


class Scheduler(Service):
    """
    Owns the TabbyAPI children: starts the requested model, swaps models, unloads them when idle,
    and stops them with the proxy.

    @param reactor: spawns the children (the real reactor, or a fake in tests).
    @param clock: the timers: idle, load timeout, stop grace, health polling.
    @param agent: the HTTP client that asks each child's C{/health}.
    @param runtimeDirectory: a private directory for the generated TabbyAPI config files.
    @param wrapCommand: turns the child's command line into the one spawned;
        L{tabbyproxy.child.diesWithParent} makes the child die with the proxy even when the
        proxy is killed.
    @param metrics: counts starts, stops, failures and crashes, and times loads.
    @param ownsListener: whether the sockets listening on a port (the first argument) all belong
        to a process (the second) or its descendants (L{tabbyproxy.child.Child.ownsListener}).

    @ivar defaultModel: the profile to start again whenever an idle model has been unloaded
        and nothing else is wanted (C{--default-model}), or C{None}.
    """

    log = Logger()

    def __init__(
        self,
        install: TabbyInstall,
        reactor: IReactorProcess,
        clock: IReactorTime,
        agent: IAgent,
        runtimeDirectory: Path,
        settings: SchedulerSettings = SchedulerSettings(),
        pickPort: Callable[[], int] = pickFreePort,
        wallClock: Callable[[], float] = time.time,
        wrapCommand: Callable[[Sequence[str]], Sequence[str]] = tuple,
        metrics: Metrics | None = None,
        ownsListener: Callable[[int, int], bool] = listenerOwnedBy,
    ) -> None:
        self.install = install
        self.ownsListener = ownsListener
        self.reactor = reactor
        self.clock = clock
        self.agent = agent
        self.runtimeDirectory = runtimeDirectory
        self.settings = settings
        self.pickPort = pickPort
        self.wallClock = wallClock
        self.wrapCommand = wrapCommand
        self.metrics = metrics if metrics is not None else Metrics()
        self.defaultModel: Callable[[], Profile | None] = lambda: None
        self.lastError: str | None = None
        self.starts = 0
        self._current: Child | None = None
        self._waiting: deque[_Waiter] = deque()
        self._timer = IdleTimer(clock, self._idleExpired)
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
        child = self._current
        if (
            not self._waiting
            and child is not None
            and child.profile.id == profile.id
            and child.state is ChildState.READY
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

        waiter = _Waiter(profile, keepAlive, Deferred(leave), self.clock.seconds())
        self._waiting.append(waiter)
        self._pump()
        return waiter.deferred

    def runningModel(self, modelId: str) -> RunningModel | None:
        """
        The child of model C{modelId}, whatever its state, or C{None} when it has none.
        """
        for model in self.snapshot():
            if model.profile.id == modelId:
                return model
        return None

    def snapshot(self) -> tuple[RunningModel, ...]:
        """
        Every child, whatever its state, most recently used first.
        """
        child = self._current
        if child is None:
            return ()
        return (
            RunningModel(
                profile=child.profile,
                state=child.state,
                pid=child.pid,
                port=child.port,
                inFlight=child.inFlight,
                keepAlive=child.keepAlive,
                expiresAt=self._expiresAt(child),
            ),
        )

    def unload(self, modelId: str | None = None) -> Deferred[None]:
        """
        Stop the model C{modelId}, or whatever runs when C{None}, once its requests in flight
        have finished.

        @return: fires when the child has exited (at once when nothing runs).
        """
        child = self._current
        if child is None or (modelId is not None and child.profile.id != modelId):
            return succeed(None)
        if child.state is ChildState.STARTING:
            self._failStart(child, f"the start of {child.profile.id} was cancelled by an unload")
            self._stop(child, StopReason.UNLOAD, "unload requested")
        elif child.inFlight == 0 and child.state is ChildState.READY:
            self._stop(child, StopReason.UNLOAD, "unload requested")
        else:
            child.drain(StopReason.UNLOAD)
        return _chain(child.ended)

    def unloadIdle(self, profile: Profile) -> Deferred[None]:
        """
        Make C{profile}'s idle time zero: it unloads now if idle, else when its last request ends.
        Does nothing (and starts nothing) when another model runs.
        """
        child = self._current
        if child is None or child.profile.id != profile.id:
            return succeed(None)
        child.keepAlive = 0.0
        return self.unload(profile.id)

    def status(self) -> dict[str, Any]:
        """
        What runs now, as JSON-ready data for C{/status}.
        """
        child = self._current
        deadline = self._timer.deadline
        firesIn = None if deadline is None else max(0.0, deadline - self.clock.seconds())
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

    def _expiresAt(self, child: Child) -> float | None:
        deadline = self._timer.deadline
        if deadline is not None:
            return self.wallClock() + (deadline - self.clock.seconds())
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
        child = self._current
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

    # -- what a child tells its scheduler (L{tabbyproxy.child.ChildOwner})

    def childReady(self, child: Child) -> None:
        self.lastError = None
        self._pump()
        if child is self._current and child.inFlight == 0:
            self._becameIdle(child)

    def childFailed(self, child: Child, message: str) -> None:
        self.lastError = message
        self._failWaitersFor(child.profile, self._forClients(child, message.partition(LAST_OUTPUT)[0]))

    def childCrashed(self, child: Child, message: str) -> None:
        self.lastError = message

    def childExited(self, child: Child) -> None:
        if child is self._current:
            self._current = None
            self._timer.stop()
        # Once the child's own waiters (unloads, the shutdown) have heard of the exit.
        child.ended.addCallback(self._afterExit, child)

    def _afterExit(self, result: None, child: Child) -> None:
        self._pump()
        if child.stopReason in (StopReason.IDLE, StopReason.KEEP_ALIVE_ZERO):
            self._returnToDefault()

    # -- scheduling

    def _start(self, profile: Profile) -> None:
        self.starts += 1
        keys = self.install.keys
        child = Child(
            profile=profile,
            port=self.pickPort(),
            configPath=self.runtimeDirectory / f"tabby-{self.starts}.yml",
            keepAlive=profile.unloadTimer if profile.unloadTimer is not None else self.settings.unloadTimer,
            owner=self,
            clock=self.clock,
            agent=self.agent,
            settings=self.settings.child,
            metrics=self.metrics,
            secrets=(*keys.apiKeys, keys.adminKey) if keys.enabled else (),
            wallClock=self.wallClock,
            ownsListener=self.ownsListener,
        )
        self._current = child
        self.metrics.starts.labels(profile.id).inc()
        try:
            child.spawn(self.install, self.reactor, self.wrapCommand)
        except OSError as e:
            self._current = None
            self._failWaitersFor(profile, f"could not start TabbyAPI for {profile.id}: {e}")

    def _stop(self, child: Child, reason: StopReason, why: str) -> None:
        if child is self._current:
            self._timer.stop()
        child.stop(reason, why)

    def _grant(self, child: Child, keepAlive: float | None, waited: float) -> Lease:
        child.inFlight += 1
        self._timer.stop()
        if keepAlive is not None:
            child.keepAlive = keepAlive
        return Lease(child, self, waited)

    def _release(self, child: Child) -> None:
        child.inFlight -= 1
        idle = child is self._current and child.inFlight == 0
        if idle:
            self._becameIdle(child)
        self._pump()
        now = self.clock.seconds()
        if idle and now - child.lastIdleCheck >= self.settings.idleHealthInterval:
            # A generation that failed inside TabbyAPI leaves its /health at 503 for good; finding
            # out now, while nothing runs, lets the next request get a fresh child.  Not after
            # every request: at one request at a time that would double the proxy's work.
            child.lastIdleCheck = now
            self._checkHealth(child)

    def _becameIdle(self, child: Child) -> None:
        if child.state is ChildState.DRAINING:
            reason = child.stopReason or StopReason.UNLOAD
            self._stop(child, reason, f"{reason.value} requested")
        elif child.state is not ChildState.READY:
            return
        elif self._waiting and self._waiting[0].profile.id != child.profile.id:
            pass  # _pump swaps the model for the waiting request.
        elif child.keepAlive <= 0:
            self._stop(child, StopReason.KEEP_ALIVE_ZERO, "keep_alive is 0")
        else:
            self._timer.arm(child.keepAlive)

    def _idleExpired(self) -> None:
        child = self._current
        if child is not None and child.state is ChildState.READY and child.inFlight == 0:
            self._stop(child, StopReason.IDLE, f"idle for {describeDuration(child.keepAlive)}")

    def _checkHealth(self, child: Child) -> None:
        """
        Ask a ready child's C{/health} (once at a time) and replace the child if it is unhealthy.
        """
        check = child.checkHealth()
        if check is None:
            return

        def judged(problem: str | None) -> None:
            if problem is not None:
                self._unhealthy(child, problem)

        check.addCallback(judged).addErrback(self._checkBroke, child)

    def _checkBroke(self, failure: Failure, child: Child) -> None:
        if not failure.check(CancelledError):
            self.log.failure("Checking the health of {model} failed", failure, model=child.profile.id)

    def _unhealthy(self, child: Child, problem: str) -> None:
        if child is not self._current or child.state is not ChildState.READY:
            return
        self.lastError = f"TabbyAPI for {child.profile.id} (pid {child.pid}) is unhealthy: {problem}"
        self.log.warn(
            "TabbyAPI for {model} (pid {pid}) is unhealthy: {problem}; replacing it once its "
            "{inFlight} requests in flight are done",
            model=child.profile.id,
            pid=child.pid,
            problem=problem,
            inFlight=child.inFlight,
        )
        child.drain(StopReason.UNHEALTHY)
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
            child = self._current
            if child is None:
                self._start(head.profile)
                return
            if child.profile.id == head.profile.id:
                if child.state is not ChildState.READY:
                    return
                self._waiting.popleft()
                waited = self.clock.seconds() - head.since
                head.deferred.callback(self._grant(child, head.keepAlive, waited))
                continue
            if child.state is ChildState.STARTING:
                self.log.warn(
                    "Abandoning the start of {model}: no request wants it any more", model=child.profile.id
                )
                self._failStart(child, f"the start of {child.profile.id} was abandoned: no request wants it any more")
                self._stop(child, StopReason.ABANDONED, f"swapping to {head.profile.id}")
            elif child.state is ChildState.READY and child.inFlight == 0:
                self._stop(child, StopReason.SWAP, f"swapping to {head.profile.id}")
            return

    def _failStart(self, child: Child, message: str) -> None:
        """
        Fail the requests waiting for C{child}'s start, which the scheduler gives up.
        """
        self.lastError = child.withLastLines(message)
        self._failWaitersFor(child.profile, self._forClients(child, message))

    @staticmethod
    def _forClients(child: Child, message: str) -> str:
        """
        What the clients of a failed start are told: C{message} and the cause from TabbyAPI's
        last lines; the whole output (a traceback with the server's paths) is the admin's.
        """
        cause = causeLine(child.protocol.lastLines)
        return f"{message}; TabbyAPI said: {cause}" if cause else message

    def _failWaitersFor(self, profile: Profile, message: str) -> None:
        failing = [w for w in self._waiting if w.profile.id == profile.id]
        for waiter in failing:
            self._waiting.remove(waiter)
        for waiter in failing:
            waiter.deferred.errback(StartFailed(message))

    def _returnToDefault(self) -> None:
        """
        After an idle unload, start the default model (if one is set) when nothing else runs or
        waits.  It stays loaded until a request for another model swaps it out.
        """
        profile = self.defaultModel()
        if profile is None or self._current is not None or self._waiting or self._shuttingDown:
            return
        self.log.info("Starting the default model {model} again", model=profile.id)
        self.preload(profile, FOREVER)


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


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"
