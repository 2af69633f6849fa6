"""
A profile's C{template} section applied to a request: sampler defaults the request did not set,
and the system prompt.

Request values always win.  C{system} is the profile's system prompt, added as a first system
message when the client sent none; C{system_time: true} puts the current local date and time in
front of the system prompt (or of the client's own system message).
"""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any, Callable, Mapping

# Keys of the template section that are about the system prompt, not request defaults.
_PROMPT_KEYS = frozenset({"system", "system_time"})


def timeStamp(now: datetime) -> str:
    """
    The date and time line given to the model, in the local zone: C{"Current time: 14:03:12
    CET (+0100)\\nToday: 2026-11-26 (Thursday)"}.
    """
    local = now.astimezone()
    zone = local.strftime("%Z (%z)").strip()
    return f"Current time: {local:%H:%M:%S} {zone}\nToday: {local:%Y-%m-%d (%A)}"


def applyRequestDefaults(body: dict[str, Any], template: Mapping[str, Any]) -> None:
    """
    Copy every template default the request does not set into C{body}.
    """
    for key, value in template.items():
        if key not in _PROMPT_KEYS and body.get(key) is None:
            body[key] = copy.deepcopy(value)


def applySystemPrompt(
    messages: list[Any], template: Mapping[str, Any], now: Callable[[], datetime]
) -> list[Any]:
    """
    The chat messages with the profile's system prompt and time stamp added.

    @return: C{messages} itself when nothing is added, else a new list; the client's message
        objects are never changed in place.
    """
    system = template.get("system")
    stamp = timeStamp(now()) if template.get("system_time") else None
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") == "system":
        content = first.get("content")
        if stamp is None:
            return messages
        if isinstance(content, str):
            stamped: Any = f"{stamp}\n\n{content}"
        elif isinstance(content, list):
            stamped = [{"type": "text", "text": stamp}, *content]
        else:
            return messages
        return [{**first, "content": stamped}, *messages[1:]]
    parts = [part for part in (stamp, system) if part]
    if not parts:
        return messages
    return [{"role": "system", "content": "\n\n".join(str(part) for part in parts)}, *messages]
