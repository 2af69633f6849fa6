"""
Tests for L{tabbyproxy.modelinfo}: a profile with its model folder described as Ollama's
C{/api/tags}, C{/api/show} and C{/api/ps} entries.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.config import Profile
from tabbyproxy.keepalive import FOREVER
from tabbyproxy.modelinfo import modelDetails, psEntry, showReply, tagsEntry
from tabbyproxy.ollamawire import ollamaTimestamp

STARTED = 1691176960.0
"""2023-08-04T19:22:40Z."""


class MetadataTests(SynchronousTestCase):
    """
    Model descriptions for C{/api/tags}, C{/api/show} and C{/api/ps}.
    """

    def makeProfile(
        self, profileId: str = "qwen", modelName: str = "Qwen2.5-7B-Instruct-exl3-4.0bpw",
        maxSeqLen: int | None = 16384, template: dict[str, Any] | None = None,
    ) -> Profile:
        """
        A profile whose file exists in a fresh directory.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / f"{profileId}.yml"
        model: dict[str, Any] = {"model_name": modelName}
        if maxSeqLen is not None:
            model["max_seq_len"] = maxSeqLen
        path.write_text(json.dumps({"model": model}))
        return Profile(
            id=profileId,
            path=path,
            tabby={"model": model},
            template=template if template is not None else {},
            unloadTimer=None,
        )

    def makeFolder(self) -> Path:
        """
        A model folder with a config (exl3 quantization), a chat template using tools and
        thinking, and a weights file of 1000 bytes.
        """
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "max_position_embeddings": 32768,
            "quantization_config": {"quant_method": "exl3", "bits": 4.25},
        }))
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "chat_template": "{% if tools %}{{ tools }}{% endif %}<think>{{ messages }}",
        }))
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
        return folder

    def assertDetailStrings(self, details: dict[str, Any]) -> None:
        """
        Every details field is present and a string, C{families} a list of strings.
        """
        for key in ("parent_model", "format", "family", "parameter_size", "quantization_level"):
            self.assertIsInstance(details[key], str, key)
        self.assertIsInstance(details["families"], list)
        self.assertTrue(all(isinstance(f, str) for f in details["families"]))

    def test_detailsFromFolder(self) -> None:
        """
        Details come from the config and the quantization config; the size from the name.
        """
        details = modelDetails(self.makeProfile(), self.makeFolder())
        self.assertEqual(
            details,
            {"parent_model": "", "format": "exl3", "family": "qwen2", "families": ["qwen2"],
             "parameter_size": "7B", "quantization_level": "4.25bpw"},
        )

    def test_detailsWithoutFolder(self) -> None:
        """
        Without a model folder every detail is still a string.
        """
        details = modelDetails(self.makeProfile(modelName="mystery"), Path(self.mktemp()))
        self.assertDetailStrings(details)
        self.assertEqual(
            details,
            {"parent_model": "", "format": "exl3", "family": "unknown", "families": ["unknown"],
             "parameter_size": "unknown", "quantization_level": "unknown"},
        )

    def test_detailsExl2(self) -> None:
        """
        An exl2 quantization config says exl2; the family can come from the architecture; the
        size is estimated from the config when the name does not say.
        """
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "quantization_config": {"quant_method": "exl2", "bits": 6.0},
        }))
        details = modelDetails(self.makeProfile(modelName="some-model"), folder)
        self.assertEqual(details["format"], "exl2")
        self.assertEqual(details["family"], "llama")
        self.assertEqual(details["parameter_size"], "8.0B")
        self.assertEqual(details["quantization_level"], "6.0bpw")

    def test_tags(self) -> None:
        """
        A tags entry names the profile with C{:latest}, sizes the folder, and has a stable
        64-hex digest and the profile file's time.
        """
        profile = self.makeProfile()
        folder = self.makeFolder()
        entry = tagsEntry(profile, folder)
        self.assertEqual(entry["name"], "qwen:latest")
        self.assertEqual(entry["model"], "qwen:latest")
        self.assertEqual(entry["size"], sum(p.stat().st_size for p in folder.iterdir()))
        self.assertRegex(entry["digest"], r"^[0-9a-f]{64}$")
        self.assertEqual(entry["digest"], tagsEntry(profile, folder)["digest"])
        self.assertEqual(
            entry["digest"],
            hashlib.sha256(b"qwen\0" + profile.path.read_bytes()).hexdigest(),
        )
        self.assertEqual(entry["modified_at"], ollamaTimestamp(profile.path.stat().st_mtime_ns / 1e9))
        self.assertDetailStrings(entry["details"])

    def test_tagsTaggedAndMissing(self) -> None:
        """
        An id with a tag keeps it; a missing folder has size 0.
        """
        entry = tagsEntry(self.makeProfile(profileId="qwen:7b"), Path(self.mktemp()))
        self.assertEqual((entry["name"], entry["size"]), ("qwen:7b", 0))
        self.assertDetailStrings(entry["details"])

    def test_show(self) -> None:
        """
        C{/api/show} gives parameters as text lines, the model's template and what it can do,
        and C{model_info} with the context length.
        """
        profile = self.makeProfile(template={
            "temperature": 0.7, "top_k": 20, "repetition_penalty": 1.05,
            "stop": ["<|im_end|>"], "system": "You are helpful.", "system_time": True,
        })
        reply = showReply(profile, self.makeFolder())
        self.assertEqual(
            [line.split(None, 1) for line in reply["parameters"].split("\n")],
            [["num_ctx", "16384"], ["temperature", "0.7"], ["top_k", "20"],
             ["repeat_penalty", "1.05"], ["stop", '"<|im_end|>"']],
        )
        for line in reply["parameters"].split("\n"):
            self.assertRegex(line, r'^(\S+)\s+((?:".*")|\S+)$')
        self.assertEqual(reply["system"], "You are helpful.")
        self.assertIn("{% if tools %}", reply["template"])
        self.assertEqual(reply["capabilities"], ["completion", "tools", "thinking"])
        self.assertEqual(reply["model_info"]["general.architecture"], "qwen2")
        self.assertEqual(reply["model_info"]["qwen2.context_length"], 16384)
        self.assertIsInstance(reply["model_info"]["general.parameter_count"], int)
        self.assertIn('SYSTEM """You are helpful."""', reply["modelfile"])
        self.assertIn("PARAMETER temperature", reply["modelfile"])
        self.assertDetailStrings(reply["details"])
        self.assertIsInstance(reply["modified_at"], str)

    def test_showWithoutFolder(self) -> None:
        """
        Without a model folder, C{/api/show} still has every field: a generic template, only
        C{completion}, and the default context length.
        """
        reply = showReply(self.makeProfile(maxSeqLen=None), Path(self.mktemp()))
        self.assertEqual(reply["system"], "")
        self.assertIn(".Prompt", reply["template"])
        self.assertEqual(reply["capabilities"], ["completion"])
        self.assertEqual(
            reply["model_info"],
            {"general.architecture": "unknown", "general.parameter_count": 7_000_000_000,
             "unknown.context_length": 8192},
        )
        self.assertEqual(reply["parameters"].split(), ["num_ctx", "8192"])

    def test_contextLength(self) -> None:
        """
        The context is the profile's C{max_seq_len}, else the model's, else 8192.
        """
        folder = self.makeFolder()
        self.assertEqual(psEntry(self.makeProfile(), folder, None)["context_length"], 16384)
        self.assertEqual(psEntry(self.makeProfile(maxSeqLen=None), folder, None)["context_length"], 32768)
        self.assertEqual(psEntry(self.makeProfile(maxSeqLen=-1), Path(self.mktemp()), None)["context_length"], 8192)

    def test_vision(self) -> None:
        """
        A config with a vision part makes the model a vision model.
        """
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({
            "model_type": "qwen2_5_vl", "vision_config": {"depth": 32}}))
        self.assertIn("vision", showReply(self.makeProfile(), folder)["capabilities"])

    def test_ps(self) -> None:
        """
        A C{/api/ps} entry has the unload time, the VRAM size and the context length; "forever"
        is a date centuries ahead.
        """
        profile = self.makeProfile()
        folder = self.makeFolder()
        entry = psEntry(profile, folder, STARTED + 300, "qwen")
        self.assertEqual(entry["name"], "qwen")
        self.assertEqual(entry["model"], "qwen")
        self.assertEqual(entry["expires_at"], "2023-08-04T19:27:40.000000000Z")
        self.assertEqual(entry["size_vram"], entry["size"])
        self.assertEqual(entry["context_length"], 16384)
        self.assertEqual(entry["digest"], tagsEntry(profile, folder)["digest"])
        for forever in (None, FOREVER):
            expires = psEntry(profile, folder, forever)["expires_at"]
            self.assertTrue(expires.startswith("2318-"), expires)
            datetime.fromisoformat(expires.replace("Z", "+00:00"))
        self.assertEqual(psEntry(profile, folder, None)["name"], "qwen:latest")
