"""
The scheduler (L{tabbyproxy.scheduler}): which model runs, on a fake process reactor, a fake clock
and a fake TabbyAPI: no process, no socket, no time passes unless the test says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.child import ChildSettings, ChildState
from tabbyproxy.config import Profile
from tabbyproxy.gpus import FixedGpus, Gpu, GpuProcess, GpuReading
from tabbyproxy.keepalive import FOREVER
from tabbyproxy.memory import MemoryEstimate
from tabbyproxy.scheduler import Lease, NoRoom, QueueFull, SchedulerSettings
from tests.support.fakes import FakeProcess, RunningScheduler

GRACE = 10.0


class _SchedulerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        # The ports a fake other process holds: a child there is not trusted.
        self.squatted: set[int] = set()
        self.fake = RunningScheduler(
            Path(self.mktemp()),
            {
                "a": {"model": {"model_name": "A", "unload_timer": 60}, "template": {"temperature": 0.5}},
                "b": {"model": {"model_name": "B"}, "sampling": {"override_preset": "x"}},
                "c": {"model": {"model_name": "C"}},
            },
            settings=SchedulerSettings(
                unloadTimer=300, maxWaiting=3, child=ChildSettings(loadTimeout=100, stopGrace=GRACE)
            ),
            ownsListener=lambda port, pid: port not in self.squatted,
        )
        self.reactor, self.tabby, self.scheduler = self.fake.reactor, self.fake.tabby, self.fake.scheduler

    def profile(self, name: str) -> Profile:
        return self.fake.catalog.profiles[name]

    def acquire(self, name: str, keepAlive: float | None = None) -> Deferred[Lease]:
        return self.fake.acquire(name, keepAlive)

    def ready(self, name: str, keepAlive: float | None = None) -> Lease:
        """
        Acquire C{name} with a healthy TabbyAPI, so it starts and is granted at once.
        """
        return self.successResultOf(self.acquire(name, keepAlive))


class SchedulerTests(_SchedulerTestCase):
    def test_requestsDuringStartJoinOneSpawn(self) -> None:
        """
        Requests that arrive while their model starts wait for that start; there is one spawn,
        and all are served once C{/health} answers 200.
        """
        self.tabby.healthy = False
        waiting = [self.acquire("a") for _ in range(3)]
        self.reactor.advance(1)
        for d in waiting:
            self.assertNoResult(d)
        self.tabby.healthy = True
        self.reactor.advance(0.2)
        leases = [self.successResultOf(d) for d in waiting]
        self.assertEqual(len(self.reactor.spawned), 1)
        [running] = self.scheduler.snapshot()
        self.assertEqual(running.inFlight, 3)
        self.assertEqual({lease.child.pid for lease in leases}, {running.pid})

    def test_swapWaitsForInFlightRequests(self) -> None:
        """
        A request for another model waits while the running model has a request in flight; no
        signal reaches the child until that request ends, then the swap happens.
        """
        lease = self.ready("a")
        first = self.reactor.spawned[0]
        waiting = self.acquire("b")
        self.reactor.advance(1000)
        self.assertNoResult(waiting)
        self.assertEqual(first.signals, [])

        lease.release()
        self.assertEqual(first.signals, ["TERM"])
        second = self.successResultOf(waiting)
        self.assertEqual(second.profile.id, "b")
        self.assertEqual(len(self.reactor.alive), 1)

    def test_arrivalOrderIsKept(self) -> None:
        """
        A request for the running model that arrives after a request for another model waits
        behind it: a steady stream of requests for one model cannot starve another.
        """
        lease = self.ready("a")
        forB = self.acquire("b")
        laterA = self.acquire("a")
        self.assertNoResult(laterA)
        lease.release()
        leaseB = self.successResultOf(forB)
        self.assertNoResult(laterA)
        leaseB.release()
        self.assertEqual(self.successResultOf(laterA).profile.id, "a")
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual([p.configPath.exists() for p in self.reactor.spawned], [False, False, True])

    def test_fullQueueAnswersQueueFull(self) -> None:
        """
        Past C{maxWaiting} waiting requests, a new one fails at once with a message that says
        the server is busy.
        """
        lease = self.ready("a")
        for _ in range(3):
            self.acquire("b")
        failure = self.failureResultOf(self.acquire("c"), QueueFull)
        self.assertIn("server busy", str(failure.value))
        self.assertEqual(failure.value.status, 503)
        lease.release()

    def test_cancelledWaiterLeavesQueue(self) -> None:
        """
        A request cancelled while it waits (its client left) leaves the queue: the swap it asked
        for does not happen, and the running model's idle timer starts as usual.
        """
        lease = self.ready("a")
        waiting = self.acquire("b")
        waiting.cancel()
        self.failureResultOf(waiting)
        self.assertEqual(self.scheduler.status()["waiting"], 0)
        lease.release()
        self.assertEqual(self.reactor.spawned[0].signals, [])
        self.assertEqual(len(self.reactor.spawned), 1)
        self.reactor.advance(60)
        self.assertEqual(self.reactor.spawned[0].signals, ["TERM"])

    def test_idleTimerUsesProfileThenKeepAlive(self) -> None:
        """
        The idle timer is stopped while a request is in flight and armed when the count drops
        to zero: first for the profile's unload_timer, then for the latest request's keep_alive;
        a request without keep_alive leaves the duration alone.
        """
        lease = self.ready("a")
        self.reactor.advance(1000)
        self.assertEqual(self.reactor.spawned[0].signals, [])
        lease.release()
        self.assertEqual(self.scheduler.status()["unload"]["fires_in_seconds"], 60)

        self.ready("a", keepAlive=120).release()
        self.ready("a").release()
        self.reactor.advance(119)
        self.assertEqual(self.reactor.spawned[0].signals, [])
        self.reactor.advance(1)
        self.assertEqual(self.reactor.spawned[0].signals, ["TERM"])

    def test_globalUnloadTimerWithoutProfileTimer(self) -> None:
        """
        A profile without unload_timer uses the global default.
        """
        self.ready("b").release()
        self.assertEqual(self.scheduler.status()["unload"]["fires_in_seconds"], 300)

    def test_keepAliveZeroUnloadsWhenLastRequestEnds(self) -> None:
        """
        keep_alive 0 unloads as soon as the last request in flight ends, not before.
        """
        first = self.ready("a")
        second = self.ready("a", keepAlive=0)
        first.release()
        self.assertEqual(self.reactor.spawned[0].signals, [])
        second.release()
        self.assertEqual(self.reactor.spawned[0].signals, ["TERM"])

    def test_keepAliveForeverNeverUnloads(self) -> None:
        """
        A negative keep_alive keeps the model loaded however long it idles.
        """
        self.ready("a", keepAlive=FOREVER).release()
        self.reactor.advance(10**9)
        self.assertEqual(self.reactor.spawned[0].signals, [])
        [running] = self.scheduler.snapshot()
        self.assertIsNone(running.expiresAt)

    def test_timerRacingARequestNeverServesAStoppingChild(self) -> None:
        """
        When the idle timer fires just as a request arrives, the request waits for the old child
        to exit and is served by a new one.
        """
        self.ready("a").release()
        old = self.reactor.spawned[0]
        old.obeys = set()
        self.reactor.advance(60)
        self.assertEqual(old.signals, ["TERM"])
        waiting = self.acquire("a")
        self.assertNoResult(waiting)
        old.exit(0)
        lease = self.successResultOf(waiting)
        self.assertIsNot(lease.child.protocol, old.protocol)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_unloadWaitsForInFlight(self) -> None:
        """
        An unload waits for the requests in flight, then stops the child; new requests for the
        model wait for the stop and start it again.
        """
        lease = self.ready("a")
        done = self.scheduler.unload()
        self.assertNoResult(done)
        self.assertEqual(self.reactor.spawned[0].signals, [])
        waiting = self.acquire("a")
        self.assertNoResult(waiting)
        lease.release()
        self.successResultOf(done)
        self.successResultOf(waiting)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_unloadOfABusyModelDrainsIt(self) -> None:
        """
        An unload of a model with a request in flight makes it draining: the snapshot says so,
        a new request for it waits, and once the last request ends the model stops and the
        waiting request gets a fresh child.
        """
        lease = self.ready("a")
        self.scheduler.unload("a")
        self.assertEqual([m.state for m in self.scheduler.snapshot()], [ChildState.DRAINING])
        waiting = self.acquire("a")
        self.assertNoResult(waiting)
        lease.release()
        self.assertEqual(self.reactor.spawned[0].signals, ["TERM"])
        self.assertEqual(self.successResultOf(waiting).child.pid, 1001)

    def test_unloadOfAnotherModelDoesNothing(self) -> None:
        """
        An unload that names a model that does not run leaves the running one alone.
        """
        self.ready("a").release()
        self.successResultOf(self.scheduler.unload("b"))
        self.assertEqual([m.profile.id for m in self.scheduler.snapshot()], ["a"])
        self.assertEqual(self.reactor.spawned[0].signals, [])


GiB = 2**30


class _MeasuredGpus:
    """
    GPUs whose use the test sets, as C{nvidia-smi} would measure it.
    """

    def __init__(self, capacities: dict[int, int]) -> None:
        self.capacities = capacities
        self.used: dict[int, dict[int, int]] = {}  # pid -> GPU -> bytes
        self.reads = 0

    def read(self) -> Deferred[GpuReading]:
        self.reads += 1
        processes = tuple(GpuProcess(pid, gpu, size) for pid, byGpu in self.used.items() for gpu, size in byGpu.items())
        gpus = tuple(Gpu(index, total, sum(p.used for p in processes if p.gpu == index))
                     for index, total in sorted(self.capacities.items()))
        return succeed(GpuReading(gpus, processes, measured=True))


class SeveralModelsTests(SynchronousTestCase):
    """
    Several children at once on fake GPUs: models start beside each other where they fit, idle
    ones make room least recently used first, busy ones drain, and each model keeps its own
    timer, start and failures.
    """

    def setUp(self) -> None:
        self.start()

    def start(self, gpus: object = None, **profiles: dict[str, Any]) -> None:
        defaults: dict[str, dict[str, Any]] = {
            "a": {"model": {"model_name": "A", "unload_timer": 60}, "memory": "10GiB"},
            "b": {"model": {"model_name": "B", "unload_timer": 120}, "memory": "10GiB"},
            "c": {"model": {"model_name": "C"}, "memory": "10GiB"},
            "big": {"model": {"model_name": "Big"}, "memory": "20GiB"},
            "huge": {"model": {"model_name": "Huge"}, "memory": "30GiB"},
        }
        self.fake = RunningScheduler(
            Path(self.mktemp()), {**defaults, **profiles},
            settings=SchedulerSettings(unloadTimer=300, child=ChildSettings(loadTimeout=100, stopGrace=GRACE)),
            gpus=gpus if gpus is not None else FixedGpus({0: 24 * GiB}),  # type: ignore[arg-type]
        )
        self.reactor, self.tabby, self.scheduler = self.fake.reactor, self.fake.tabby, self.fake.scheduler

    def acquire(self, name: str, keepAlive: float | None = None) -> Deferred[Lease]:
        return self.fake.acquire(name, keepAlive)

    def ready(self, name: str, keepAlive: float | None = None) -> Lease:
        return self.successResultOf(self.acquire(name, keepAlive))

    def running(self) -> dict[str, str]:
        return {model.profile.id: model.state.value for model in self.scheduler.snapshot()}

    def processOf(self, name: str) -> FakeProcess:
        [process] = [p for p in self.reactor.alive if p.config()["model"]["model_name"] == name.capitalize()]
        return process

    def test_fittingModelStartsBeside(self) -> None:
        """
        A model that fits beside the one that runs starts at once, without stopping it; both
        serve, each on its own port, and the GPU's accounted memory is their sum.
        """
        a = self.ready("a")
        b = self.ready("b")
        self.assertEqual(self.running(), {"a": "ready", "b": "ready"})
        self.assertNotEqual(a.child.port, b.child.port)
        self.assertEqual([p.signals for p in self.reactor.spawned], [[], []])
        [gpu] = self.scheduler.status()["gpus"]
        self.assertEqual((gpu["accounted_bytes"], gpu["free_bytes"]), (20 * GiB, 4 * GiB))
        self.assertEqual(self.scheduler.status()["max_loaded_models"], 3)

    def test_childSeesOnlyItsGpus(self) -> None:
        """
        Each child gets C{CUDA_VISIBLE_DEVICES} for the GPUs it was placed on, in nvidia-smi's
        order: a model that fits on one GPU gets the roomiest one, a big one is spread.
        """
        self.start(FixedGpus({0: 24 * GiB, 1: 24 * GiB}),
                   pinned={"model": {"model_name": "Pinned"}, "gpus": [1], "memory": "4GiB"},
                   spread={"model": {"model_name": "Spread"}, "memory": "12GiB"})
        self.ready("pinned")
        self.ready("big")
        self.ready("a")
        devices = [(p.env.get("CUDA_VISIBLE_DEVICES"), p.env.get("CUDA_DEVICE_ORDER")) for p in self.reactor.spawned]
        self.assertEqual(devices, [("1", "PCI_BUS_ID"), ("0", "PCI_BUS_ID"), ("1", "PCI_BUS_ID")])
        # 4 GiB are left on GPU 0 and 10 on GPU 1: 12 GiB fit only over both.
        self.ready("spread")
        self.assertEqual(self.reactor.spawned[-1].env["CUDA_VISIBLE_DEVICES"], "0,1")

    def test_idleModelsEvictedLeastRecentlyUsedFirst(self) -> None:
        """
        When a model does not fit, the idle model used longest ago stops; the new one starts
        once it has exited, and the other idle model keeps running.
        """
        a = self.ready("a")
        self.reactor.advance(1)
        b = self.ready("b")
        self.reactor.advance(1)
        b.release()
        self.reactor.advance(1)
        a.release()  # a was used last, so b goes.
        c = self.ready("c")
        self.assertEqual(self.running(), {"a": "ready", "c": "ready"})
        self.assertEqual(c.profile.id, "c")
        self.assertEqual([p.pid for p in self.reactor.spawned if p.exited], [b.child.pid])

    def test_startWaitsForTheEvictedModelsExit(self) -> None:
        """
        The new model starts only once the evicted one has exited (its memory is free only
        then), and while that takes, nothing else is evicted for it.
        """
        a = self.ready("a")
        self.reactor.advance(1)
        b = self.ready("b")
        a.release()
        self.processOf("a").obeys = {"KILL"}
        waiting = self.acquire("c")
        self.assertEqual(self.running(), {"a": "stopping", "b": "ready"})
        b.release()  # A pump with b idle: b could be evicted too, but a's room is enough.
        self.assertNoResult(waiting)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(GRACE)
        self.successResultOf(waiting).release()
        self.assertEqual(self.running(), {"b": "ready", "c": "ready"})

    def test_evictionStopsTheFewestModels(self) -> None:
        """
        A model that needs the room of two small ones evicts two; one that needs the room of
        one evicts one, even if that one was used more recently than others.
        """
        self.start(FixedGpus({0: 24 * GiB}), small={"model": {"model_name": "Small"}, "memory": "2GiB"})
        self.ready("small").release()
        self.reactor.advance(1)
        self.ready("a").release()
        self.reactor.advance(1)
        self.ready("b").release()
        self.assertEqual(set(self.running()), {"small", "a", "b"})
        # 22 GiB used: "big" (20) needs a and b gone, or one of them and small: one of 10 is not enough.
        self.ready("big").release()
        self.assertEqual(set(self.running()), {"small", "big"})

    def test_busyModelsDrainAndTheWaitingModelIsNotStarved(self) -> None:
        """
        When only busy models stand in the way, the fewest of them drain: they take no new
        requests (those wait behind the waiting model), finish what they serve, and stop; then
        the waiting model starts, and the drained model's requests follow once it fits again.
        """
        a = self.ready("a")
        b = self.ready("b")
        self.reactor.advance(1)
        bigWaits = self.acquire("big")
        self.assertNoResult(bigWaits)
        # Draining one of them leaves 14 GiB, not the 20 big needs: both must go.
        self.assertEqual(self.running(), {"a": "draining", "b": "draining"})
        laterA = self.acquire("a")
        self.assertNoResult(laterA)
        a.release()
        self.assertNoResult(bigWaits)
        b.release()
        big = self.successResultOf(bigWaits)
        # Now a waits, and big, busy, stands in its way.
        self.assertEqual(self.running(), {"big": "draining"})
        self.assertNoResult(laterA)
        big.release()
        self.assertEqual(self.successResultOf(laterA).profile.id, "a")
        self.assertEqual(self.running(), {"a": "ready"})

    def test_onlyTheModelsInTheWayDrain(self) -> None:
        """
        On two GPUs, a model pinned to GPU 1 drains only the busy model on GPU 1; the model on
        GPU 0 keeps taking new requests meanwhile.
        """
        self.start(FixedGpus({0: 24 * GiB, 1: 24 * GiB}),
                   a={"model": {"model_name": "A"}, "gpus": [0], "memory": "20GiB"},
                   b={"model": {"model_name": "B"}, "gpus": [1], "memory": "20GiB"},
                   c={"model": {"model_name": "C"}, "gpus": [1], "memory": "20GiB"})
        a = self.ready("a")
        b = self.ready("b")
        waiting = self.acquire("c")
        self.assertEqual(self.running(), {"a": "ready", "b": "draining"})
        more = self.ready("a")
        b.release()
        self.successResultOf(waiting).release()
        self.assertEqual(self.running(), {"a": "ready", "c": "ready"})
        a.release()
        more.release()
        self.assertEqual(self.processOf("a").signals, [])

    def test_persistentModelIsNeverEvicted(self) -> None:
        """
        An idle persistent model is never stopped to make room: the other idle model goes, even
        though the persistent one was used longer ago; a model that could fit only without the
        persistent one is refused at once, saying so.
        """
        self.start(FixedGpus({0: 24 * GiB}), a={"model": {"model_name": "A"}, "memory": "10GiB", "persistent": True})
        self.ready("a").release()
        self.reactor.advance(1)
        self.ready("b").release()
        self.ready("c").release()
        self.assertEqual(set(self.running()), {"a", "c"})
        failure = self.failureResultOf(self.acquire("big"), NoRoom)
        self.assertEqual(failure.value.status, 503)
        self.assertIn("persistent a", str(failure.value))
        self.assertEqual(set(self.running()), {"a", "c"})

    def test_modelThatNeverFitsIsRefusedAtOnce(self) -> None:
        """
        A model bigger than the GPUs is a 503 at once, with what it needs and what there is; the
        running models are untouched, and the error is that model's in C{/status}.
        """
        lease = self.ready("a")
        failure = self.failureResultOf(self.acquire("huge"), NoRoom)
        self.assertEqual(str(failure.value), "huge needs 30.0 GiB on GPU 0; there is 24.0 GiB")
        self.assertEqual(self.running(), {"a": "ready"})
        self.assertIn("30.0 GiB", self.scheduler.status()["last_error"])
        lease.release()

    def test_eachModelHasItsOwnTimer(self) -> None:
        """
        Each model unloads after its own idle time; C{keep_alive: 0} on one stops only that one.
        """
        self.start(FixedGpus({0: 48 * GiB}))
        self.ready("a").release()  # 60 s
        self.ready("b").release()  # 120 s
        self.ready("c", keepAlive=0).release()
        self.assertEqual(set(self.running()), {"a", "b"})
        self.reactor.advance(60)
        self.assertEqual(set(self.running()), {"b"})
        self.reactor.advance(60)
        self.assertEqual(self.running(), {})

    def test_concurrentStartsJoinPerModel(self) -> None:
        """
        Requests for two models that start at once join their own model's start: two spawns,
        each request served by its model's child.
        """
        self.tabby.healthy = False
        waiting = [self.acquire(name) for name in ("a", "b", "a", "b", "a")]
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.tabby.healthy = True
        self.reactor.advance(0.1)
        leases = [self.successResultOf(d) for d in waiting]
        self.assertEqual([lease.profile.id for lease in leases], ["a", "b", "a", "b", "a"])
        self.assertEqual(len({lease.child.pid for lease in leases}), 2)

    def test_crashOfOneChildLeavesTheOthers(self) -> None:
        """
        With three models running, a crash of one is that model's: its lease's child is gone
        and its error is in C{/status}; the two others keep serving, and a new request for it
        starts a fresh child.
        """
        self.start(FixedGpus({0: 48 * GiB}))
        leases = {name: self.ready(name) for name in ("a", "b", "c")}
        self.processOf("b").exit(1)
        self.assertEqual(set(self.running()), {"a", "c"})
        self.assertIn("TabbyAPI for b", self.scheduler.status()["last_error"])
        [crashed] = [child for child in self.scheduler.status()["children"] if child["model"] == "b"] or [None]
        self.assertIsNone(crashed)
        for lease in leases.values():
            lease.release()
        self.assertEqual(self.ready("a").child.pid, leases["a"].child.pid)
        self.assertNotEqual(self.ready("b").child.pid, leases["b"].child.pid)
        self.assertEqual(len(self.reactor.alive), 3)

    def test_waiterLeavingEndsTheDrain(self) -> None:
        """
        A busy model that drains for a waiting request takes requests again once that request
        has left.
        """
        a = self.ready("a")
        b = self.ready("b")
        waiting = self.acquire("big")
        self.assertEqual(self.running(), {"a": "draining", "b": "draining"})
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(self.running(), {"a": "ready", "b": "ready"})
        self.ready("a").release()
        a.release()
        b.release()
        self.assertEqual([p.signals for p in self.reactor.spawned], [[], []])

    def test_laterModelCannotTakeTheRoomOfAWaitingOne(self) -> None:
        """
        While a model waits for busy ones to drain, a model requested after it starts only if it
        fits beside the room the waiting one will take; else it waits its turn.
        """
        self.start(FixedGpus({0: 24 * GiB}), small={"model": {"model_name": "Small"}, "memory": "2GiB"})
        a = self.ready("a")
        big = self.acquire("big")  # 20 GiB: needs a gone (4 + 10 free now, 24 once a stops)
        small = self.acquire("small")  # 2 GiB fits beside a now, but not beside big.
        self.assertNoResult(small)
        a.release()
        self.successResultOf(big).release()
        self.successResultOf(small).release()
        self.assertEqual(set(self.running()), {"big", "small"})

    def test_measuredUseReplacesTheEstimate(self) -> None:
        """
        Once a child is ready, what nvidia-smi measures it to use replaces its declared or
        estimated memory in the accounting (and in C{/api/ps}'s figures), and memory used by
        other processes is not the children's to use.
        """
        gpus = _MeasuredGpus({0: 24 * GiB})
        gpus.used[99] = {0: 4 * GiB}  # Another program on the GPU.
        self.start(gpus)
        self.tabby.healthy = False
        waiting = self.acquire("a")
        self.reactor.advance(1)
        gpus.used[self.reactor.spawned[0].pid] = {0: 7 * GiB}
        self.tabby.healthy = True
        self.reactor.advance(0.1)
        self.successResultOf(waiting).release()
        [running] = self.scheduler.snapshot()
        self.assertEqual((running.memory, running.measured), ({0: 7 * GiB}, True))
        [gpu] = self.scheduler.status()["gpus"]
        self.assertEqual((gpu["capacity_bytes"], gpu["accounted_bytes"]), (20 * GiB, 7 * GiB))
        # 13 GiB left: b (10) fits beside a, big (20) needs a gone.
        self.ready("b").release()
        self.assertEqual(set(self.running()), {"a", "b"})

    def test_theReadmeExample(self) -> None:
        """
        The README's example: two 24 GiB GPUs, chat (14 GiB), a persistent embed (3 GiB) and big
        (20 GiB on each GPU).  Chat and embed run side by side; big stops an idle chat, keeps
        embed, and starts beside it; a busy chat drains first instead.
        """
        self.start(FixedGpus({0: 24 * GiB, 1: 24 * GiB}),
                   chat={"model": {"model_name": "Chat"}, "memory": "14GiB"},
                   embed={"model": {"model_name": "Embed"}, "memory": "3GiB", "persistent": True},
                   big={"model": {"model_name": "Big"}, "gpus": [0, 1], "memory": "20GiB"})
        self.ready("embed").release()
        self.ready("chat").release()
        self.ready("embed").release()
        self.assertEqual(len(self.reactor.spawned), 2)
        self.ready("big").release()
        self.assertEqual(set(self.running()), {"embed", "big"})
        chat = self.ready("chat")  # big is idle and not persistent: it makes room.
        self.assertEqual(set(self.running()), {"embed", "chat"})
        waiting = self.acquire("big")
        self.assertEqual(self.running(), {"embed": "ready", "chat": "draining"})
        chat.release()
        self.successResultOf(waiting).release()
        self.assertEqual(set(self.running()), {"embed", "big"})

    def test_estimateAskedOnlyWhenMemoryIsKnown(self) -> None:
        """
        Without GPU memory, no profile is read for an estimate, and one model runs at a time.
        """
        asked: list[str] = []

        def estimate(profile: Profile) -> MemoryEstimate:
            asked.append(profile.id)
            return MemoryEstimate(GiB, ())

        self.fake = RunningScheduler(Path(self.mktemp()), {"x": {"model": {"model_name": "X"}},
                                                           "y": {"model": {"model_name": "Y"}}},
                                     estimate=estimate)
        self.fake.scheduler.startService()
        self.successResultOf(self.fake.acquire("x")).release()
        self.successResultOf(self.fake.acquire("y")).release()
        self.assertEqual(asked, [])
        self.assertEqual([model.profile.id for model in self.fake.scheduler.snapshot()], ["y"])
        self.assertEqual(self.fake.scheduler.status()["max_loaded_models"], 1)

    def test_maxLoadedModelsCapsTheCount(self) -> None:
        """
        C{maxLoaded} caps how many models run whatever the memory: the idle one used longest ago
        makes room.
        """
        self.fake = RunningScheduler(Path(self.mktemp()), {name: {"model": {"model_name": name.upper()}, "memory": "1GiB"}
                                                           for name in ("x", "y", "z")},
                                     settings=SchedulerSettings(maxLoaded=2), gpus=FixedGpus({0: 24 * GiB}))
        for name in ("x", "y", "z"):
            self.successResultOf(self.fake.acquire(name)).release()
            self.fake.reactor.advance(1)
        self.assertEqual({model.profile.id for model in self.fake.scheduler.snapshot()}, {"y", "z"})

    def test_unloadOneOrAll(self) -> None:
        """
        C{unload(ID)} stops that model only; C{unload()} stops every model, each once its
        requests are done, and fires when all have exited.
        """
        self.ready("a").release()
        b = self.ready("b")
        self.successResultOf(self.scheduler.unload("a"))
        self.assertEqual(self.running(), {"b": "ready"})
        self.ready("c").release()
        everything = self.scheduler.unload()
        self.assertNoResult(everything)
        self.assertEqual(self.running(), {"b": "draining"})
        b.release()
        self.successResultOf(everything)
        self.assertEqual((self.running(), self.reactor.alive), ({}, []))

    def test_stopServiceStopsEveryChild(self) -> None:
        """
        Stopping the service stops every child and fires only once all have exited.
        """
        self.start(FixedGpus({0: 48 * GiB}))
        for name in ("a", "b", "c"):
            self.ready(name)
        self.processOf("a").obeys = {"KILL"}
        stopped = self.scheduler.stopService()
        self.assertNoResult(stopped)
        self.assertEqual(len(self.reactor.alive), 1)
        self.reactor.advance(GRACE)
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.alive, [])


class HangTests(_SchedulerTestCase):
    """
    Issue 10, item 11: a child with requests in flight has its C{/health} asked every
    C{hangInterval} (30 s); one that leaves it unanswered for C{hangTimeout} (60 s) is hung:
    its requests are ended, it is stopped, and the next request gets a fresh child.
    """

    def busy(self) -> tuple[Lease, list[str]]:
        """
        A ready child with one request in flight, and what that request is told if it is
        abandoned.
        """
        lease = self.ready("a")
        told: list[str] = []
        lease.onAbandon(told.append)
        return lease, told

    def test_busyChildIsAskedEveryInterval(self) -> None:
        """
        While a request is in flight, C{/health} is asked every 30 s; a child that answers is
        left alone, and its health is "ok".
        """
        lease, told = self.busy()
        asked = self.tabby.healthAsked
        self.reactor.advance(29)
        self.assertEqual(self.tabby.healthAsked, asked)
        self.reactor.advance(1)
        self.assertEqual(self.tabby.healthAsked, asked + 1)
        self.reactor.advance(30)
        self.assertEqual(self.tabby.healthAsked, asked + 2)
        self.assertEqual((told, self.reactor.spawned[0].signals), ([], []))
        self.assertEqual(self.scheduler.status()["health"], "ok")
        self.assertEqual(self.scheduler.status()["children"][0]["health"], "ok")
        lease.release()

    def test_idleChildIsNotAsked(self) -> None:
        """
        Without a request in flight nothing is asked on the hang timer: an idle child costs
        nothing.
        """
        self.ready("a").release()
        asked = self.tabby.healthAsked
        self.reactor.advance(59)
        self.assertEqual(self.tabby.healthAsked, asked)

    def test_hungChildEndsItsRequestsAndIsKilled(self) -> None:
        """
        A busy child that leaves C{/health} unanswered for 60 s is hung: every request in
        flight is told why, /status shows health "hung" and the reason, the child gets SIGTERM
        and, as a stopped process ignores it, SIGKILL after the grace period; a request that
        arrives meanwhile is served by a fresh child.
        """
        lease, told = self.busy()
        other = self.ready("a")
        process = self.reactor.spawned[0]
        process.obeys = {"KILL"}
        self.tabby.healthHangs = True
        self.reactor.advance(30)
        self.reactor.advance(59)
        self.assertEqual((told, process.signals), ([], []))
        self.reactor.advance(1)
        reason = "TabbyAPI for a (pid 1000) hung: GET /health did not answer within 60s (--hang-timeout)"
        self.assertEqual(told, [reason])
        self.assertEqual(lease.abandoned, reason)
        self.assertEqual(other.abandoned, reason)
        self.assertEqual(process.signals, ["TERM"])
        status = self.scheduler.status()
        self.assertEqual((status["health"], status["last_error"]), ("hung", reason))
        self.assertEqual(status["children"][0]["state"], "stopping")

        lease.release()
        other.release()
        self.tabby.healthHangs = False
        waiting = self.acquire("a")
        self.assertNoResult(waiting)
        self.reactor.advance(GRACE)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        self.assertEqual(self.scheduler.status()["health"], "ok")
        fresh = self.successResultOf(waiting)
        self.assertIsNot(fresh.child, lease.child)
        self.assertIsNone(fresh.abandoned)
        self.assertIsNone(self.scheduler.status()["last_error"])

    def test_requestEndingBeforeTheVerdictIsNotTold(self) -> None:
        """
        A request that ended before its child was judged hung is not told anything, and a hook
        taken back is not called.
        """
        lease, told = self.busy()
        other = self.ready("a")
        heard: list[str] = []
        other.onAbandon(heard.append)()
        self.tabby.healthHangs = True
        self.reactor.advance(30)
        lease.release()
        self.reactor.advance(60)
        self.assertEqual((told, heard), ([], []))
        self.assertIsNotNone(other.abandoned)
        late: list[str] = []
        other.onAbandon(late.append)
        self.assertEqual(late, [other.abandoned])
