"""
Reading what the proxy sent: the payloads of an SSE body, and the objects of an NDJSON body.
"""

from __future__ import annotations

import json
from typing import Any


def ssePayloads(body: bytes) -> list[str]:
    """
    The C{data:} payloads of an SSE body, in order (comments skipped, C{[DONE]} kept).
    """
    return [line[len("data: "):] for line in body.decode("utf-8").splitlines()
            if line.startswith("data: ")]


def sseDocuments(body: bytes) -> list[dict[str, Any]]:
    """
    The JSON objects of an SSE body, in order (C{[DONE]} skipped).
    """
    return [json.loads(payload) for payload in ssePayloads(body) if payload != "[DONE]"]


def ndjsonDocuments(raw: bytes) -> list[dict[str, Any]]:
    """
    The objects of an NDJSON body, checking the framing Ollama clients rely on: every line
    ends with a newline, none is blank, each is one JSON object.
    """
    assert raw.endswith(b"\n"), raw
    lines = raw[:-1].split(b"\n")
    assert all(line.strip() for line in lines), raw
    documents = [json.loads(line) for line in lines]
    assert all(isinstance(document, dict) for document in documents)
    return documents
