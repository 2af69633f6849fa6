"""
Misbehaviour on demand: the ``simulator:`` config section (which real TabbyAPI ignores) that
makes the simulator slow, hung, failing or crashing in the ways the proxy's tests need.
"""

from __future__ import annotations

import os
import sys


from attrs import frozen

from twisted.internet.interfaces import (
    IReactorTime,
)

from tabbyproxy.simulator.values import JSON, asBool, asOptionalInt


@frozen
class SimulatorKnobs:
    """
    Test switches from the C{simulator:} config section (real TabbyAPI ignores the section).

    @ivar loadTime: seconds spent "loading" before the port opens.
    @ivar tokenDelay: seconds between generated tokens.
    @ivar tokenTurns: with no delay, still write each token in its own reactor turn (so each
        is its own TCP write), as TabbyAPI does, instead of a batch of up to 256 tokens per turn.
    @ivar tokens: completion length when a request gives no C{max_tokens}.
    @ivar stopAfterTokens: the answer ends on a stop token after this many tokens even when
        C{max_tokens} asks for more, as a real model stops long before the 32000 tokens coding
        agents allow.
    @ivar failLoad: fail the start-up load with a traceback and exit status 1.
    @ivar crashAfterTokens: after this many tokens of one request, the process dies with
        C{os._exit(1)}.
    @ivar crashMidBody: a non-streamed answer is sent half-way (its C{Content-Length} says the
        whole), then the process dies with C{os._exit(1)}.
    @ivar hangAtStart: never open the port (SIGTERM still works).
    @ivar ignoreSigterm: log and ignore SIGTERM and SIGINT; only SIGKILL ends the process.
    @ivar failGenerationAfter: the generation request after this many fails like a backend
        exception, and /health reports unhealthy from then on.
    @ivar chatTemplate: the chat template of the model folder C{--simulate} makes for the
        profile, instead of one that takes tools and thinking: the proxy reads a model's
        capabilities from it.
    """

    loadTime: float = 0.0
    tokenDelay: float = 0.0
    tokenTurns: bool = False
    tokens: int = 16
    stopAfterTokens: int | None = None
    failLoad: bool = False
    crashAfterTokens: int | None = None
    crashMidBody: bool = False
    hangAtStart: bool = False
    ignoreSigterm: bool = False
    failGenerationAfter: int | None = None
    chatTemplate: str | None = None

    @classmethod
    def fromSection(cls, section: JSON) -> SimulatorKnobs:
        return cls(
            loadTime=float(section.get("load_time", 0) or 0),
            tokenDelay=float(section.get("token_delay", 0) or 0),
            tokenTurns=asBool(section.get("token_turns", False)),
            tokens=int(section.get("tokens", 16)),
            stopAfterTokens=asOptionalInt(section.get("stop_after_tokens")),
            failLoad=asBool(section.get("fail_load", False)),
            crashAfterTokens=asOptionalInt(section.get("crash_after_tokens")),
            crashMidBody=asBool(section.get("crash_mid_body", False)),
            hangAtStart=asBool(section.get("hang_at_start", False)),
            ignoreSigterm=asBool(section.get("ignore_sigterm", False)),
            failGenerationAfter=asOptionalInt(section.get("fail_generation_after")),
            chatTemplate=str(section["chat_template"]) if section.get("chat_template") is not None else None,
        )


def crashNow(clock: IReactorTime) -> None:
    """
    Die like a backend that segfaulted: no cleanup, no [DONE], exit status 1.

    The short delay lets the reactor hand the tokens already written to the kernel, so the
    client sees a stream that stops mid-answer rather than one that never started.
    """
    sys.stdout.flush()
    clock.callLater(0.05, os._exit, 1)
