"""
TabbyAPI's configuration as the simulator reads it: ``config.yml`` in the working directory,
the ``--config`` override, ``TABBY_*`` environment variables and command-line flags, merged in
TabbyAPI's order, and the part of it the simulator acts on.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from attrs import frozen

from tabbyproxy.simulator.knobs import SimulatorKnobs
from tabbyproxy.simulator.values import JSON, asBool, asOptionalInt


DEFAULT_SEQ_LEN = 8192


def filterNoneValues(value: Any) -> Any:
    """
    Drop keys whose value is None, recursively, as TabbyAPI does before merging, so a blank key
    in an override falls back to config.yml and then to the default.
    """
    if isinstance(value, dict):
        return {k: filterNoneValues(v) for k, v in value.items() if v is not None}
    return value


def deepMerge(base: JSON, override: JSON) -> JSON:
    """
    Merge C{override} into a copy of C{base} per key, descending into sections.
    """
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deepMerge(merged[key], value)
        else:
            merged[key] = value
    return merged


def readYaml(path: Path) -> JSON:
    """
    Read a YAML mapping; an empty file is an empty mapping.
    """
    with path.open(encoding="utf8") as f:
        loaded = yaml.safe_load(f)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} does not hold a mapping")
    return loaded


_ENV_SECTIONS = ("network", "model", "embeddings", "simulator", "developer", "logging")


def configFromEnvironment(environ: dict[str, str]) -> JSON:
    """
    Read C{TABBY_<SECTION>_<KEY>} variables, TabbyAPI's second config source.
    """
    result: JSON = {}
    for name, raw in environ.items():
        for section in _ENV_SECTIONS:
            prefix = f"TABBY_{section.upper()}_"
            if name.startswith(prefix) and len(name) > len(prefix):
                result.setdefault(section, {})[name[len(prefix):].lower()] = yaml.safe_load(raw)
    return result


def loadMergedConfig(cwd: Path, args: argparse.Namespace, environ: dict[str, str]) -> JSON:
    """
    Build the effective config the way C{TabbyConfig.load} does: config.yml in the working
    directory, then the environment, then either the C{--config} file or (only when there is
    no C{--config}) the other command-line flags.
    """
    sources: list[JSON] = []
    base = cwd / "config.yml"
    if base.exists():
        sources.append(readYaml(base))
    sources.append(configFromEnvironment(environ))
    if args.config is not None:
        sources.append(readYaml(cwd / args.config))
    else:
        network: JSON = {}
        if args.host is not None:
            network["host"] = args.host
        if args.port is not None:
            network["port"] = args.port
        if args.disable_auth is not None:
            network["disable_auth"] = args.disable_auth
        sources.append({"network": network})
    merged: JSON = {}
    for source in sources:
        merged = deepMerge(merged, filterNoneValues(source))
    return merged


@frozen
class SimulatorConfig:
    """
    The part of TabbyAPI's config the simulator acts on, with TabbyAPI's defaults.
    """

    host: str = "127.0.0.1"
    port: int = 5000
    disableAuth: bool = False
    ssePingInterval: float = 15.0
    modelDir: Path = Path("models")
    modelName: str | None = None
    maxSeqLen: int | None = None
    cacheSize: int | None = None
    cacheMode: str = "FP16"
    chunkSize: int = 2048
    outputChunking: bool = True
    maxBatchSize: int | None = None
    promptTemplate: str | None = None
    embeddingModelName: str | None = None
    knobs: SimulatorKnobs = SimulatorKnobs()

    @classmethod
    def fromMerged(cls, merged: JSON, cwd: Path) -> SimulatorConfig:
        def section(name: str) -> JSON:
            value = merged.get(name)
            return value if isinstance(value, dict) else {}

        network, model = section("network"), section("model")
        modelDir = Path(str(model.get("model_dir", "models")))
        if not modelDir.is_absolute():
            modelDir = cwd / modelDir
        modelName = model.get("model_name")
        return cls(
            host=str(network.get("host", "127.0.0.1")),
            port=int(network.get("port", 5000)),
            disableAuth=asBool(network.get("disable_auth", False)),
            ssePingInterval=float(network.get("sse_ping_interval", 15)),
            modelDir=modelDir,
            modelName=str(modelName) if modelName else None,
            maxSeqLen=asOptionalInt(model.get("max_seq_len")),
            cacheSize=asOptionalInt(model.get("cache_size")),
            cacheMode=str(model.get("cache_mode", "FP16")),
            chunkSize=int(model.get("chunk_size", 2048)),
            outputChunking=asBool(model.get("output_chunking", True)),
            maxBatchSize=asOptionalInt(model.get("max_batch_size")),
            promptTemplate=model.get("prompt_template"),
            embeddingModelName=section("embeddings").get("embedding_model_name") or None,
            knobs=SimulatorKnobs.fromSection(section("simulator")),
        )


