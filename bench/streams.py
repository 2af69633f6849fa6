"""
A raw-socket HTTP/1.1 client for the scenarios a load generator cannot time: the arrival time of
every event of many concurrent streams, a thousand slow streams held open at once, and the first
byte of a server that is still starting.

It uses C{selectors} and plain sockets, one request per connection (C{Connection: close}), and
decodes just enough HTTP to find the body's events: the status line, C{Content-Length} or
C{chunked} framing, and event separators (a blank line for server-sent events, a newline for
NDJSON).  Its own cost is the same for the direct and the proxied path of a run.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

SEPARATORS = {"sse": b"\n\n", "ndjson": b"\n"}


def requestBytes(port: int, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii") + body


@dataclass
class Stream:
    """
    One request and what arrived for it.

    @ivar events: the arrival time (C{time.perf_counter}) of each complete event of the body.
    """

    kind: str
    request: bytes
    started: float = 0.0
    firstByte: float | None = None
    status: int | None = None
    events: list[float] = field(default_factory=list)
    finished: float | None = None
    error: str | None = None
    complete: bool = False
    _head: bytes = b""
    _inBody: bool = False
    _chunked: bool = False
    _length: int | None = None
    _received: int = 0
    _chunkRemaining: int = 0
    _chunkState: str = "size"
    _framing: bytes = b""
    _tail: bytes = b""

    @property
    def ttfb(self) -> float | None:
        return None if self.firstByte is None else self.firstByte - self.started

    def feed(self, data: bytes, now: float) -> None:
        """
        Take the next bytes from the socket, received at C{now}.
        """
        if self.firstByte is None:
            self.firstByte = now
        if not self._inBody:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end == -1:
                return
            head, data = self._head[:end], self._head[end + 4:]
            self._inBody = True
            lines = head.split(b"\r\n")
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"transfer-encoding" and b"chunked" in value.lower():
                    self._chunked = True
                elif name == b"content-length":
                    self._length = int(value)
            if self._length == 0:
                self.complete = True
        body = self._dechunk(data) if self._chunked else data
        if not self._chunked and self._length is not None:
            self._received += len(body)
            if self._received >= self._length:
                self.complete = True
        if body:
            self._countEvents(body, now)

    def _dechunk(self, data: bytes) -> bytes:
        pieces = []
        data = self._framing + data
        self._framing = b""
        position = 0
        while position < len(data):
            if self._chunkState == "data":
                take = data[position:position + self._chunkRemaining]
                pieces.append(take)
                position += len(take)
                self._chunkRemaining -= len(take)
                if self._chunkRemaining == 0:
                    self._chunkState = "crlf"
            elif self._chunkState == "crlf":
                if len(data) - position < 2:
                    break
                position += 2
                self._chunkState = "size"
            else:
                lineEnd = data.find(b"\r\n", position)
                if lineEnd == -1:
                    break
                size = int(data[position:lineEnd].split(b";")[0], 16)
                position = lineEnd + 2
                if size == 0:
                    self.complete = True
                    position = len(data)
                    break
                self._chunkRemaining = size
                self._chunkState = "data"
        self._framing = data[position:]
        return b"".join(pieces)

    def _countEvents(self, body: bytes, now: float) -> None:
        separator = SEPARATORS.get(self.kind)
        if separator is None:
            return
        text = (self._tail + body).replace(b"\r\n", b"\n")
        count = text.count(separator)
        if count:
            self.events.extend([now] * count)
            text = text[text.rfind(separator) + len(separator):]
        self._tail = text


def runStreams(
    port: int,
    path: str,
    body: bytes,
    count: int,
    kind: str = "sse",
    timeout: float = 120.0,
    openPerTurn: int = 50,
    onTick: Callable[[], None] | None = None,
    tickEvery: float = 0.1,
) -> list[Stream]:
    """
    Send C{count} concurrent requests (opened C{openPerTurn} at a time, so a listen backlog of
    50 does not drop connections) and read every answer to its end.

    @param onTick: called about every C{tickEvery} seconds while the streams run (to sample a
        process's memory, say).
    """
    selector = selectors.DefaultSelector()
    request = requestBytes(port, path, body)
    streams: list[Stream] = []
    sockets: dict[socket.socket, Stream] = {}
    pendingSend: dict[socket.socket, bytes] = {}
    deadline = time.perf_counter() + timeout
    nextTick = time.perf_counter()

    def openSome() -> None:
        for _ in range(min(openPerTurn, count - len(streams))):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream = Stream(kind, request, started=time.perf_counter())
            streams.append(stream)
            result = sock.connect_ex(("127.0.0.1", port))
            if result not in (0, errno.EINPROGRESS):
                stream.error = errno.errorcode.get(result, str(result))
                sock.close()
                continue
            sockets[sock] = stream
            pendingSend[sock] = request
            selector.register(sock, selectors.EVENT_WRITE, sock)

    def close(sock: socket.socket, stream: Stream, now: float) -> None:
        selector.unregister(sock)
        sock.close()
        del sockets[sock]
        pendingSend.pop(sock, None)
        stream.finished = now

    openSome()
    while sockets or len(streams) < count:
        now = time.perf_counter()
        if now > deadline:
            for sock, stream in list(sockets.items()):
                stream.error = stream.error or "timeout"
                close(sock, stream, now)
            break
        if len(streams) < count:
            openSome()
        if onTick is not None and now >= nextTick:
            onTick()
            nextTick = now + tickEvery
        for key, mask in selector.select(timeout=0.02):
            sock = key.data
            stream = sockets[sock]
            now = time.perf_counter()
            if mask & selectors.EVENT_WRITE:
                try:
                    sent = sock.send(pendingSend[sock])
                except OSError as e:
                    stream.error = str(e)
                    close(sock, stream, now)
                    continue
                rest = pendingSend[sock][sent:]
                if rest:
                    pendingSend[sock] = rest
                else:
                    del pendingSend[sock]
                    selector.modify(sock, selectors.EVENT_READ, sock)
                continue
            try:
                data = sock.recv(262144)
            except OSError as e:
                stream.error = str(e)
                close(sock, stream, now)
                continue
            if not data:
                if not stream.complete and stream.error is None:
                    stream.error = "closed before the end of the answer"
                close(sock, stream, now)
                continue
            stream.feed(data, now)
            if stream.complete:
                close(sock, stream, now)
    selector.close()
    return streams


def firstTokenWhenUp(port: int, path: str, body: bytes, timeout: float = 60.0, retry: float = 0.005) -> float:
    """
    Send one streaming request as soon as C{port} accepts a connection, retrying every C{retry}
    seconds, and return the C{time.perf_counter} when its first C{data:} event (the first token)
    arrived; SSE comments before it (the proxy's "loading" comments) do not count.  The answer is
    then read to its end.
    """
    deadline = time.perf_counter() + timeout
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            break
        except ConnectionRefusedError:
            if time.perf_counter() > deadline:
                raise
            time.sleep(retry)
    with sock:
        sock.sendall(requestBytes(port, path, body))
        received = b""
        while b"\ndata:" not in received:
            piece = sock.recv(65536)
            if not piece:
                raise ConnectionError(f"port {port} closed the connection before the first token")
            received += piece
        arrived = time.perf_counter()
        while sock.recv(262144):
            pass
    return arrived
