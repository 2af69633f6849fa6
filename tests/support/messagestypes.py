"""
Anthropic's Messages API as the C{anthropic} SDK's own pydantic types read it: each stream
event, the Message, an error, so tests check the proxy's answers against the client's idea of
them rather than against their own.
"""

from __future__ import annotations

from typing import Any

from anthropic.types import ErrorResponse, Message, RawMessageStreamEvent
from pydantic import BaseModel, TypeAdapter

_EVENTS: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)


def parseEvent(event: dict[str, Any]) -> BaseModel | None:
    """
    C{event} as the SDK's type for its C{type}: a C{ping} must be exactly C{{"type": "ping"}}
    (the SDK skips it), an C{error} Anthropic's error body; anything else must be one of the
    SDK's stream events.
    """
    if event.get("type") == "ping":
        if event != {"type": "ping"}:
            raise AssertionError(f"a ping with more than its type: {event!r}")
        return None
    if event.get("type") == "error":
        return ErrorResponse.model_validate({**event, "request_id": None})
    model: BaseModel = _EVENTS.validate_python(event)
    return model


def parseMessage(document: dict[str, Any]) -> Message:
    return Message.model_validate(document)


def parseError(document: dict[str, Any]) -> ErrorResponse:
    return ErrorResponse.model_validate(document)

