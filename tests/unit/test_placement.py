"""
Tests for L{tabbyproxy.placement}: where a model that is not loaded can start, by the rules of
issue 13, as examples for each rule and as properties over generated machines.
"""

from __future__ import annotations

from itertools import combinations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.placement import (
    Decision,
    EvictThenStart,
    Need,
    NeverFits,
    Placement,
    Running,
    StartNow,
    WaitBehind,
    place,
)
from tabbyproxy.sizes import GiB

TWO_GPUS = {0: 24 * GiB, 1: 24 * GiB}


def child(model: str, memory: dict[int, int], inFlight: int = 0, persistent: bool = False,
          lastUsed: float = 0.0, draining: bool = False) -> Running:
    return Running(model=model, memory=memory, inFlight=inFlight, persistent=persistent,
                   lastUsed=lastUsed, draining=draining)


class RuleTests(SynchronousTestCase):
    """
    One example per placement rule.
    """

    def test_startsBeside(self) -> None:
        """
        A model that fits beside what runs starts at once, on the GPU with the most free memory.
        """
        running = [child("chat", {0: 18 * GiB})]
        decision = place(Need("embed", total=2 * GiB), TWO_GPUS, running, maxLoaded=3)
        self.assertEqual(decision, StartNow(Placement((1,), (2 * GiB,))))

    def test_singleGpuWhenItFitsWhole(self) -> None:
        """
        An unpinned model that fits on one GPU is not split, even when the first GPU has some room.
        """
        running = [child("small", {0: 4 * GiB})]
        decision = place(Need("big", total=22 * GiB), TWO_GPUS, running, maxLoaded=3)
        self.assertEqual(decision, StartNow(Placement((1,), (22 * GiB,))))

    def test_splitAsAutosplit(self) -> None:
        """
        An unpinned model too big for any one GPU fills the GPUs in index order, each up to its
        free memory, as TabbyAPI's autosplit does.
        """
        running = [child("small", {1: 4 * GiB})]
        decision = place(Need("big", total=30 * GiB), TWO_GPUS, running, maxLoaded=3)
        self.assertEqual(decision, StartNow(Placement((0, 1), (24 * GiB, 6 * GiB))))

    def test_pinnedShares(self) -> None:
        """
        A model with declared memory on its pinned GPUs needs that much free on each of them.
        """
        running = [child("chat", {1: 10 * GiB})]
        need = Need("big", gpus=(0, 1), shares=(18 * GiB, 18 * GiB))
        self.assertEqual(place(need, TWO_GPUS, running, maxLoaded=3),
                         EvictThenStart(("chat",), Placement((0, 1), (18 * GiB, 18 * GiB))))
        self.assertEqual(
            place(Need("big", gpus=(0, 1), shares=(18 * GiB, 14 * GiB)), TWO_GPUS, running, maxLoaded=3),
            StartNow(Placement((0, 1), (18 * GiB, 14 * GiB))),
        )

    def test_pinnedTotalStaysOnItsGpus(self) -> None:
        """
        A pinned model with an estimated total is filled over its own GPUs only, and keeps all of
        them visible.
        """
        decision = place(Need("m", gpus=(1, 0), total=4 * GiB), TWO_GPUS, [], maxLoaded=3)
        self.assertEqual(decision, StartNow(Placement((1, 0), (4 * GiB, 0))))

    def test_evictLeastRecentlyUsed(self) -> None:
        """
        When it does not fit, the idle model used least recently is evicted.
        """
        running = [
            child("older", {0: 16 * GiB}, lastUsed=10.0),
            child("newer", {1: 16 * GiB}, lastUsed=20.0),
        ]
        decision = place(Need("m", total=20 * GiB), TWO_GPUS, running, maxLoaded=3)
        self.assertEqual(decision, EvictThenStart(("older",), Placement((0,), (20 * GiB,))))

    def test_fewestEvictions(self) -> None:
        """
        Fewer evictions beat least-recently-used: one newer model that frees enough is evicted
        rather than two older ones.
        """
        running = [
            child("a", {0: 8 * GiB}, lastUsed=1.0),
            child("b", {0: 8 * GiB}, lastUsed=2.0),
            child("c", {1: 22 * GiB}, lastUsed=3.0),
        ]
        decision = place(Need("m", total=20 * GiB), TWO_GPUS, running, maxLoaded=4)
        self.assertEqual(decision, EvictThenStart(("c",), Placement((1,), (20 * GiB,))))

    def test_neverEvictBusyOrPersistent(self) -> None:
        """
        A model with a request in flight and a persistent model stay; the waiting model drains
        the busy one, which takes no new requests, and leaves the persistent one alone.
        """
        running = [
            child("busy", {0: 20 * GiB}, inFlight=2, lastUsed=1.0),
            child("pinned", {1: 20 * GiB}, persistent=True, lastUsed=0.0),
        ]
        decision = place(Need("m", total=20 * GiB), TWO_GPUS, running, maxLoaded=3)
        self.assertEqual(decision, WaitBehind(("busy",)))

    def test_drainOnlyWhatStandsInTheWay(self) -> None:
        """
        A model pinned to GPU 0 drains what uses GPU 0, and the model on GPU 1 keeps serving.
        """
        running = [
            child("on0", {0: 20 * GiB}, inFlight=1, lastUsed=5.0),
            child("on1", {1: 20 * GiB}, inFlight=1, lastUsed=1.0),
        ]
        decision = place(Need("m", gpus=(0,), shares=(10 * GiB,)), TWO_GPUS, running, maxLoaded=3)
        self.assertEqual(decision, WaitBehind(("on0",)))

    def test_drainPrefersIdle(self) -> None:
        """
        When evicting the idle models is not enough, the drain set is the fewest models, and
        among those the fewest busy ones: the idle model goes rather than the busy one beside
        it on GPU 0.
        """
        running = [
            child("idle", {0: 12 * GiB}, lastUsed=9.0),
            child("busy", {0: 12 * GiB}, inFlight=1, lastUsed=1.0),
            child("other", {1: 12 * GiB}, inFlight=1, lastUsed=2.0),
        ]
        need = Need("m", gpus=(0, 1), shares=(12 * GiB, 24 * GiB))
        self.assertEqual(place(need, TWO_GPUS, running, maxLoaded=4), WaitBehind(("other", "idle")))
        need = Need("m", gpus=(0,), shares=(24 * GiB,))
        self.assertEqual(place(need, TWO_GPUS, running, maxLoaded=4), WaitBehind(("busy", "idle")))

    def test_waitForDrainInProgress(self) -> None:
        """
        Memory that already drains for another model is not taken from it: a model that would
        need it waits, with nothing more to drain.
        """
        running = [child("leaving", {0: 20 * GiB}, inFlight=1, draining=True)]
        decision = place(Need("m", gpus=(0,), shares=(20 * GiB,)), TWO_GPUS, running, maxLoaded=3)
        self.assertEqual(decision, WaitBehind(()))

    def test_neverFitsAlone(self) -> None:
        """
        A model bigger than the GPUs is refused at once with both figures in GiB.
        """
        decision = place(Need("huge", total=60 * GiB), TWO_GPUS, [], maxLoaded=3)
        self.assertEqual(decision, NeverFits("huge needs 60.0 GiB on GPU 0, 1; there is 48.0 GiB"))
        decision = place(Need("wide", gpus=(0, 1), shares=(30 * GiB, 10 * GiB)), TWO_GPUS, [], maxLoaded=3)
        self.assertEqual(decision, NeverFits(
            "wide needs 30.0 GiB on GPU 0 and 10.0 GiB on GPU 1; GPU 0 has 24.0 GiB, GPU 1 has 24.0 GiB"))

    def test_neverFitsBesidePersistent(self) -> None:
        """
        A model that fits only where a persistent model stays is refused, naming it.
        """
        running = [child("resident", {0: 20 * GiB, 1: 20 * GiB}, persistent=True)]
        decision = place(Need("m", total=10 * GiB), TWO_GPUS, running, maxLoaded=3)
        self.assertEqual(decision, NeverFits("m needs 10.0 GiB on GPU 0, 1; there is 8.0 GiB beside the persistent resident"))

    def test_unknownGpu(self) -> None:
        """
        A profile pinned to a GPU the machine does not have is refused, naming the GPUs there are.
        """
        decision = place(Need("m", gpus=(2,), total=GiB), TWO_GPUS, [], maxLoaded=3)
        self.assertEqual(decision, NeverFits("m asks for GPU 2; the GPUs are 0, 1"))

    def test_countCapOnly(self) -> None:
        """
        With no GPU memory known, only the count cap applies: with its default of one model, the
        running idle model is swapped out, and a busy one drains, as before issue 13.
        """
        need = Need("m", total=100 * GiB)
        self.assertEqual(place(need, {}, [], maxLoaded=1), StartNow(Placement((), ())))
        self.assertEqual(place(need, {}, [child("old", {})], maxLoaded=1),
                         EvictThenStart(("old",), Placement((), ())))
        self.assertEqual(place(need, {}, [child("old", {}, inFlight=1)], maxLoaded=1), WaitBehind(("old",)))
        self.assertEqual(place(Need("m", gpus=(3,)), {}, [], maxLoaded=1), StartNow(Placement((3,), ())))

    def test_countCapWithPersistent(self) -> None:
        """
        Persistent models that fill the count cap refuse every other model at once.
        """
        decision = place(Need("m"), {}, [child("resident", {}, persistent=True)], maxLoaded=1)
        self.assertEqual(decision, NeverFits(
            "m cannot start: the persistent resident fill the 1 model(s) --max-loaded-models allows"))

    def test_badNeed(self) -> None:
        """
        Shares need one GPU each, and exclude a total.
        """
        self.assertRaises(ValueError, Need, "m", shares=(GiB,))
        self.assertRaises(ValueError, Need, "m", gpus=(0, 1), shares=(GiB,))
        self.assertRaises(ValueError, Need, "m", gpus=(0,), shares=(GiB,), total=GiB)


GPU_COUNT = 3


@st.composite
def machines(draw: st.DrawFn) -> tuple[Need, dict[int, int], list[Running], int]:
    """
    A need, GPU capacities, running children and a count cap, in whole GiB so that fits are
    exact.
    """
    capacity = {gpu: draw(st.integers(1, 8)) * GiB for gpu in range(draw(st.integers(1, GPU_COUNT)))}
    gpus = sorted(capacity)
    running = []
    for index in range(draw(st.integers(0, 5))):
        used = draw(st.lists(st.sampled_from(gpus), unique=True, max_size=len(gpus)))
        running.append(child(
            f"m{index}",
            {gpu: draw(st.integers(0, 4)) * GiB for gpu in used},
            inFlight=draw(st.integers(0, 2)),
            persistent=draw(st.booleans()),
            lastUsed=float(draw(st.integers(0, 10))),
            draining=draw(st.integers(0, 5)) == 0,
        ))
    kind = draw(st.sampled_from(["shares", "pinnedTotal", "total"]))
    if kind == "total":
        need = Need("new", total=draw(st.integers(1, 12)) * GiB)
    else:
        pinned = tuple(draw(st.lists(st.sampled_from(gpus), unique=True, min_size=1)))
        if kind == "shares":
            need = Need("new", gpus=pinned, shares=tuple(draw(st.integers(0, 6)) * GiB for _ in pinned))
        else:
            need = Need("new", gpus=pinned, total=draw(st.integers(1, 12)) * GiB)
    return need, capacity, running, draw(st.integers(1, 6))


def fits(need: Need, capacity: dict[int, int], remaining: list[Running], maxLoaded: int) -> bool:
    """
    The test's own statement of fitting: per GPU for shares, the sum over the allowed GPUs for a
    total (autosplit can always fill it then), and the count cap.
    """
    if len(remaining) + 1 > maxLoaded:
        return False
    free = {gpu: max(0, size - sum(c.memory.get(gpu, 0) for c in remaining)) for gpu, size in capacity.items()}
    if need.shares is not None:
        assert need.gpus is not None
        return all(share <= free[gpu] for gpu, share in zip(need.gpus, need.shares))
    assert need.total is not None
    gpus = need.gpus if need.gpus is not None else list(free)
    return sum(free[gpu] for gpu in gpus) >= need.total


def without(running: list[Running], models: tuple[str, ...]) -> list[Running]:
    return [c for c in running if c.model not in models]


def placementRespectsCapacity(decision: Decision, capacity: dict[int, int], remaining: list[Running]) -> bool:
    assert isinstance(decision, (StartNow, EvictThenStart))
    return all(
        share == 0 or sum(c.memory.get(gpu, 0) for c in remaining) + share <= capacity[gpu]
        for gpu, share in zip(decision.placement.gpus, decision.placement.shares)
    )


class PropertyTests(SynchronousTestCase):
    """
    The invariants of issue 13 over generated machines.
    """

    @given(machines())
    def test_neverEvictsBusyOrPersistent(self, machine: tuple[Need, dict[int, int], list[Running], int]) -> None:
        """
        No decision evicts a model with requests in flight, a persistent one or one already
        draining, and none drains a persistent one.
        """
        need, capacity, running, maxLoaded = machine
        decision = place(need, capacity, running, maxLoaded)
        byModel = {c.model: c for c in running}
        if isinstance(decision, EvictThenStart):
            for model in decision.evict:
                self.assertTrue(byModel[model].evictable)
        if isinstance(decision, WaitBehind):
            for model in decision.drain:
                self.assertFalse(byModel[model].persistent)

    @given(machines())
    def test_minimalEviction(self, machine: tuple[Need, dict[int, int], list[Running], int]) -> None:
        """
        An eviction set makes the model fit within capacity, and no smaller set of idle models
        would.
        """
        need, capacity, running, maxLoaded = machine
        decision = place(need, capacity, running, maxLoaded)
        if not isinstance(decision, EvictThenStart):
            return
        remaining = without(running, decision.evict)
        self.assertTrue(fits(need, capacity, remaining, maxLoaded))
        self.assertTrue(placementRespectsCapacity(decision, capacity, remaining))
        idle = [c for c in running if c.evictable]
        for size in range(len(decision.evict)):
            for evicted in combinations(idle, size):
                self.assertFalse(fits(need, capacity, without(running, tuple(c.model for c in evicted)), maxLoaded))

    @given(machines())
    def test_fittingNeverWaits(self, machine: tuple[Need, dict[int, int], list[Running], int]) -> None:
        """
        A model that fits beside what runs starts now; one that fits once some idle models go is
        never made to wait or refused.
        """
        need, capacity, running, maxLoaded = machine
        decision = place(need, capacity, running, maxLoaded)
        if fits(need, capacity, running, maxLoaded):
            self.assertIsInstance(decision, StartNow)
            self.assertTrue(placementRespectsCapacity(decision, capacity, running))
        idle = tuple(c.model for c in running if c.evictable)
        if fits(need, capacity, without(running, idle), maxLoaded):
            self.assertIsInstance(decision, (StartNow, EvictThenStart))

    @given(machines())
    def test_minimalDrain(self, machine: tuple[Need, dict[int, int], list[Running], int]) -> None:
        """
        A model that waits fits once the drained models and those already draining are gone,
        and no smaller drain set would do; a refused model does not fit even beside the
        persistent models alone.
        """
        need, capacity, running, maxLoaded = machine
        decision = place(need, capacity, running, maxLoaded)
        persistent = [c for c in running if c.persistent and not c.draining]
        if isinstance(decision, NeverFits):
            self.assertFalse(fits(need, capacity, persistent, maxLoaded) and fits(need, capacity, [], maxLoaded))
        if not isinstance(decision, WaitBehind):
            return
        staying = [c for c in running if not c.draining]
        self.assertTrue(fits(need, capacity, without(staying, decision.drain), maxLoaded))
        movable = [c for c in staying if not c.persistent]
        for size in range(len(decision.drain)):
            for drained in combinations(movable, size):
                self.assertFalse(fits(need, capacity, without(staying, tuple(c.model for c in drained)), maxLoaded))
