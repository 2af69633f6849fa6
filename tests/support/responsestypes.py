"""
The Responses API as the C{openai} SDK's own pydantic types read it: each stream event by its
C{type}, and the Response object, so tests check the proxy's answers against the client's idea
of them rather than against their own.
"""

from __future__ import annotations

import json
import typing
from typing import Any

from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel


def _eventTypes() -> dict[str, type[BaseModel]]:
    union = typing.get_args(ResponseStreamEvent)[0]  # Annotated[Union[...], discriminator]
    types: dict[str, type[BaseModel]] = {}
    for model in typing.get_args(union):
        [name] = typing.get_args(model.model_fields["type"].annotation)
        types[name] = model
    return types


EVENT_TYPES = _eventTypes()


def parseEvent(event: dict[str, Any]) -> BaseModel:
    """
    C{event} as the SDK's type for its C{type}; fails on an unknown type or a bad field.
    """
    model = EVENT_TYPES.get(event.get("type", ""))
    if model is None:
        raise AssertionError(f"the openai SDK knows no event type {event.get('type')!r}")
    return model.model_validate(event)


def parseResponse(document: dict[str, Any]) -> Response:
    return Response.model_validate(document)


def sseEvents(raw: bytes) -> list[dict[str, Any]]:
    """
    The events of a Responses stream, each checked: its C{event:} line names its C{type}.
    Comments (the proxy's loading notes) are skipped.
    """
    events = []
    for block in raw.decode("utf-8").split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        event = json.loads(fields["data"])
        if fields.get("event") != event.get("type"):
            raise AssertionError(f"event line {fields.get('event')!r} for an event of type {event.get('type')!r}")
        events.append(event)
    return events
