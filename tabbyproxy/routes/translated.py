"""
What the routes that translate TabbyAPI's chat stream into another API's events (Anthropic
Messages, OpenAI Responses) share: the relay that feeds TabbyAPI's bytes through the one
chat-stream decoder and the API's encoder, and the exchange that sends the chat request and
judges how TabbyAPI's stream ended.
"""

from __future__ import annotations

import json
from typing import Any, Generic, Iterable, Protocol, TypeVar

from attrs import define, field
from twisted.web.iweb import IRequest

from tabbyproxy.config import Catalog, Profile
from tabbyproxy.responseswire import sseFrame
from tabbyproxy.routes.common import ClientError
from tabbyproxy.routes.loading import LoadingTicks
from tabbyproxy.scheduler import Lease
from tabbyproxy.tabbywire import ChatStreamDecoder, Event
from tabbyproxy.upstream import Upstream, UpstreamBroken


def requestedModel(catalog: Catalog, body: dict[str, Any], missing: str, unknown: str) -> tuple[str, Profile]:
    """
    Take the model name out of C{body}: the name as the client sent it (the reply says it back),
    and its profile.

    @param missing: the 400's message when the body names no model.
    @param unknown: the 404's message for a name no profile has, with C{{name}} for the name.
    """
    name = body.pop("model", None)
    if name is None or name == "":
        raise ClientError(400, missing)
    profile = catalog.resolve(name)
    if profile is None or not isinstance(name, str):
        shown = name if isinstance(name, str) else json.dumps(name)
        raise ClientError(404, unknown.format(name=shown))
    return name, profile


class EventEncoder(Protocol):
    """
    An API's encoder of TabbyAPI's decoded chat events.
    """

    def feed(self, events: Iterable[Event]) -> list[dict[str, Any]]:
        """
        The API's events for these chat events (none while a block is still building).
        """

    def feedSSE(self, events: Iterable[Event]) -> bytes:
        """
        L{feed}'s events as the SSE frames L{sseFrame} writes.
        """


E = TypeVar("E", bound=EventEncoder)


@define
class TranslatedStream(Generic[E]):
    """
    TabbyAPI's event stream for one request, through the decoder and the API's encoder; the
    API's events are written to the client as they come when it streams.

    @ivar ticks: keep-alive ticks to stop at the first event the model gives, if any.
    """

    request: IRequest
    encoder: E
    streaming: bool
    decoder: ChatStreamDecoder = field(factory=ChatStreamDecoder)
    ticks: LoadingTicks | None = None

    def dataReceived(self, data: bytes) -> None:
        events = self.decoder.feed(data)
        if not self.streaming:
            self.encoder.feed(events)
            return
        frames = self.encoder.feedSSE(events)
        if not frames:
            return
        if self.ticks is not None:
            self.ticks.stop()
            self.ticks = None
        # One write per read from TabbyAPI, however many tokens it carried.
        self.request.write(frames)

    def send(self, events: list[dict[str, Any]]) -> None:
        if self.streaming:
            self.request.write(b"".join(sseFrame(event) for event in events))


async def relayChat(upstream: Upstream, stream: TranslatedStream[Any], lease: Lease, path: str,
                    payload: bytes) -> str | None:
    """
    Send the chat request to TabbyAPI and feed its answer through C{stream}.

    @return: what went wrong in TabbyAPI's stream, C{None} when it ended well.
    @raise UpstreamAnswered: TabbyAPI refused the request.
    @raise UpstreamUnreachable: TabbyAPI did not answer.
    """
    response = await upstream.call(lease, "POST", path, payload)
    problem = None
    try:
        await upstream.pipe(response, stream.request, stream.dataReceived)
    except UpstreamBroken as e:
        problem = f"{e} (model {lease.profile.id}); see GET /status"
    decoder = stream.decoder
    if problem is None:
        problem = decoder.error
    if problem is None and not decoder.complete:
        problem = f"TabbyAPI's stream for {lease.profile.id} ended before it was complete"
    if problem is not None:
        # TabbyAPI's own error event (or a broken stream): its /health may be 503 for good now.
        lease.suspect()
    return problem
