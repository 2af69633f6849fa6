"""
What TabbyAPI says on the wire and how to read it: its server-sent event stream, split into the
payloads of its events; its error bodies (FastAPI's C{{"detail": ...}}, validation error lists,
OpenAI-style documents), turned into one message for the client; and the framing of the events
the proxy adds to a stream it relays.

The rest of the proxy never parses TabbyAPI's bytes itself.
"""

from __future__ import annotations

import json


def sseEvent(document: object) -> bytes:
    """
    One server-sent event carrying C{document}, framed as TabbyAPI frames its own.
    """
    return b"data: " + json.dumps(document, separators=(",", ":")).encode("utf-8") + b"\r\n\r\n"


def upstreamErrorMessage(status: int, raw: bytes) -> str:
    """
    What went wrong, from an error TabbyAPI answered (C{{"detail": ...}} from FastAPI, a list of
    validation errors, or an OpenAI-style body).
    """
    try:
        document = json.loads(raw)
    except ValueError:
        text = raw.decode("utf-8", "replace").strip()
        return f"TabbyAPI answered {status}: {text or 'no details'}"
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        detail = document.get("detail")
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):
            return "; ".join(_validationProblem(problem) for problem in detail)
    return f"TabbyAPI answered {status}: {raw.decode('utf-8', 'replace')}"


def _validationProblem(problem: object) -> str:
    if not isinstance(problem, dict):
        return str(problem)
    location = ".".join(str(part) for part in problem.get("loc", []) if part != "body")
    return f"{location}: {problem.get('msg', 'invalid')}" if location else str(problem.get("msg"))


class EventDecoder:
    """
    Splits a server-sent event stream into the payloads of its C{data:} lines, however the bytes
    are cut.  Comment lines (TabbyAPI's C{: ping}) and other fields are skipped; C{\\r\\n},
    C{\\r} and C{\\n} all end a line, as TabbyAPI frames with C{\\r\\n}.
    """

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        """
        @return: the payload of each complete C{data:} line in C{data}, in order.
        """
        lines = (self._partial + data).replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        # A CRLF cut in two reads as CR then LF: the extra empty line is harmless, as empty
        # lines carry no data.
        self._partial = lines.pop()
        payloads = []
        for line in lines:
            if line.startswith(b"data:"):
                payload = line[5:]
                payloads.append(payload[1:] if payload.startswith(b" ") else payload)
        return payloads
