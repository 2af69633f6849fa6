"""
Which models run: the leases requests hold on the children, the queue of waiting requests, each
model's idle timer, unloads, preloads, the GPU memory accounted to each child, and the read-only
view of what runs.

TabbyAPI holds one model per process, so each loaded model is one child (L{tabbyproxy.child}),
with its own port.  All the scheduling state lives here and is only touched from the reactor
thread, so the rules need no locks:

  - a request for a model that is ready is served by its child at once;
  - requests for a model that is starting join that start (one spawn for all of them);
  - a request for a model that is not loaded starts it at once when it fits beside what runs
    (the memory on its GPUs, and C{--max-loaded-models}); else the fewest idle models, least
    recently used first, are stopped to make room; else the models in its way drain: they take
    no new requests and stop once their requests in flight are done, so no stream is ever cut
    and a busy model cannot starve the waiting one (L{tabbyproxy.placement} decides);
  - waiting requests are served in arrival order, and a model that waits for room keeps the
    room it needs: a later request may start another model only where that leaves room for it;
  - each model's idle timer is stopped while it has a request in flight and armed when its
    count drops to zero, for the duration of the latest request for it that carried
    C{keep_alive}.

A ready child whose C{/health} stops answering 200 (TabbyAPI makes a failed generation sticky)
drains: new requests for it wait, and once its requests in flight are done it is stopped and
the next request starts a fresh one.

The memory accounted to a child is its placement (declared or estimated, see
L{tabbyproxy.memory}) until the GPU probe has measured it, once the child is ready.  The GPUs are
read when the service starts and whenever a child becomes ready or exits; placement uses the
latest reading.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent

from tabbyproxy.child import LAST_OUTPUT, Child, ChildSettings, ChildState, HangVerdict, StopReason, pickFreePort
from tabbyproxy.config import Keys, Profile, TabbyInstall
from tabbyproxy.gpus import GpuProbe, GpuReading, childEnvironment
from tabbyproxy.keepalive import FOREVER, IdleTimer, describeDuration
from tabbyproxy.listener import listenerOwnedBy
from tabbyproxy.memory import MemoryEstimate, estimateMemory, profileNeed
from tabbyproxy.metrics import Metrics
from tabbyproxy.placement import EvictThenStart, NeverFits, Placement, Running, StartNow, WaitBehind, place
from tabbyproxy.sizes import formatGiB
from tabbyproxy.tabbywire import causeLine

MODELS_PER_GPU = 3
"""How many models may run per GPU by default when the GPUs' memory is known (Ollama's default)."""

PORT_MOVES = 3
"""How many children in a row of one start may find their port busy before its requests fail."""


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


class NoRoom(SchedulingError):
    """
    The model cannot run here even with every model that may stop gone.
    """


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
    _abandonHooks: list[Callable[[str], None]] = field(factory=list)
    abandoned: str | None = None

    @property
    def baseURL(self) -> str:
        return self.child.baseURL

    @property
    def profile(self) -> Profile:
        return self.child.profile

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._abandonHooks.clear()
            self._scheduler._release(self.child, self)

    def onAbandon(self, hook: Callable[[str], None]) -> Callable[[], None]:
        """
        Have C{hook} called with the reason, fit for the client, if the scheduler gives up the
        child while this request uses it (it hung): the request must end at once with an error.
        At once when that happened already.

        @return: a function that takes C{hook} back (call it once the exchange has ended).
        """
        if self.abandoned is not None:
            hook(self.abandoned)
            return lambda: None
        self._abandonHooks.append(hook)
        return lambda: self._abandonHooks.remove(hook) if hook in self._abandonHooks else None

    def _abandon(self, reason: str) -> None:
        if self.abandoned is None and not self._released:
            self.abandoned = reason
            hooks, self._abandonHooks = self._abandonHooks, []
            for hook in hooks:
                hook(reason)

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
    @ivar memory: the bytes accounted to it on each of its GPUs (measured once it is ready, when
        the GPUs can be measured); empty when no GPU memory is known.
    @ivar measured: whether C{memory} was measured rather than estimated or declared.
    """

    profile: Profile
    state: ChildState
    pid: int | None
    port: int
    inFlight: int
    keepAlive: float
    expiresAt: float | None
    gpus: tuple[int, ...] = ()
    memory: Mapping[int, int] = field(factory=dict)
    measured: bool = False

    @property
    def memoryTotal(self) -> int:
        return sum(self.memory.values())


@define(eq=False)
class _Waiter:
    profile: Profile
    keepAlive: float | None
    deferred: Deferred[Lease]
    since: float


@define(eq=False)
class _Model:
    """
    A model that runs (or starts, drains or stops): its child, its idle timer, where it was
    placed and what it was measured to use.
    """

    child: Child
    timer: IdleTimer
    placement: Placement
    estimate: MemoryEstimate | None
    lastUsed: float
    measured: dict[int, int] | None = None
    # Why it drains, for the log line of its stop.
    drainingFor: str | None = None
    # How many children before this one, in this start, found their port busy.
    portMoves: int = 0
    # The requests that hold a lease on the child, ended if it hangs.
    leases: set[Lease] = field(factory=set)
    # The next check of a busy child's /health (L{ChildSettings.hangInterval}).
    hangWatch: IDelayedCall | None = None

    @property
    def accounted(self) -> dict[int, int]:
        if self.measured:
            return self.measured
        return dict(zip(self.placement.gpus, self.placement.shares))


@frozen
class SchedulerSettings:
    """
    @ivar unloadTimer: the idle time when neither the request nor the profile says otherwise.
    @ivar maxWaiting: how many requests may wait for a model before new ones get a 503.
    @ivar idleHealthInterval: how often, at most, a child's C{/health} is checked when its last
        request in flight ends (a request that saw a failure checks at once, see
        L{Lease.suspect}).
    @ivar maxLoaded: how many models may run at once whatever the memory; C{None} for
        L{MODELS_PER_GPU} per GPU when the GPUs' memory is known, else one (one model at a
        time, swapped on demand).
    @ivar child: the start, health and stop settings of each child.
    """

    unloadTimer: float = 900.0
    maxWaiting: int = 512
    idleHealthInterval: float = 5.0
    maxLoaded: int | None = None
    child: ChildSettings = ChildSettings()


class Scheduler(Service):
    """
    Owns the TabbyAPI children: starts the requested models, places them on the GPUs, makes
    room by stopping idle ones, unloads them when idle, and stops them with the proxy.

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
    @param gpus: reads the GPUs' capacity and use; C{None} when no GPU memory is known (then
        only the count cap places models).
    @param estimate: the memory a profile needs (L{tabbyproxy.memory.estimateMemory} by
        default); asked only when the GPUs' memory is known.

    @ivar defaultModels: the profiles to start again whenever an idle model has been unloaded
        and they fit without stopping another (C{--default-model}).
    @ivar currentKeys: the keys as they are now (L{tabbyproxy.auth.KeyWatcher} follows the
        file), which the children's output must never show.
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
        gpus: GpuProbe | None = None,
        estimate: Callable[[Profile], MemoryEstimate] | None = None,
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
        self.gpus = gpus
        self.estimate = estimate if estimate is not None else (lambda profile: estimateMemory(profile, install))
        self.defaultModels: Callable[[], Sequence[Profile]] = lambda: ()
        self.currentKeys: Callable[[], Keys] = lambda: install.keys
        self.starts = 0
        self._models: dict[str, _Model] = {}
        self._errors: dict[str, str] = {}
        # The last verdict on each model's health ("unhealthy", "hung") since it was last ready.
        self._health: dict[str, str] = {}
        self._estimates: dict[str, tuple[Profile, MemoryEstimate]] = {}
        self._waiting: deque[_Waiter] = deque()
        self._reading: GpuReading | None = None
        self._capacity: dict[int, int] = {}
        # Nothing is placed before the GPUs have been read once (at once for fixed sizes).
        self._gpusKnown = gpus is None
        self._gpuRead: Deferred[None] | None = None
        self._readAgain = False
        self._pumping = False
        self._pumpAgain = False
        self._shuttingDown = False
        self._stopped: Deferred[None] = Deferred()
        self._observers: list[Callable[[], object]] = []

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
        model = self._models.get(profile.id)
        if model is not None and model.child.state is ChildState.READY:
            lease = self._grant(model, keepAlive, waited=0.0)
            self._changed()
            return succeed(lease)
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

    def subscribe(self, observer: Callable[[], object]) -> Callable[[], None]:
        """
        Call C{observer} (with no argument) whenever what L{status} says may have changed: a
        request granted, ended or queued, a child started, ready, draining, stopped or gone.

        @return: a function that unsubscribes it.
        """
        self._observers.append(observer)
        return lambda: self._observers.remove(observer) if observer in self._observers else None

    def _changed(self) -> None:
        for observer in list(self._observers):
            observer()

    @property
    def lastError(self) -> str | None:
        """
        The latest error of any model since it was last ready, or C{None}.
        """
        return next(reversed(self._errors.values()), None)

    @property
    def maxLoaded(self) -> int:
        """
        How many models may run at once.
        """
        if self.settings.maxLoaded is not None:
            return self.settings.maxLoaded
        return MODELS_PER_GPU * len(self._capacity) if self._capacity else 1

    def runningModel(self, modelId: str) -> RunningModel | None:
        """
        The child of model C{modelId}, whatever its state, or C{None} when it has none.
        """
        model = self._models.get(modelId)
        return None if model is None else self._view(model)

    def snapshot(self) -> tuple[RunningModel, ...]:
        """
        Every child, whatever its state, most recently used first.
        """
        return tuple(self._view(model) for model in self._byRecentUse())

    def unload(self, modelId: str | None = None) -> Deferred[None]:
        """
        Stop the model C{modelId}, or every model when C{None}, once its requests in flight have
        finished.

        @return: fires when the children have exited (at once when none runs).
        """
        if modelId is None:
            stopping = [self._unloadOne(model) for model in list(self._models.values())]
        else:
            model = self._models.get(modelId)
            stopping = [] if model is None else [self._unloadOne(model)]
        return _all(stopping)

    def _unloadOne(self, model: _Model) -> Deferred[None]:
        child = model.child
        if child.state is ChildState.STARTING:
            self._failStart(child, f"the start of {child.profile.id} was cancelled by an unload")
            self._stop(model, StopReason.UNLOAD, "unload requested")
        elif child.inFlight == 0 and child.state is ChildState.READY:
            self._stop(model, StopReason.UNLOAD, "unload requested")
        else:
            child.drain(StopReason.UNLOAD)
            self._changed()
        return _chain(child.ended)

    def unloadIdle(self, profile: Profile) -> Deferred[None]:
        """
        Make C{profile}'s idle time zero: it unloads now if idle, else when its last request ends.
        Does nothing (and starts nothing) when it does not run.
        """
        model = self._models.get(profile.id)
        if model is None:
            return succeed(None)
        model.child.keepAlive = 0.0
        return self.unload(profile.id)

    def status(self) -> dict[str, Any]:
        """
        What runs now, as JSON-ready data for C{/status}: every child under C{children}, most
        recently used first, the GPUs and their accounted memory, and for the clients that knew
        one model at a time, the most recently used child's fields at the top level.
        """
        children = [self._childStatus(model) for model in self._byRecentUse()]
        latest = children[0] if children else None
        document: dict[str, Any] = {
            "model": latest["model"] if latest else None,
            "state": latest["state"] if latest else "stopped",
            "pid": latest["pid"] if latest else None,
            "port": latest["port"] if latest else None,
            "started_at": latest["started_at"] if latest else None,
            "ready_at": latest["ready_at"] if latest else None,
            "in_flight": sum(model.child.inFlight for model in self._models.values()),
            "waiting": len(self._waiting),
            "waiting_models": sorted({w.profile.id for w in self._waiting}),
            "unload": latest["unload"] if latest else None,
            "starts": self.starts,
            "last_error": self.lastError,
            "health": latest["health"] if latest else next(reversed(self._health.values()), None),
            "children": children,
            "max_loaded_models": self.maxLoaded,
            "gpus": self._gpuStatus(),
        }
        return document

    def _childStatus(self, model: _Model) -> dict[str, Any]:
        child = model.child
        deadline = model.timer.deadline
        firesIn = None if deadline is None else max(0.0, deadline - self.clock.seconds())
        estimate = model.estimate
        return {
            "model": child.profile.id,
            "state": child.state.value,
            "pid": child.pid,
            "port": child.port,
            "gpus": list(model.placement.gpus),
            "memory": {
                "accounted": _byGpu(model.accounted),
                "estimated": _byGpu(dict(zip(model.placement.gpus, model.placement.shares))),
                "measured": None if model.measured is None else _byGpu(model.measured),
                "estimate": None if estimate is None else estimate.explain(),
            },
            "started_at": _iso(child.startedAt),
            "ready_at": _iso(child.readyAt) if child.readyAt else None,
            "in_flight": child.inFlight,
            "waiting": sum(w.profile.id == child.profile.id for w in self._waiting),
            "unload": {
                "keep_alive_seconds": None if child.keepAlive == FOREVER else child.keepAlive,
                "keep_alive": describeDuration(child.keepAlive),
                "fires_in_seconds": None if firesIn is None else round(firesIn, 3),
                "fires_at": None if firesIn is None else _iso(self.wallClock() + firesIn),
            },
            "last_error": self._errors.get(child.profile.id),
            "health": self._healthOf(child),
        }

    def _healthOf(self, child: Child) -> str | None:
        """
        What is known of a child's health: the last verdict on its model since it was last
        ready ("unhealthy", "hung"), else "ok" while it serves, else C{None}.
        """
        verdict = self._health.get(child.profile.id)
        if verdict is not None:
            return verdict
        return "ok" if child.serving else None

    def _gpuStatus(self) -> list[dict[str, Any]] | None:
        if not self._capacity:
            return None
        accounted = self._accountedByGpu()
        reading = self._reading
        totals = {gpu.index: gpu.total for gpu in reading.gpus} if reading else {}
        return [
            {
                "index": index,
                "total_bytes": totals.get(index, capacity),
                "capacity_bytes": capacity,
                "accounted_bytes": accounted.get(index, 0),
                "free_bytes": max(0, capacity - accounted.get(index, 0)),
            }
            for index, capacity in sorted(self._capacity.items())
        ]

    def _accountedByGpu(self) -> dict[int, int]:
        used: dict[int, int] = {}
        for model in self._models.values():
            for gpu, size in model.accounted.items():
                used[gpu] = used.get(gpu, 0) + size
        return used

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

    def _view(self, model: _Model) -> RunningModel:
        child = model.child
        return RunningModel(
            profile=child.profile,
            state=child.state,
            pid=child.pid,
            port=child.port,
            inFlight=child.inFlight,
            keepAlive=child.keepAlive,
            expiresAt=self._expiresAt(model),
            gpus=model.placement.gpus,
            memory=model.accounted,
            measured=bool(model.measured),
        )

    def _byRecentUse(self) -> list[_Model]:
        return sorted(self._models.values(), key=lambda model: model.lastUsed, reverse=True)

    def _expiresAt(self, model: _Model) -> float | None:
        deadline = model.timer.deadline
        if deadline is not None:
            return self.wallClock() + (deadline - self.clock.seconds())
        if model.child.keepAlive == FOREVER:
            return None
        return self.wallClock() + model.child.keepAlive

    # -- Service

    def startService(self) -> None:
        super().startService()
        self._readGpus()

    def stopService(self) -> Deferred[None]:
        """
        Refuse new work, fail the waiting requests, and stop the children.

        @return: fires only when every child has really exited.
        """
        super().stopService()
        self._shuttingDown = True
        while self._waiting:
            self._waiting.popleft().deferred.errback(ShuttingDown("tabbyproxy is shutting down"))
        stopping = []
        for model in list(self._models.values()):
            if model.child.state is not ChildState.STOPPING:
                self._stop(model, StopReason.SHUTDOWN, "the proxy is stopping")
            stopping.append(_chain(model.child.ended))
        if self._gpuRead is not None:
            self._gpuRead.cancel()
        return _all(stopping).addCallback(self._markStopped)

    def _markStopped(self, result: None) -> None:
        if not self._stopped.called:
            self._stopped.callback(None)

    def whenStopped(self) -> Deferred[None]:
        """
        @return: fires once the service has stopped and its children have exited.
        """
        return _chain(self._stopped)

    # -- what a child tells its scheduler (L{tabbyproxy.child.ChildOwner})

    def childReady(self, child: Child) -> None:
        self._errors.pop(child.profile.id, None)
        self._health.pop(child.profile.id, None)
        self._readGpus()
        self._pump()
        model = self._modelOf(child)
        if model is not None and child.inFlight == 0:
            self._becameIdle(model)

    def childFailed(self, child: Child, message: str) -> None:
        self._noteError(child.profile.id, message)
        self._changed()
        self._failWaitersFor(child.profile, self._forClients(child, message.partition(LAST_OUTPUT)[0]))

    def childMoved(self, child: Child, message: str) -> None:
        """
        Start the model again at once on a fresh port, keeping its requests waiting; after
        L{PORT_MOVES} children in a row found their port busy, fail them instead.  The moved
        child is stopping: it has not loaded the model yet (TabbyAPI checks its port first), and
        its exit is no longer the model's.
        """
        model = self._modelOf(child)
        if model is None:
            return
        moves = model.portMoves + 1
        profile = child.profile
        if moves >= PORT_MOVES:
            message = (f"{message}; {moves} starts in a row found their port busy, so the proxy gave up "
                       "(is something taking the loopback ports it picks?)")
            self.log.error("Giving up the start of {model}: {why}", model=profile.id, why=message)
            self._noteError(profile.id, child.withLastLines(message))
            self.metrics.failedStarts.labels(profile.id).inc()
            self._failWaitersFor(profile, message)
            self._changed()
            return
        if self._shuttingDown or not any(waiter.profile.id == profile.id for waiter in self._waiting):
            return
        self.log.warn("A fresh port for {model} ({moves} of {limit} moves): {why}",
                      model=profile.id, moves=moves, limit=PORT_MOVES, why=message)
        model.timer.stop()
        self._start(profile, model.placement, model.estimate, portMoves=moves)

    def childCrashed(self, child: Child, message: str) -> None:
        self._noteError(child.profile.id, message)
        self._changed()

    def childExited(self, child: Child) -> None:
        model = self._modelOf(child)
        if model is not None:
            del self._models[child.profile.id]
            model.timer.stop()
            self._stopWatchingForHang(model)
        self._changed()
        # Once the child's own waiters (unloads, the shutdown) have heard of the exit.
        child.ended.addCallback(self._afterExit, child)

    def _afterExit(self, result: None, child: Child) -> None:
        self._readGpus()
        self._pump()
        if child.stopReason in (StopReason.IDLE, StopReason.KEEP_ALIVE_ZERO):
            self._returnToDefault()

    def _modelOf(self, child: Child) -> _Model | None:
        model = self._models.get(child.profile.id)
        return model if model is not None and model.child is child else None

    def _noteError(self, modelId: str, message: str) -> None:
        # The newest last, so that lastError is the latest one.
        self._errors.pop(modelId, None)
        self._errors[modelId] = message

    # -- the GPUs

    def _readGpus(self) -> None:
        """
        Read the GPUs (once at a time; a read asked for during one follows it) and place the
        waiting requests with what they say.
        """
        if self.gpus is None or self._shuttingDown:
            return
        if self._gpuRead is not None:
            self._readAgain = True
            return
        self._readAgain = False
        read = self.gpus.read().addCallbacks(self._gpusRead, self._gpusUnreadable)
        if not read.called:
            self._gpuRead = read
            read.addCallback(self._gpuReadDone)

    def _gpuReadDone(self, result: None) -> None:
        self._gpuRead = None
        if self._readAgain:
            self._readGpus()

    def _gpusRead(self, reading: GpuReading) -> None:
        ownPids = [model.child.pid for model in self._models.values() if model.child.pid is not None]
        self._reading = reading
        self._capacity = reading.capacity(ownPids)
        if reading.measured:
            for model in self._models.values():
                used = reading.usedBy(model.child.pid) if model.child.pid is not None else {}
                if used and model.child.serving:
                    model.measured = used
        self._gpusKnown = True
        self._pump()

    def _gpusUnreadable(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return
        if not self._gpusKnown:
            self.log.error(
                "Could not read the GPUs ({why}): placing models by --max-loaded-models alone until "
                "a read succeeds", why=failure.getErrorMessage(),
            )
        else:
            self.log.warn("Could not read the GPUs again ({why}); placing by the last reading",
                          why=failure.getErrorMessage())
        self._gpusKnown = True
        self._pump()

    def _estimateOf(self, profile: Profile) -> MemoryEstimate | None:
        """
        What C{profile} needs (read once per version of the profile), or C{None} when no GPU
        memory is known, so nothing is read.
        """
        if not self._capacity:
            return None
        known = self._estimates.get(profile.id)
        if known is not None and known[0] == profile:
            return known[1]
        estimate = self.estimate(profile)
        self._estimates[profile.id] = (profile, estimate)
        return estimate

    # -- scheduling

    def _start(self, profile: Profile, placement: Placement, estimate: MemoryEstimate | None,
               portMoves: int = 0) -> None:
        """
        Spawn a child for C{profile} where C{placement} puts it.

        @param portMoves: how many children of this start found their port busy before.
        """
        self.starts += 1
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
            keys=self.currentKeys,
            wallClock=self.wallClock,
            ownsListener=self.ownsListener,
            environment=childEnvironment(placement.gpus),
        )
        model = _Model(
            child, IdleTimer(self.clock, lambda: self._idleExpired(profile.id)), placement, estimate,
            lastUsed=self.clock.seconds(), portMoves=portMoves,
        )
        self._models[profile.id] = model
        self.metrics.starts.labels(profile.id).inc()
        if placement.gpus:
            self.log.info(
                "Placing {model} on GPU {gpus} ({memory})", model=profile.id,
                gpus=", ".join(str(gpu) for gpu in placement.gpus),
                memory="no memory figure" if not placement.shares else _describeShares(placement),
            )
        try:
            child.spawn(self.install, self.reactor, self.wrapCommand)
        except OSError as e:
            del self._models[profile.id]
            self._failWaitersFor(profile, f"could not start TabbyAPI for {profile.id}: {e}")

    def _stop(self, model: _Model, reason: StopReason, why: str) -> None:
        model.timer.stop()
        model.child.stop(reason, why)
        self._changed()

    def _grant(self, model: _Model, keepAlive: float | None, waited: float) -> Lease:
        child = model.child
        child.inFlight += 1
        model.timer.stop()
        model.lastUsed = self.clock.seconds()
        if keepAlive is not None:
            child.keepAlive = keepAlive
        lease = Lease(child, self, waited)
        model.leases.add(lease)
        self._watchForHang(model)
        return lease

    def _release(self, child: Child, lease: Lease) -> None:
        child.inFlight -= 1
        model = self._modelOf(child)
        now = self.clock.seconds()
        idle = model is not None and child.inFlight == 0
        if model is not None:
            model.leases.discard(lease)
            model.lastUsed = now
            if idle:
                self._stopWatchingForHang(model)
                self._becameIdle(model)
        self._pump()
        if idle and now - child.lastIdleCheck >= self.settings.idleHealthInterval:
            # A generation that failed inside TabbyAPI leaves its /health at 503 for good; finding
            # out now, while nothing runs, lets the next request get a fresh child.  Not after
            # every request: at one request at a time that would double the proxy's work.
            child.lastIdleCheck = now
            self._checkHealth(child)

    def _becameIdle(self, model: _Model) -> None:
        child = model.child
        if child.state is ChildState.DRAINING:
            reason = child.stopReason or StopReason.UNLOAD
            self._stop(model, reason, model.drainingFor or f"{reason.value} requested")
        elif child.state is not ChildState.READY:
            return
        elif child.keepAlive <= 0:
            self._stop(model, StopReason.KEEP_ALIVE_ZERO, "keep_alive is 0")
        else:
            model.timer.arm(child.keepAlive)

    def _idleExpired(self, modelId: str) -> None:
        model = self._models.get(modelId)
        if model is not None and model.child.state is ChildState.READY and model.child.inFlight == 0:
            self._stop(model, StopReason.IDLE, f"idle for {describeDuration(model.child.keepAlive)}")

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

    def _watchForHang(self, model: _Model) -> None:
        """
        Check a busy child's C{/health} after L{ChildSettings.hangInterval}, unless a check is
        due or under way: a child that hangs (a deadlock, a GPU that stopped answering, a
        SIGSTOP) keeps its connections open, so its requests would wait for it for ever.
        """
        child = model.child
        if model.hangWatch is not None or child.hangCheck is not None or not child.serving or child.inFlight == 0:
            return
        model.hangWatch = self.clock.callLater(self.settings.child.hangInterval, self._checkHang, model)

    def _stopWatchingForHang(self, model: _Model) -> None:
        if model.hangWatch is not None:
            if model.hangWatch.active():
                model.hangWatch.cancel()
            model.hangWatch = None

    def _checkHang(self, model: _Model) -> None:
        model.hangWatch = None
        child = model.child
        if self._modelOf(child) is not model or child.inFlight == 0:
            return
        check = child.checkHang()
        if check is None:
            return

        def judged(verdict: HangVerdict) -> None:
            if verdict.hung and verdict.problem is not None:
                self._hung(model, verdict.problem)
            elif verdict.problem is not None:
                self._unhealthy(child, verdict.problem)
            self._watchForHang(model)

        check.addCallback(judged).addErrback(self._checkBroke, child)

    def _hung(self, model: _Model, problem: str) -> None:
        """
        Give up a child that accepted a C{/health} request and did not answer it in time: its
        requests in flight end now with an error that says so (a stream gets an error event, as
        for a crash), and it is stopped (SIGKILL after the grace period: a stopped process does
        not act on SIGTERM); the next request starts a fresh one.
        """
        child = model.child
        if self._modelOf(child) is not model or not child.serving:
            return
        modelId = child.profile.id
        reason = f"TabbyAPI for {modelId} (pid {child.pid}) hung: {problem} (--hang-timeout)"
        self._noteError(modelId, reason)
        self._health.pop(modelId, None)
        self._health[modelId] = "hung"
        self.log.error(
            "TabbyAPI for {model} (pid {pid}) hung: {problem} (--hang-timeout); ending its {inFlight} "
            "requests in flight and stopping it", model=modelId, pid=child.pid, problem=problem,
            inFlight=child.inFlight,
        )
        # Stopped first: the requests it ends release their leases at once, and a child that
        # stops takes no new one.
        self._stopWatchingForHang(model)
        self._stop(model, StopReason.HUNG, f"it hung: {problem}")
        for lease in list(model.leases):
            lease._abandon(reason)

    def _unhealthy(self, child: Child, problem: str) -> None:
        model = self._modelOf(child)
        if model is None or child.state is not ChildState.READY:
            return
        self._noteError(child.profile.id, f"TabbyAPI for {child.profile.id} (pid {child.pid}) is unhealthy: {problem}")
        self._health.pop(child.profile.id, None)
        self._health[child.profile.id] = "unhealthy"
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
            self._stop(model, StopReason.UNHEALTHY, problem)
        self._changed()

    def _pump(self) -> None:
        """
        Serve the waiting requests in arrival order as far as the running models allow.
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
        self._changed()

    def _pumpOnce(self) -> None:
        if not self._gpusKnown:
            return
        # A drain that makes room is decided afresh each round, so that one whose waiting
        # request has left (or found room elsewhere) ends, and the model serves again.
        resumed = [slot for slot in self._models.values() if slot.child.state is ChildState.DRAINING]
        for slot in resumed:
            slot.child.resume()
            if slot.child.state is ChildState.READY:
                slot.drainingFor = None
        # The room that the models waiting ahead will take once what stands in their way has
        # stopped: a model further back may start only beside it.
        reserved: list[Running] = []
        placed: set[str] = set()
        for waiter in list(self._waiting):
            if self._shuttingDown:
                return
            if waiter not in self._waiting:
                continue  # Failed or granted by a callback of this round.
            modelId = waiter.profile.id
            model = self._models.get(modelId)
            if model is not None:
                if model.child.state is ChildState.READY:
                    self._waiting.remove(waiter)
                    waited = self.clock.seconds() - waiter.since
                    waiter.deferred.callback(self._grant(model, waiter.keepAlive, waited))
                # Otherwise it starts, drains or stops: the request waits for it.
                continue
            if modelId not in placed:
                placed.add(modelId)
                if self._placeWaiting(waiter.profile, reserved):
                    # A start changes what runs (and a child can be ready at once): the requests
                    # behind are placed again, in order, against it.
                    self._pumpAgain = True
                    break
        for slot in resumed:
            if slot.child.state is ChildState.READY and slot.child.inFlight == 0:
                self._becameIdle(slot)

    def _running(self) -> list[Running]:
        """
        The children as placement sees them; the requests waiting for a model count as in
        flight on it, so that a model about to serve them is never evicted.
        """
        waiting: dict[str, int] = {}
        for waiter in self._waiting:
            waiting[waiter.profile.id] = waiting.get(waiter.profile.id, 0) + 1
        return [
            Running(
                model=modelId,
                memory=model.accounted,
                inFlight=model.child.inFlight + waiting.get(modelId, 0),
                persistent=model.child.profile.persistent,
                lastUsed=model.lastUsed,
                draining=model.child.state in (ChildState.DRAINING, ChildState.STOPPING),
            )
            for modelId, model in self._models.items()
        ]

    def _placeWaiting(self, profile: Profile, reserved: list[Running]) -> bool:
        """
        Start C{profile}'s model, make room for it, or leave its requests waiting; a model that
        can never fit fails its requests at once.

        @return: whether it started.
        """
        estimate = self._estimateOf(profile)
        need = profileNeed(profile, estimate) if estimate is not None else profileNeed(profile, _UNKNOWN)
        running = self._running()
        decision = place(need, self._capacity, running, self.maxLoaded)
        if isinstance(decision, NeverFits):
            self.log.error("Cannot start {model}: {why}", model=profile.id, why=decision.message)
            self._noteError(profile.id, decision.message)
            self._failWaitersFor(profile, decision.message, NoRoom)
            return False
        present = running + reserved
        if reserved:
            decision = place(need, self._capacity, present, self.maxLoaded)
        if isinstance(decision, StartNow):
            self._start(profile, decision.placement, estimate)
            return True
        # The models already on their way out (stopping, or draining for this round's models or
        # an unload) may leave enough room: then it waits for them, and takes that room.
        staying = [running for running in present if not running.draining]
        afterThem = place(need, self._capacity, staying, self.maxLoaded)
        if isinstance(afterThem, StartNow):
            reserved.append(_reservation(profile.id, afterThem.placement, self.clock.seconds()))
            return False
        if isinstance(decision, EvictThenStart):
            # The memory is free once they have exited: the start follows their exit.
            for modelId in decision.evict:
                self._makeRoom(modelId, profile.id, evicted=True)
            leaving = set(decision.evict)
        elif isinstance(decision, WaitBehind):
            for modelId in decision.drain:
                self._makeRoom(modelId, profile.id, evicted=False)
            leaving = set(decision.drain)
        else:
            return False  # Only the room the models ahead of it will take is in its way: it waits.
        room = place(need, self._capacity, [r for r in staying if r.model not in leaving], self.maxLoaded)
        if isinstance(room, StartNow):
            reserved.append(_reservation(profile.id, room.placement, self.clock.seconds()))
        return False

    def _makeRoom(self, modelId: str, forModel: str, evicted: bool) -> None:
        """
        Make room for C{forModel}: stop an idle model now (C{evicted}: placement found it idle),
        or drain a busy one.  A model that starts for requests that arrived first drains once it
        is ready and has taken them.
        """
        model = self._models[modelId]
        child = model.child
        if child.state is ChildState.STARTING:
            if evicted:
                # Placement evicts a start only when no request waits for it (a preload, or
                # requests that left).
                self.log.warn("Abandoning the start of {model}: no request wants it any more", model=modelId)
                self._failStart(child, f"the start of {modelId} was abandoned: no request wants it any more")
                self._stop(model, StopReason.ABANDONED, f"making room for {forModel}")
        elif child.state is ChildState.READY and child.inFlight == 0:
            self._stop(model, StopReason.SWAP, f"making room for {forModel}")
        elif child.state is ChildState.READY:
            self.log.info(
                "Draining {model} to make room for {other}: it takes no new requests and stops once "
                "its {inFlight} requests in flight are done", model=modelId, other=forModel, inFlight=child.inFlight,
            )
            child.drain(StopReason.SWAP)
            model.drainingFor = f"making room for {forModel}"

    def _failStart(self, child: Child, message: str) -> None:
        """
        Fail the requests waiting for C{child}'s start, which the scheduler gives up.
        """
        self._noteError(child.profile.id, child.withLastLines(message))
        self._failWaitersFor(child.profile, self._forClients(child, message))

    @staticmethod
    def _forClients(child: Child, message: str) -> str:
        """
        What the clients of a failed start are told: C{message} and the cause from TabbyAPI's
        last lines; the whole output (a traceback with the server's paths) is the admin's.
        """
        cause = causeLine(child.protocol.lastLines)
        return f"{message}; TabbyAPI said: {cause}" if cause else message

    def _failWaitersFor(self, profile: Profile, message: str, error: type[SchedulingError] = StartFailed) -> None:
        failing = [w for w in self._waiting if w.profile.id == profile.id]
        for waiter in failing:
            self._waiting.remove(waiter)
        for waiter in failing:
            waiter.deferred.errback(error(message))

    def _returnToDefault(self) -> None:
        """
        After an idle unload, start the default models (if set) that do not run, when no request
        waits and they fit beside what runs.  They stay loaded until placement needs their room.
        """
        if self._waiting or self._shuttingDown:
            return
        for profile in self.defaultModels():
            if profile.id in self._models:
                continue
            estimate = self._estimateOf(profile)
            need = profileNeed(profile, estimate if estimate is not None else _UNKNOWN)
            if isinstance(place(need, self._capacity, self._running(), self.maxLoaded), StartNow):
                self.log.info("Starting the default model {model} again", model=profile.id)
                self.preload(profile, FOREVER)


def _reservation(modelId: str, placement: Placement, now: float) -> Running:
    """
    The room a waiting model will take, as placement sees it: a model that cannot make room.
    """
    return Running(model=modelId, memory=dict(zip(placement.gpus, placement.shares)), inFlight=1,
                   persistent=True, lastUsed=now)


# A profile's need when no GPU memory is known: only the count cap applies to it.
_UNKNOWN = MemoryEstimate(0, ())


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


def _all(stopping: list[Deferred[None]]) -> Deferred[None]:
    """
    Fires once every one of C{stopping} has (at once for none).
    """
    if not stopping:
        return succeed(None)
    return gatherResults(stopping).addCallback(lambda results: None)


def _byGpu(memory: Mapping[int, int]) -> dict[str, int]:
    """
    Bytes by GPU with the indices as JSON keys.
    """
    return {str(gpu): size for gpu, size in sorted(memory.items())}


def _describeShares(placement: Placement) -> str:
    return ", ".join(f"{formatGiB(share)} on GPU {gpu}" for gpu, share in zip(placement.gpus, placement.shares))


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"
