"""
L{tabbyproxy.simulator.install}: the working directory C{--simulate} gives the simulator.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.config import Catalog, Keys, readKeys
from tabbyproxy.simulator.install import simulatedInstall
from tests.unit.test_config import QWEN, write


class SimulatedTests(SynchronousTestCase):
    """
    L{simulatedInstall}: the simulator's private stand-in for a checkout.
    """

    def setUp(self) -> None:
        configDir = Path(self.mktemp())
        write(configDir / "qwen.yml", QWEN)
        write(configDir / "coding" / "x.yml", "model: {model_name: X}\n")
        self.catalog = Catalog.load(configDir)
        self.directory = Path(self.mktemp())
        self.directory.mkdir()

    def test_filesWritten(self) -> None:
        """
        The directory gets a C{config.yml} and, per profile, C{models/<name>/config.json} with
        the profile's context length (8192 when it sets none).
        """
        install = simulatedInstall(self.directory, self.catalog, auth=False)
        config = yaml.safe_load((self.directory / "config.yml").read_text())
        self.assertEqual(config["network"]["disable_auth"], True)
        self.assertEqual(config["model"]["model_dir"], "models")
        self.assertEqual(install.baseConfig, config)
        qwen = json.loads(
            (self.directory / "models" / "Qwen3-8B-exl3-4.0bpw" / "config.json").read_text()
        )
        self.assertEqual(qwen["max_position_embeddings"], 32768)
        x = json.loads((self.directory / "models" / "X" / "config.json").read_text())
        self.assertEqual(x["max_position_embeddings"], 8192)
        for profile in self.catalog:
            self.assertTrue((install.modelDirectory(profile) / "config.json").is_file())

    def test_chatTemplateKnob(self) -> None:
        """
        A profile's C{simulator: {chat_template: ...}} is its model folder's chat template, so
        a test can have a model without tools or thinking; other profiles get the template
        that takes both.
        """
        configDir = Path(self.mktemp())
        write(configDir / "plain.yml", "model: {model_name: Plain}\nsimulator: {chat_template: '{{ messages }}'}\n")
        write(configDir / "x.yml", "model: {model_name: X}\n")
        simulatedInstall(self.directory, Catalog.load(configDir), auth=False)
        models = self.directory / "models"
        self.assertEqual((models / "Plain" / "chat_template.jinja").read_text(), "{{ messages }}")
        default = (models / "X" / "chat_template.jinja").read_text()
        self.assertIn("tools", default)
        self.assertIn("enable_thinking", default)

    def test_simulatorCommand(self) -> None:
        """
        The child is the project's simulator, run with the proxy's interpreter, in the
        directory, with the model directory forced to C{models}.
        """
        install = simulatedInstall(self.directory, self.catalog, auth=False)
        self.assertEqual(install.command, (sys.executable, "-m", "tabbyproxy.simulator"))
        self.assertEqual(install.directory, self.directory)
        self.assertEqual(install.modelDirOverride, "models")

    def test_authOff(self) -> None:
        """
        Without auth, the keys are disabled and no key file is written.
        """
        install = simulatedInstall(self.directory, self.catalog, auth=False)
        self.assertEqual(install.keys, Keys(enabled=False))
        self.assertFalse((self.directory / "api_tokens.yml").exists())

    def test_authOn(self) -> None:
        """
        With auth, fresh keys are written to the directory's C{api_tokens.yml} and used.
        """
        install = simulatedInstall(self.directory, self.catalog, auth=True)
        apiKeys, adminKey = readKeys(self.directory / "api_tokens.yml")
        self.assertEqual(install.keys, Keys(enabled=True, apiKeys=apiKeys, adminKey=adminKey))
        config = yaml.safe_load((self.directory / "config.yml").read_text())
        self.assertEqual(config["network"]["disable_auth"], False)

    def test_sharedModelFolder(self) -> None:
        """
        Two profiles for the same model folder share one simulated folder without error.
        """
        configDir = Path(self.mktemp())
        write(configDir / "a.yml", "model: {model_name: Same}\n")
        write(configDir / "b.yml", "model: {model_name: Same, max_seq_len: 4096}\n")
        simulatedInstall(self.directory, Catalog.load(configDir), auth=False)
        self.assertTrue((self.directory / "models" / "Same" / "config.json").is_file())
        self.assertEqual(os.listdir(self.directory / "models"), ["Same"])
