"""
The responses this proxy keeps for C{previous_response_id}, C{GET /v1/responses/{id}} and
C{DELETE}: the Response objects of requests that did not say C{store: false}, with the
conversation each continues from, in memory and bounded both in count and in bytes, the
oldest evicted first.  Nothing survives a restart; an evicted or unknown id is OpenAI's 404.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from attrs import define, field, frozen
from twisted.logger import Logger

DEFAULT_MAX_RESPONSES = 1000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@frozen
class StoredResponse:
    """
    One kept response.

    @ivar response: the Response object as the client got it.
    @ivar items: the conversation a follow-up continues: the request's items, then the output.
    @ivar size: about how many bytes it holds (its JSON's length).
    """

    response: dict[str, Any]
    items: list[dict[str, Any]]
    size: int


@define
class ResponseStore:
    """
    Responses by id, the least recently stored evicted first once over C{maxResponses} or
    C{maxBytes}.
    """

    log = Logger()

    maxResponses: int = DEFAULT_MAX_RESPONSES
    maxBytes: int = DEFAULT_MAX_BYTES
    _entries: OrderedDict[str, StoredResponse] = field(factory=OrderedDict)
    _bytes: int = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def put(self, response: dict[str, Any], items: list[dict[str, Any]]) -> None:
        """
        Keep C{response}, continued from C{items} plus its output.  A response bigger than the
        whole store is not kept.
        """
        history = [*items, *response.get("output", [])]
        size = len(json.dumps(response, ensure_ascii=False)) + len(json.dumps(history, ensure_ascii=False))
        if size > self.maxBytes:
            self.log.info("Not keeping response {id}: {size} bytes is over the store's {limit}",
                          id=response["id"], size=size, limit=self.maxBytes)
            return
        self.delete(response["id"])
        self._entries[response["id"]] = StoredResponse(response, history, size)
        self._bytes += size
        while len(self._entries) > self.maxResponses or self._bytes > self.maxBytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.size

    def get(self, responseId: str) -> StoredResponse | None:
        return self._entries.get(responseId)

    def delete(self, responseId: str) -> bool:
        """
        @return: whether there was such a response.
        """
        entry = self._entries.pop(responseId, None)
        if entry is None:
            return False
        self._bytes -= entry.size
        return True
