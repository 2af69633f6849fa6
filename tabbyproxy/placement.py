"""
Where a model that is not loaded can run: a pure function of what it needs, the GPUs' capacity and
the children that run, deciding whether it starts now, starts once some idle models are evicted,
waits while the models in its way drain, or can never fit.

The rules (issue 13): a model that fits beside what runs starts at once; otherwise the fewest
idle models, least recently used first, are evicted to make room; a model with requests in
flight or a persistent one is never evicted; when even evicting every idle model is not enough,
the fewest models that must make room are named to drain (they take no new requests, so a busy
model cannot starve the waiting one); a model that cannot fit even alone, or beside the
persistent models (which never make room), is refused at once.
Memory fits per GPU.  When no GPU memory is known at all, only the count cap applies, which with
its default of one model is the proxy's behaviour before several models could run.

A model whose profile names no GPUs goes where TabbyAPI's autosplit (C{gpu_split_auto}, its
default) would put it: autosplit fills the visible GPUs in order, each up to its free memory.
The proxy gives such a model the single GPU with the most free memory when it fits there whole
(no traffic between GPUs, and the other GPUs stay free for other models), else the GPUs in
index order, filled as autosplit fills them; the child then sees only the GPUs it was given.
A pinned model with an estimated total is filled over its own GPUs the same way.
"""

from __future__ import annotations

from itertools import combinations
from typing import Mapping, Sequence, Union

from attrs import frozen

from tabbyproxy.sizes import formatGiB


@frozen
class Need:
    """
    What the requested model needs.

    @ivar gpus: the GPUs its profile pins it to, or C{None} for any.
    @ivar shares: the bytes it needs on each of C{gpus}, in the same order (a profile's declared
        C{memory}); needs C{gpus}.
    @ivar total: the bytes it needs in all, placed as autosplit would (an estimate, or a
        declared C{memory} with no C{gpus}).  With neither C{shares} nor C{total}, only the
        count cap applies to it.
    """

    model: str
    gpus: tuple[int, ...] | None = None
    shares: tuple[int, ...] | None = None
    total: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.shares is not None and (self.gpus is None or len(self.shares) != len(self.gpus)):
            raise ValueError("shares needs gpus, one share per GPU")
        if self.shares is not None and self.total is not None:
            raise ValueError("give shares or total, not both")


@frozen
class Running:
    """
    A child that runs (or starts) and what the placement must know of it.

    @ivar memory: the bytes accounted to it on each GPU (estimated, then measured).
    @ivar inFlight: its requests in flight, those waiting for its start included.
    @ivar lastUsed: when a request last ended or began on it, in the clock's seconds.
    @ivar draining: it already makes room for another model and takes no new requests.
    """

    model: str
    memory: Mapping[int, int]
    inFlight: int
    persistent: bool
    lastUsed: float
    draining: bool = False

    @property
    def evictable(self) -> bool:
        return self.inFlight == 0 and not self.persistent and not self.draining


@frozen
class Placement:
    """
    The GPUs a child gets (its C{CUDA_VISIBLE_DEVICES}; empty when no GPU is known or named)
    and the bytes accounted to it on each, in the same order.
    """

    gpus: tuple[int, ...]
    shares: tuple[int, ...]


@frozen
class StartNow:
    """
    It fits beside what runs: start it at once.
    """

    placement: Placement


@frozen
class EvictThenStart:
    """
    Stop these idle models (least recently used first), then start it.
    """

    evict: tuple[str, ...]
    placement: Placement


@frozen
class WaitBehind:
    """
    It waits until these models have stopped; they take no new requests meanwhile and stop as
    soon as their last request ends (at once for the idle ones among them).  Empty when what
    stands in its way already drains for another model.
    """

    drain: tuple[str, ...]


@frozen
class NeverFits:
    """
    It cannot run here even with every model that may stop gone; the message says how much it
    needs and how much there is, in GiB.
    """

    message: str


Decision = Union[StartNow, EvictThenStart, WaitBehind, NeverFits]


def place(need: Need, capacity: Mapping[int, int], running: Sequence[Running], maxLoaded: int) -> Decision:
    """
    Decide where the model of C{need}, which does not run, can start.

    @param capacity: the bytes the proxy's children may use on each GPU, by index; empty when
        no GPU memory is known.
    @param running: every child that runs or starts, draining ones included.
    @param maxLoaded: how many children may run at once, whatever the memory.
    """
    if need.gpus is not None and capacity:
        unknown = [gpu for gpu in need.gpus if gpu not in capacity]
        if unknown:
            return NeverFits(
                f"{need.model} asks for GPU {_indices(unknown)}; the GPUs are {_indices(sorted(capacity))}"
            )
    alone = _fit(need, capacity, [])
    if alone is None:
        return NeverFits(_shortfall(need, capacity, []))

    idle = sorted((child for child in running if child.evictable), key=lambda child: (child.lastUsed, child.model))
    for evicted in _subsets(idle):
        remaining = [child for child in running if child not in evicted]
        placement = _fitWithin(need, capacity, remaining, maxLoaded)
        if placement is not None:
            if not evicted:
                return StartNow(placement)
            return EvictThenStart(tuple(child.model for child in evicted), placement)

    movable = sorted(
        (child for child in running if not child.persistent and not child.draining),
        key=lambda child: (child.lastUsed, child.model),
    )
    staying = [child for child in running if child.persistent and not child.draining]
    for size in range(len(movable) + 1):
        fitting = [
            drained for drained in combinations(movable, size)
            if _fitWithin(need, capacity, staying + [child for child in movable if child not in drained], maxLoaded)
        ]
        if fitting:
            # Fewest models, then fewest busy ones, then the least recently used.
            drained = min(fitting, key=lambda drained: sum(child.inFlight > 0 for child in drained))
            return WaitBehind(tuple(child.model for child in drained))
    if len(staying) + 1 > maxLoaded:
        return NeverFits(f"{need.model} cannot start: the persistent {_models(staying)} fill the "
                         f"{maxLoaded} model(s) --max-loaded-models allows")
    return NeverFits(_shortfall(need, capacity, staying))


def _subsets(children: list[Running]) -> list[tuple[Running, ...]]:
    """
    Every subset of C{children}, smallest first, and among those of one size, in the order of
    C{children} (the least recently used first).  Few children run at once, so trying them all
    is cheap, and it is what makes the eviction set the smallest one.
    """
    return [subset for size in range(len(children) + 1) for subset in combinations(children, size)]


def _fitWithin(need: Need, capacity: Mapping[int, int], remaining: list[Running], maxLoaded: int) -> Placement | None:
    if len(remaining) + 1 > maxLoaded:
        return None
    return _fit(need, capacity, remaining)


def _free(capacity: Mapping[int, int], remaining: list[Running]) -> dict[int, int]:
    free = dict(capacity)
    for child in remaining:
        for gpu, used in child.memory.items():
            if gpu in free:
                free[gpu] -= used
    return {gpu: max(0, size) for gpu, size in free.items()}


def _fit(need: Need, capacity: Mapping[int, int], remaining: list[Running]) -> Placement | None:
    """
    Where C{need} goes beside C{remaining}, or C{None} when it does not fit.
    """
    if not capacity or (need.shares is None and need.total is None):
        return Placement(need.gpus or (), ())
    free = _free(capacity, remaining)
    if need.shares is not None:
        assert need.gpus is not None
        if all(share <= free[gpu] for gpu, share in zip(need.gpus, need.shares)):
            return Placement(need.gpus, need.shares)
        return None
    assert need.total is not None
    if need.gpus is not None:
        return _fill(need.total, list(need.gpus), free, keepEmpty=True)
    roomiest = max(sorted(free), key=lambda gpu: free[gpu])
    if need.total <= free[roomiest]:
        return Placement((roomiest,), (need.total,))
    return _fill(need.total, sorted(free), free, keepEmpty=False)


def _fill(total: int, gpus: list[int], free: Mapping[int, int], keepEmpty: bool) -> Placement | None:
    """
    C{total} bytes over C{gpus} in order, each filled up to its free memory, as autosplit does.
    """
    shares = []
    left = total
    for gpu in gpus:
        share = min(left, free[gpu])
        shares.append(share)
        left -= share
    if left > 0:
        return None
    used = [(gpu, share) for gpu, share in zip(gpus, shares) if keepEmpty or share > 0]
    return Placement(tuple(gpu for gpu, _ in used), tuple(share for _, share in used))


def _models(children: list[Running]) -> str:
    return ", ".join(sorted(child.model for child in children))


def _indices(gpus: Sequence[int]) -> str:
    return ", ".join(str(gpu) for gpu in gpus)


def _shortfall(need: Need, capacity: Mapping[int, int], staying: list[Running]) -> str:
    free = _free(capacity, staying)
    beside = ""
    if staying:
        beside = f" beside the persistent {_models(staying)}"
    if need.shares is not None:
        assert need.gpus is not None
        wanted = " and ".join(f"{formatGiB(share)} on GPU {gpu}" for gpu, share in zip(need.gpus, need.shares))
        there = ", ".join(f"GPU {gpu} has {formatGiB(free[gpu])}" for gpu in need.gpus)
        return f"{need.model} needs {wanted}; {there}{beside}"
    assert need.total is not None
    gpus = need.gpus if need.gpus is not None else sorted(free)
    return (f"{need.model} needs {formatGiB(need.total)} on GPU {_indices(gpus)}; "
            f"there is {formatGiB(sum(free[gpu] for gpu in gpus))}{beside}")
