"""
The Responses API as the C{openai} SDK's own pydantic types read it: each stream event by its
C{type}, and the Response object, so tests check the proxy's answers against the client's idea
of them rather than against their own.
"""

from __future__ import annotations

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

