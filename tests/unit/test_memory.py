"""
Tests for L{tabbyproxy.memory}: a profile's memory, declared or estimated from a model folder in
a temporary TabbyAPI directory, with how it was made, and what placement gets of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.config import Catalog, Keys, Profile, TabbyInstall
from tabbyproxy.memory import PROCESS_OVERHEAD, estimateMemory, profileNeed
from tabbyproxy.placement import Need
from tabbyproxy.sizes import GiB

QWEN3_8B = {
    "model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
}
"""The sizes in Qwen3-8B's config.json."""


class EstimateTests(SynchronousTestCase):
    """
    L{estimateMemory} over a temporary TabbyAPI folder.
    """

    def setUp(self) -> None:
        self.tabby = Path(self.mktemp())
        self.install = TabbyInstall(self.tabby, ("python", "main.py"), {}, Keys(enabled=False))

    def folder(self, name: str, config: dict[str, Any], weights: tuple[int, ...]) -> None:
        folder = self.tabby / "models" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config))
        for index, size in enumerate(weights):
            with (folder / f"model-{index}.safetensors").open("wb") as stream:
                stream.truncate(size)
        (folder / "tokenizer.json").write_bytes(b"x" * 1000)

    def profile(self, text: str) -> Profile:
        configDir = Path(self.mktemp())
        configDir.mkdir()
        (configDir / "m.yml").write_text(text)
        return Catalog.load(configDir).profiles["m"]

    def test_weightsCacheOverhead(self) -> None:
        """
        The weights' files (only *.safetensors), the KV cache from cache_size, the layers, KV
        heads and head size with Q8's one byte per element, and the overhead.
        """
        self.folder("Qwen3-8B", QWEN3_8B, (3_000_000_000, 2_000_000_000))
        profile = self.profile("model: {model_name: Qwen3-8B, max_seq_len: 16384, cache_size: 32768, cache_mode: Q8}\n")
        estimate = estimateMemory(profile, self.install)
        cache = 32768 * 36 * 8 * 128 * 2 * 1
        self.assertEqual(estimate.total, 5_000_000_000 + cache + PROCESS_OVERHEAD)
        self.assertEqual([(what, size) for what, size, _ in estimate.parts],
                         [("weights", 5_000_000_000), ("KV cache", cache), ("overhead", PROCESS_OVERHEAD)])
        self.assertFalse(estimate.declared)
        self.assertEqual(estimate.explain(), (
            "7.9 GiB, estimated: weights 4.7 GiB (2 *.safetensors file(s)); "
            "KV cache 2.2 GiB (32768 tokens (cache_size) x 36 layers x 8 KV heads x 128 x 2 x 1 byte(s), Q8); "
            "overhead 1.0 GiB (CUDA context and scratch per process, a fixed figure)"))

    def test_cacheModes(self) -> None:
        """
        FP16 (the default) is 2 bytes per element, Q6 0.75, Q4 0.5, and HEAD's "k,v" bits their
        mean; the tokens come from max_seq_len, else the model's own context, and the head size
        from hidden_size / num_attention_heads when config.json has no head_dim.
        """
        config = {key: value for key, value in QWEN3_8B.items() if key != "head_dim"}
        self.folder("Q", config, ())
        elements = 36 * 8 * 128
        for settings, expected in [
            ("max_seq_len: 4096", 4096 * elements * 2 * 2),
            ("max_seq_len: 4096, cache_mode: Q6", 4096 * elements * 2 * 0.75),
            ("max_seq_len: 4096, cache_mode: Q4", 4096 * elements * 2 * 0.5),
            ("max_seq_len: 4096, cache_mode: '4,8'", 4096 * elements * 12 / 8),
            ("max_seq_len: -1", 40960 * elements * 2 * 2),
        ]:
            with self.subTest(settings=settings):
                estimate = estimateMemory(self.profile(f"model: {{model_name: Q, {settings}}}\n"), self.install)
                self.assertEqual(estimate.parts[1][1], expected)

    def test_tabbyConfigUnderProfile(self) -> None:
        """
        Settings the profile does not give come from TabbyAPI's config.yml, as TabbyAPI merges them.
        """
        self.folder("Q", QWEN3_8B, ())
        install = TabbyInstall(self.tabby, ("python",), {"model": {"cache_mode": "Q4", "max_seq_len": 1024}},
                               Keys(enabled=False))
        estimate = estimateMemory(self.profile("model: {model_name: Q}\n"), install)
        self.assertEqual(estimate.parts[1][1], 1024 * 36 * 8 * 128)

    def test_draftModel(self) -> None:
        """
        A draft model adds its weights and a cache of as many tokens, in its draft_cache_mode.
        """
        self.folder("Q", QWEN3_8B, (1000,))
        draft = {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
                 "num_key_value_heads": 8, "head_dim": 128}
        self.folder("Q-draft", draft, (500,))
        estimate = estimateMemory(self.profile(
            "model: {model_name: Q, cache_size: 2048}\n"
            "draft_model: {draft_model_name: Q-draft, draft_cache_mode: Q8}\n"), self.install)
        self.assertEqual([(what, size) for what, size, _ in estimate.parts], [
            ("weights", 1000), ("KV cache", 2048 * 36 * 8 * 128 * 4),
            ("draft weights", 500), ("draft KV cache", 2048 * 28 * 8 * 128 * 2),
            ("overhead", PROCESS_OVERHEAD),
        ])

    def test_missingFolder(self) -> None:
        """
        Without a model folder, the estimate is the overhead, and says what it could not count.
        """
        estimate = estimateMemory(self.profile("model: {model_name: Nowhere}\n"), self.install)
        self.assertEqual(estimate.total, PROCESS_OVERHEAD)
        self.assertIn("no *.safetensors in", estimate.explain())
        self.assertIn("config.json lacks num_hidden_layers", estimate.explain())

    def test_declared(self) -> None:
        """
        A profile's memory replaces the estimate, on each of its GPUs, per GPU, or on any.
        """
        estimate = estimateMemory(self.profile("model: {model_name: Q}\ngpus: [0, 1]\nmemory: 18GiB\n"), self.install)
        self.assertEqual((estimate.total, estimate.declared), (36 * GiB, True))
        self.assertEqual(estimate.explain(), "36.0 GiB, declared: 18.0 GiB on each of GPU 0, 1")
        estimate = estimateMemory(self.profile("model: {model_name: Q}\ngpus: [1, 0]\nmemory: [10GiB, 2GiB]\n"),
                                  self.install)
        self.assertEqual(estimate.explain(), "12.0 GiB, declared: 10.0 GiB on GPU 1, 2.0 GiB on GPU 0")
        estimate = estimateMemory(self.profile("model: {model_name: Q}\nmemory: 5GiB\n"), self.install)
        self.assertEqual(estimate.explain(), "5.0 GiB, declared: 5.0 GiB on any GPU")


class NeedTests(SynchronousTestCase):
    """
    L{profileNeed}: what placement gets of a profile.
    """

    def need(self, text: str) -> Need:
        configDir = Path(self.mktemp())
        configDir.mkdir()
        (configDir / "m.yml").write_text("model: {model_name: Q}\n" + text)
        profile = Catalog.load(configDir).profiles["m"]
        install = TabbyInstall(Path(self.mktemp()), ("python",), {}, Keys(enabled=False))
        return profileNeed(profile, estimateMemory(profile, install))

    def test_needs(self) -> None:
        """
        Declared memory is a share on each GPU; an estimate, or memory without GPUs, a total.
        """
        self.assertEqual(self.need("gpus: [0, 1]\nmemory: 18GiB\n"), Need("m", (0, 1), shares=(18 * GiB, 18 * GiB)))
        self.assertEqual(self.need("gpus: [1]\nmemory: [3GiB]\n"), Need("m", (1,), shares=(3 * GiB,)))
        self.assertEqual(self.need("memory: 5GiB\n"), Need("m", total=5 * GiB))
        self.assertEqual(self.need("gpus: [1]\n"), Need("m", (1,), total=PROCESS_OVERHEAD))
