"""
What the proxy knows of a profile's model, read from its folder (C{config.json}, the chat
template, the weights' sizes) and its profile file, and how Ollama's C{/api/tags}, C{/api/show}
and C{/api/ps} describe it.  Unlike L{tabbyproxy.ollamawire}, this module reads files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from attrs import frozen

from tabbyproxy.config import DEFAULT_CONTEXT_LENGTH, Profile
from tabbyproxy.keepalive import FOREVER
from tabbyproxy.ollamawire import FOREVER_EXPIRES_AT, SAMPLER_NAMES, ollamaTimestamp



def _readJSON(path: Path) -> Any:
    try:
        with path.open("rb") as stream:
            return json.load(stream)
    except (OSError, ValueError):
        return None


@frozen
class _ModelFolder:
    """
    What a model folder says about itself, read once per description.
    """

    config: Mapping[str, Any]
    quantization: Mapping[str, Any]
    chatTemplate: str | None

    @classmethod
    def read(cls, folder: Path) -> _ModelFolder:
        config: Any = _readJSON(folder / "config.json")
        if not isinstance(config, dict):
            config = {}
        quantization: Any = config.get("quantization_config")
        if not isinstance(quantization, dict):
            quantization = _readJSON(folder / "quantization_config.json")
        if not isinstance(quantization, dict):
            quantization = {}
        return cls(config=config, quantization=quantization, chatTemplate=_chatTemplate(folder))


def _chatTemplate(folder: Path) -> str | None:
    """
    The model's chat template, looked up where TabbyAPI looks in a model folder.
    """
    for name in ("tabby_template.jinja", "chat_template.jinja"):
        try:
            return (folder / name).read_text(encoding="utf-8")
        except (OSError, ValueError):
            pass
    for name in ("chat_template.json", "tokenizer_config.json"):
        document = _readJSON(folder / name)
        template = document.get("chat_template") if isinstance(document, dict) else None
        if isinstance(template, str):
            return template
        if isinstance(template, list):
            named = {
                entry.get("name"): entry.get("template")
                for entry in template
                if isinstance(entry, dict)
            }
            chosen = named.get("default") or next(iter(named.values()), None)
            if isinstance(chosen, str):
                return chosen
    return None


_GENERIC_TEMPLATE = "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"
_SIZE_IN_NAME = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([BbMm])(?![A-Za-z0-9])")
_BPW_IN_NAME = re.compile(r"(\d+(?:[._]\d+)?)\s*bpw", re.IGNORECASE)


def _textConfig(config: Mapping[str, Any]) -> Mapping[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def _family(config: Mapping[str, Any]) -> str:
    modelType = config.get("model_type")
    if isinstance(modelType, str) and modelType:
        return modelType
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        name = re.sub(r"For(CausalLM|ConditionalGeneration)$", "", architectures[0])
        return name.lower() or "unknown"
    return "unknown"


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _estimatedParameters(config: Mapping[str, Any]) -> int | None:
    """
    A rough parameter count from a transformer's sizes: attention, (gated) MLP per layer,
    experts included, and the embeddings.
    """
    text = _textConfig(config)
    hidden = _int(text.get("hidden_size"))
    layers = _int(text.get("num_hidden_layers"))
    vocab = _int(text.get("vocab_size"))
    intermediate = _int(text.get("intermediate_size"))
    if not (hidden and layers and vocab and intermediate):
        return None
    heads = _int(text.get("num_attention_heads")) or 1
    kvHeads = _int(text.get("num_key_value_heads")) or heads
    headDim = _int(text.get("head_dim")) or hidden // heads
    experts = _int(text.get("num_local_experts")) or _int(text.get("num_experts")) or 1
    if experts > 1:
        intermediate = _int(text.get("moe_intermediate_size")) or intermediate
    attention = 2 * hidden * heads * headDim + 2 * hidden * kvHeads * headDim
    mlp = 3 * hidden * intermediate * experts
    embeddings = vocab * hidden * (1 if text.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp) + embeddings


def _humanCount(count: int) -> str:
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}B"
    return f"{count / 1e6:.0f}M"


def _parameters(profile: Profile, model: _ModelFolder) -> tuple[str, int | None]:
    """
    The parameter size as Ollama prints it and as a count (or C{None}): from the model's name
    (C{"7B"}) when it says, else estimated from its config.
    """
    estimate = _estimatedParameters(model.config)
    match = _SIZE_IN_NAME.search(profile.modelName) or _SIZE_IN_NAME.search(profile.id)
    if match:
        number, unit = match.group(1), match.group(2).upper()
        count = estimate or int(float(number) * (1e9 if unit == "B" else 1e6))
        return number + unit, count
    if estimate:
        return _humanCount(estimate), estimate
    return "unknown", None


def _quantizationLevel(profile: Profile, model: _ModelFolder) -> str:
    bits = model.quantization.get("bits")
    if isinstance(bits, (int, float)) and not isinstance(bits, bool) and bits > 0:
        text = f"{bits:.2f}".rstrip("0")
        return (text + "0" if text.endswith(".") else text) + "bpw"
    match = _BPW_IN_NAME.search(profile.modelName)
    if match:
        return match.group(1).replace("_", ".") + "bpw"
    return "unknown"


def _details(profile: Profile, model: _ModelFolder) -> dict[str, Any]:
    method = model.quantization.get("quant_method")
    method = method.lower() if isinstance(method, str) else ""
    family = _family(model.config)
    if family == "unknown":
        family = _family(_textConfig(model.config))
    return {
        "parent_model": "",
        "format": method if method in ("exl2", "exl3") else "exl3",
        "family": family,
        "families": [family],
        "parameter_size": _parameters(profile, model)[0],
        "quantization_level": _quantizationLevel(profile, model),
    }


def modelDetails(profile: Profile, folder: Path) -> dict[str, Any]:
    """
    Ollama's C{details} for a profile: every field a string (C{families} a list), C{"unknown"}
    where the model folder does not say.
    """
    return _details(profile, _ModelFolder.read(folder))


def _contextLength(profile: Profile, model: _ModelFolder) -> int:
    configured = _int(profile.modelSection.get("max_seq_len"))
    if configured and configured > 0:
        return configured
    native = _int(_textConfig(model.config).get("max_position_embeddings"))
    return native if native and native > 0 else DEFAULT_CONTEXT_LENGTH


def folderSize(folder: Path) -> int:
    """
    The bytes of every file under C{folder} (links followed), 0 when it does not exist.
    """
    total = 0
    for directory, _, files in os.walk(folder, followlinks=True):
        for name in files:
            try:
                total += os.stat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total


def ollamaName(profile: Profile) -> str:
    """
    A profile's name in Ollama's lists: its id with C{:latest} unless it already has a tag.
    """
    return profile.id if ":" in profile.id else profile.id + ":latest"


def _digest(profile: Profile) -> str:
    try:
        content = profile.path.read_bytes()
    except OSError:
        content = b""
    return hashlib.sha256(profile.id.encode("utf-8") + b"\0" + content).hexdigest()


def _modifiedAt(profile: Profile) -> str:
    try:
        return ollamaTimestamp(profile.path.stat().st_mtime_ns / 1e9)
    except OSError:
        return ollamaTimestamp(0)


def tagsEntry(profile: Profile, folder: Path) -> dict[str, Any]:
    """
    One entry of C{/api/tags}: C{name} and C{model} (L{ollamaName}), C{modified_at} (the profile
    file's), C{size} (the model folder's bytes), C{digest} (SHA-256 of the id and the profile
    file), C{details} with C{context_length}, and C{capabilities}, as current Ollama lists them.
    """
    name = ollamaName(profile)
    model = _ModelFolder.read(folder)
    return {
        "name": name,
        "model": name,
        "modified_at": _modifiedAt(profile),
        "size": folderSize(folder),
        "digest": _digest(profile),
        "details": {**_details(profile, model), "context_length": _contextLength(profile, model)},
        "capabilities": _capabilities(profile, model),
    }


def _parameterValue(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return None


_TEMPLATE_TO_OLLAMA: Mapping[str, str] = {
    **{tabby: ollama for ollama, tabby in SAMPLER_NAMES.items()},
    **{ollama: ollama for ollama in SAMPLER_NAMES},
    "rep_pen": "repeat_penalty",
}


def _showParameters(profile: Profile, context: int) -> str:
    lines = [("num_ctx", str(context))]
    for key, value in profile.template.items():
        name = _TEMPLATE_TO_OLLAMA.get(key)
        if name is None or name == "num_ctx":
            continue
        for item in value if isinstance(value, list) else [value]:
            text = _parameterValue(item)
            if text is not None:
                lines.append((name, text))
    return "\n".join(f"{name:<30} {text}" for name, text in lines)


def _capabilities(profile: Profile, model: _ModelFolder) -> list[str]:
    template = model.chatTemplate or ""
    capabilities = ["completion"]
    if "tools" in template:
        capabilities.append("tools")
    if "enable_thinking" in template or "<think>" in template:
        capabilities.append("thinking")
    if isinstance(model.config.get("vision_config"), dict):
        capabilities.append("vision")
    if hasEmbeddings(profile):
        capabilities.append("embedding")
    return capabilities


def hasEmbeddings(profile: Profile) -> bool:
    """
    Whether the profile loads an embedding model beside its model (an C{embeddings:} section
    naming an C{embedding_model_name}), without which TabbyAPI answers no embeddings.
    """
    section = profile.tabby.get("embeddings")
    return isinstance(section, Mapping) and bool(section.get("embedding_model_name"))


def capabilities(profile: Profile, folder: Path) -> list[str]:
    """
    What the model can do, in Ollama's words: C{completion}; C{tools}, C{thinking} and
    C{vision} when its chat template or config shows them; C{embedding} when the profile loads
    an embedding model.  Never C{insert}: TabbyAPI does not use a C{suffix}.
    """
    return _capabilities(profile, _ModelFolder.read(folder))


def showReply(profile: Profile, folder: Path) -> dict[str, Any]:
    """
    The answer to C{/api/show}: C{modelfile}, C{parameters}, C{template} (the model's chat
    template, else a generic Go template), C{system} (the profile's system prompt),
    C{details}, C{model_info} (never null: architecture, parameter count when known,
    C{<arch>.context_length}), C{capabilities} and C{modified_at}.
    """
    model = _ModelFolder.read(folder)
    details = _details(profile, model)
    context = _contextLength(profile, model)
    system = profile.template.get("system")
    system = system if isinstance(system, str) else ""
    template = model.chatTemplate or _GENERIC_TEMPLATE
    parameters = _showParameters(profile, context)
    architecture = details["family"]
    modelInfo: dict[str, Any] = {"general.architecture": architecture}
    count = _parameters(profile, model)[1]
    if count is not None:
        modelInfo["general.parameter_count"] = count
    modelInfo[f"{architecture}.context_length"] = context
    hidden = _int(_textConfig(model.config).get("hidden_size"))
    if hidden:
        modelInfo[f"{architecture}.embedding_length"] = hidden
    modelfile = [
        '# Modelfile generated by "ollama show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {ollamaName(profile)}",
        "",
        f"FROM {folder}",
        f'TEMPLATE """{template}"""',
    ]
    if system:
        modelfile.append(f'SYSTEM """{system}"""')
    modelfile.extend(f"PARAMETER {line}" for line in parameters.splitlines())
    return {
        "modelfile": "\n".join(modelfile) + "\n",
        "parameters": parameters,
        "template": template,
        "system": system,
        "details": details,
        "model_info": modelInfo,
        "capabilities": _capabilities(profile, model),
        "modified_at": _modifiedAt(profile),
    }


def psEntry(
    profile: Profile, folder: Path, expiresAt: float | None, name: str | None = None, vram: int = 0
) -> dict[str, Any]:
    """
    One entry of C{/api/ps} for the loaded profile.

    @param vram: the GPU memory accounted to it; 0 when none is known, then the model folder's
        size stands in.  All of a TabbyAPI model is on its GPUs, so both sizes are the same.
    @param expiresAt: when the idle timer fires, in epoch seconds; C{None} or L{FOREVER} for
        never, shown as L{FOREVER_EXPIRES_AT}.
    @param name: the name to show; L{ollamaName} by default.
    """
    model = _ModelFolder.read(folder)
    shown = name or ollamaName(profile)
    size = vram or folderSize(folder)
    if expiresAt is None or expiresAt == FOREVER:
        expiresAt = FOREVER_EXPIRES_AT
    return {
        "name": shown,
        "model": shown,
        "size": size,
        "digest": _digest(profile),
        "details": _details(profile, model),
        "expires_at": ollamaTimestamp(expiresAt),
        "size_vram": size,
        "context_length": _contextLength(profile, model),
    }
