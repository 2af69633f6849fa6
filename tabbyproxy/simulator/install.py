"""
The simulator's private stand-in for a TabbyAPI checkout, for C{twistd tabbyproxy --simulate}: a
working directory with a C{config.yml} and a model folder for every profile, so that any profile
can be loaded without a GPU or a download.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from tabbyproxy.config import (
    DEFAULT_CONTEXT_LENGTH,
    Catalog,
    TabbyInstall,
    makePrivateDirectories,
    writePrivate,
)
from tabbyproxy.simulator.knobs import SimulatorKnobs


_CHAT_TEMPLATE = (
    "{% if tools %}{{ tools | tojson }}{% endif %}{% for message in messages %}{{ message.content }}\n{% endfor %}"
    "{% if enable_thinking %}<think>\n{% endif %}"
)


def simulatedInstall(directory: Path, catalog: Catalog, auth: bool) -> TabbyInstall:
    """
    Make C{directory} the simulator's working directory and describe it as a TabbyAPI install.

    @param auth: whether the simulator (and so the proxy) asks clients for keys; the keys are
        then written to C{api_tokens.yml} in C{directory}.
    """
    baseConfig = {
        "network": {"host": "127.0.0.1", "disable_auth": not auth},
        "model": {"model_dir": "models"},
    }
    writePrivate(directory / "config.yml", yaml.safe_dump(baseConfig))
    install = TabbyInstall.inDirectory(
        directory, (sys.executable, "-m", "tabbyproxy.simulator"), baseConfig,
        modelDirOverride="models",
    )
    addModelFolders(install, catalog)
    return install


def addModelFolders(install: TabbyInstall, catalog: Catalog) -> None:
    """
    Give every profile of C{catalog} a model folder the simulator can load (profiles added by a
    reload need theirs too): a C{config.json} with the profile's context length, and a chat
    template that takes tools and thinking, as the simulator answers both (or the profile's
    C{simulator: {chat_template: ...}}).
    """
    for profile in catalog:
        modelFolder = install.directory / "models" / profile.modelName
        if (modelFolder / "config.json").exists():
            continue
        makePrivateDirectories(install.directory, modelFolder)
        maxSeqLen = profile.modelSection.get("max_seq_len") or DEFAULT_CONTEXT_LENGTH
        writePrivate(
            modelFolder / "config.json",
            json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                        "max_position_embeddings": maxSeqLen}),
        )
        section = profile.tabby.get("simulator")
        knobs = SimulatorKnobs.fromSection(section if isinstance(section, dict) else {})
        writePrivate(modelFolder / "chat_template.jinja", knobs.chatTemplate or _CHAT_TEMPLATE)
