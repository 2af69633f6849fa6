"""
How much GPU memory a profile's TabbyAPI needs, before it runs: the profile's declared C{memory},
or an estimate from its model folder (the weights' files, the KV cache its C{config.json} and
cache settings imply, a fixed per-process overhead, and the same for a draft model), always with
the figures it was made of, so that C{/status} and C{tabbyproxy-check} can show how it was made.
Once a child runs, its measured use replaces the estimate in the scheduler's accounting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from attrs import frozen

from tabbyproxy.config import DEFAULT_CONTEXT_LENGTH, Profile, TabbyInstall
from tabbyproxy.placement import Need
from tabbyproxy.sizes import GiB, formatGiB

PROCESS_OVERHEAD = 1 * GiB
"""
What one TabbyAPI process takes beyond its weights and caches: the CUDA context with PyTorch's
and exllama's kernels loaded (about half a GiB on recent cards), the scratch buffers of a forward
pass over one prompt chunk (C{chunk_size}, 2048 tokens by default), and the 96 MiB TabbyAPI's
autosplit keeps free per GPU (C{autosplit_reserve}).  A round figure on the safe side, not a
measurement: a child's measured use replaces the whole estimate once it runs.
"""

_CACHE_BITS: Mapping[str, tuple[int, int]] = {"FP16": (16, 16), "Q8": (8, 8), "Q6": (6, 6), "Q4": (4, 4)}
"""Bits per key and per value element for each of TabbyAPI's C{cache_mode} names."""


@frozen
class MemoryEstimate:
    """
    The bytes a profile needs, and what they are made of.

    @ivar parts: (what, bytes, how) for each part, C{how} saying where the figure came from.
    @ivar declared: whether the profile said it (C{memory}) rather than the proxy estimating it.
    """

    total: int
    parts: tuple[tuple[str, int, str], ...]
    declared: bool = False

    def explain(self) -> str:
        """
        One line: the total and each part with how it was made.
        """
        if self.declared:
            return f"{formatGiB(self.total)}, declared: {self.parts[0][2]}"
        parts = "; ".join(f"{what} {formatGiB(size)} ({how})" for what, size, how in self.parts)
        return f"{formatGiB(self.total)}, estimated: {parts}"


def _readConfig(folder: Path) -> Mapping[str, Any]:
    try:
        document = json.loads((folder / "config.json").read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict):
        return {}
    text = document.get("text_config")
    return text if isinstance(text, dict) else document


def _count(config: Mapping[str, Any], key: str) -> int | None:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _weights(folder: Path) -> tuple[int, str]:
    files = sorted(folder.glob("*.safetensors"))
    size = 0
    for path in files:
        try:
            size += path.stat().st_size
        except OSError:
            pass
    if not files:
        return 0, f"no *.safetensors in {folder}"
    return size, f"{len(files)} *.safetensors file(s)"


def _cacheTokens(settings: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[int, str]:
    cacheSize = settings.get("cache_size")
    if isinstance(cacheSize, int) and not isinstance(cacheSize, bool) and cacheSize > 0:
        return cacheSize, "cache_size"
    maxSeqLen = settings.get("max_seq_len")
    if isinstance(maxSeqLen, int) and not isinstance(maxSeqLen, bool) and maxSeqLen > 0:
        return maxSeqLen, "max_seq_len"
    native = _count(config, "max_position_embeddings")
    if native:
        return native, "the model's max_position_embeddings"
    return DEFAULT_CONTEXT_LENGTH, "TabbyAPI's default context"


def _cacheBits(mode: object) -> tuple[int, int, str]:
    """
    Bits per key and value element for a C{cache_mode}: a name, or HEAD's C{"k,v"} bits.
    """
    if mode is None:
        return 16, 16, "FP16"
    text = str(mode).strip().upper()
    if text in _CACHE_BITS:
        return (*_CACHE_BITS[text], text)
    keyBits, comma, valueBits = text.partition(",")
    if comma and keyBits.strip().isdigit() and valueBits.strip().isdigit():
        return int(keyBits), int(valueBits), f"{int(keyBits)},{int(valueBits)} bits"
    return 16, 16, f"unknown cache_mode {mode!r}, counted as FP16"


def _kvCache(settings: Mapping[str, Any], config: Mapping[str, Any], mode: object) -> tuple[int, str]:
    """
    The KV cache: tokens x layers x KV heads x head size x (key bits + value bits) / 8.
    """
    layers = _count(config, "num_hidden_layers")
    heads = _count(config, "num_attention_heads")
    kvHeads = _count(config, "num_key_value_heads") or heads
    hidden = _count(config, "hidden_size")
    headDim = _count(config, "head_dim") or (hidden // heads if hidden and heads else None)
    if not (layers and kvHeads and headDim):
        return 0, "config.json lacks num_hidden_layers, num_key_value_heads or head_dim; not counted"
    tokens, source = _cacheTokens(settings, config)
    keyBits, valueBits, modeName = _cacheBits(mode)
    size = tokens * layers * kvHeads * headDim * (keyBits + valueBits) // 8
    perElement = f"x 2 x {keyBits / 8:g} byte(s)" if keyBits == valueBits else f"x ({keyBits}+{valueBits})/8 bytes"
    return size, (f"{tokens} tokens ({source}) x {layers} layers x {kvHeads} KV heads x {headDim} "
                  f"{perElement}, {modeName}")


def _merged(profile: Profile, install: TabbyInstall, section: str) -> dict[str, Any]:
    """
    A TabbyAPI section as the child will see it: the profile's keys over TabbyAPI's config.yml.
    """
    base = install.baseConfig.get(section)
    own = profile.tabby.get(section)
    return {**(base if isinstance(base, dict) else {}), **(own if isinstance(own, dict) else {})}


def estimateMemory(profile: Profile, install: TabbyInstall) -> MemoryEstimate:
    """
    The memory a profile's TabbyAPI needs in all: declared by the profile, or estimated from
    its model folder (and its draft model's).
    """
    if profile.memory is not None:
        return declaredMemory(profile)
    model = _merged(profile, install, "model")
    folder = install.modelDirectory(profile)
    config = _readConfig(folder)
    weights, weightsHow = _weights(folder)
    cache, cacheHow = _kvCache(model, config, model.get("cache_mode"))
    parts = [("weights", weights, weightsHow), ("KV cache", cache, cacheHow)]
    draft = _merged(profile, install, "draft_model")
    draftName = draft.get("draft_model_name")
    if draftName:
        draftFolder = install.directory / str(draft.get("draft_model_dir") or "models") / str(draftName)
        draftConfig = _readConfig(draftFolder)
        draftWeights, draftWeightsHow = _weights(draftFolder)
        # The draft model's cache holds as many tokens as the model's.
        draftCache, draftCacheHow = _kvCache(model, draftConfig, draft.get("draft_cache_mode"))
        parts += [("draft weights", draftWeights, draftWeightsHow), ("draft KV cache", draftCache, draftCacheHow)]
    parts.append(("overhead", PROCESS_OVERHEAD, "CUDA context and scratch per process, a fixed figure"))
    return MemoryEstimate(sum(size for _, size, _ in parts), tuple(parts))


def declaredMemory(profile: Profile) -> MemoryEstimate:
    """
    The memory a profile declares (C{memory}), which must be set, in all and how it was given.
    """
    memory = profile.memory
    assert memory is not None
    if isinstance(memory, tuple):
        assert profile.gpus is not None
        how = ", ".join(f"{formatGiB(size)} on GPU {gpu}" for gpu, size in zip(profile.gpus, memory))
        return MemoryEstimate(sum(memory), (("memory", sum(memory), how),), declared=True)
    if profile.gpus is None:
        return MemoryEstimate(memory, (("memory", memory, f"{formatGiB(memory)} on any GPU"),), declared=True)
    gpus = ", ".join(str(gpu) for gpu in profile.gpus)
    total = memory * len(profile.gpus)
    return MemoryEstimate(total, (("memory", total, f"{formatGiB(memory)} on each of GPU {gpus}"),), declared=True)


def profileNeed(profile: Profile, estimate: MemoryEstimate) -> Need:
    """
    What placement must find for a profile: its declared memory on each of its GPUs, or the
    estimate's total over its GPUs (or any).
    """
    memory = profile.memory
    if isinstance(memory, tuple):
        return Need(profile.id, gpus=profile.gpus, shares=memory)
    if memory is not None and profile.gpus is not None:
        return Need(profile.id, gpus=profile.gpus, shares=(memory,) * len(profile.gpus))
    return Need(profile.id, gpus=profile.gpus, total=estimate.total)
