"""
One TabbyAPI process: its spawn, its readiness, its health, its stop and its exit.

A child is started with C{PYTHON main.py --config FILE} in the TabbyAPI directory, is ready once
C{GET /health} answers 200, and is stopped with SIGTERM, then SIGKILL after a grace period.  It
logs its console line by line under its model's name and keeps the last lines for error reports.
What to do about what happens to it (serve the waiting requests, fail them, start another model)
is the scheduler's: a child tells its L{ChildOwner}.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import time
from collections import deque
from enum import Enum
from pathlib import Path
from signal import SIGINT, SIGKILL, SIGTERM
from typing import Callable, Mapping, Protocol, Sequence

import yaml
from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived, readBody
from twisted.web.iweb import IAgent

from tabbyproxy.config import Keys, Profile, TabbyInstall, writePrivate
from tabbyproxy.keepalive import describeDuration
from tabbyproxy.listener import listenerOwnedBy
from tabbyproxy.metrics import Metrics

LAST_LINES = 30
# TabbyAPI's start-up lines when its port is busy: it then serves on the next port, or, when that
# one is busy too, exits with status 0 without serving.
_PORT_SWITCH = re.compile(r"Port (\d+) is currently in use\. Switching to (\d+)")
_PORTS_TAKEN = re.compile(r"Ports (\d+) and (\d+) are in use")
# Where a failure's message ends and TabbyAPI's last lines begin (L{Child.withLastLines}).
LAST_OUTPUT = "; last output of TabbyAPI:\n"


_AUTH_OFF = Keys(enabled=False)


def _authOff() -> Keys:
    return _AUTH_OFF


class ChildState(Enum):
    """
    Where a child is in its life.  A draining child is ready but takes no new request: it stops
    once its requests in flight are done (its L{Child.stopReason} says why).
    """

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"


class StopReason(Enum):
    """
    Why a child was stopped: a metrics label and the start of a log line.
    """

    IDLE = "idle"
    KEEP_ALIVE_ZERO = "keep_alive_zero"
    UNLOAD = "unload"
    SWAP = "swap"
    UNHEALTHY = "unhealthy"
    LOAD_TIMEOUT = "load_timeout"
    ABANDONED = "abandoned"
    PORT_TAKEN = "port_taken"
    PORT_MOVED = "port_moved"
    HUNG = "hung"
    SHUTDOWN = "shutdown"


@frozen
class ChildSettings:
    """
    @ivar loadTimeout: how long a start may take before it is abandoned.
    @ivar stopGrace: how long a child has to exit after SIGTERM before SIGKILL.
    @ivar healthInterval: how often a starting child's C{/health} is polled; short, because a
        cold start costs on average half of it on top of TabbyAPI's own start.
    @ivar healthTimeout: how long one C{/health} request may take before the child counts as
        not answering.
    @ivar hangInterval: how often a child with requests in flight has its C{/health} asked,
        to find out whether it hangs.
    @ivar hangTimeout: how long that C{/health} request may go unanswered before the child is
        judged hung: long, because a busy TabbyAPI answers late but answers.
    """

    loadTimeout: float = 600.0
    stopGrace: float = 10.0
    healthInterval: float = 0.05
    healthTimeout: float = 5.0
    hangInterval: float = 30.0
    hangTimeout: float = 60.0


class ChildOwner(Protocol):
    """
    What a child tells the scheduler that owns it.
    """

    def childReady(self, child: Child) -> None:
        """
        C{child}'s C{/health} answered 200 for the first time.
        """

    def childFailed(self, child: Child, message: str) -> None:
        """
        C{child} will never be ready: C{message} says why, with its last lines, for the clients.
        """

    def childMoved(self, child: Child, message: str) -> None:
        """
        C{child} found its port busy and serves on another one, which the proxy did not pick
        (and so never trusts): it is being stopped; C{message} says so.  Its requests are the
        owner's to keep waiting for a child on a fresh port, or to fail.
        """

    def childCrashed(self, child: Child, message: str) -> None:
        """
        C{child} ended while serving, or by a signal nobody here sent it.
        """

    def childExited(self, child: Child) -> None:
        """
        C{child} has exited; its C{ended} Deferred fires right after this.
        """


class _ChildProtocol(ProcessProtocol):
    """
    Logs the child's output line by line under its model's name, keeps the last lines for error
    reports, and reports the exit.
    """

    log = Logger()

    def __init__(self, modelId: str, onExit: Callable[[Failure], None], keys: Callable[[], Keys] = _authOff,
                 onLine: Callable[[str], None] = lambda line: None) -> None:
        """
        @param keys: the keys as they are now (the file is followed while the child runs): a
            line that holds one, or one that was a key earlier in the child's life, is logged,
            and kept for error reports, with the key replaced by C{[redacted]}.
        @param onLine: is given each line once it is logged.
        """
        self.modelId = modelId
        self.lastLines: deque[str] = deque(maxlen=LAST_LINES)
        self._onExit = onExit
        self._onLine = onLine
        self._partial = {1: b"", 2: b""}
        self._keys = keys
        self._keysSeen: Keys | None = None
        self._secrets: tuple[str, ...] = ()

    def _currentSecrets(self) -> tuple[str, ...]:
        keys = self._keys()
        if keys is not self._keysSeen:
            self._keysSeen = keys
            if keys.enabled:
                added = [key for key in (*keys.apiKeys, keys.adminKey) if key and key not in self._secrets]
                self._secrets = (*self._secrets, *added)
        return self._secrets

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            self._emit(childFD, line)

    def _emit(self, childFD: int, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if not line.strip():
            return
        for secret in self._currentSecrets():
            if secret in line:
                line = line.replace(secret, "[redacted]")
        self.lastLines.append(line)
        self.log.info(
            "[{model}] {line}", model=self.modelId, line=line, stream="stderr" if childFD == 2 else "stdout"
        )
        self._onLine(line)

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in self._partial.items():
            if rest:
                self._emit(childFD, rest)
        self._onExit(reason)


def describeExit(reason: Failure) -> str:
    """
    A process exit in words: C{"exited with status 1"}, C{"was killed by signal 9"}.
    """
    value = reason.value
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return f"was killed by signal {value.signal}"
        return f"exited with status {value.exitCode}"
    if isinstance(value, ProcessDone):
        return "exited with status 0"
    return f"ended: {value}"


def _exitFields(reason: Failure) -> dict[str, int | None]:
    """
    The exit status and signal of a process exit, as log event fields.
    """
    value = reason.value
    if isinstance(value, (ProcessTerminated, ProcessDone)):
        return {"exitCode": value.exitCode, "signal": value.signal}
    return {"exitCode": None, "signal": None}


def pickFreePort() -> int:
    """
    A loopback port nobody listens on right now.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@frozen
class HangVerdict:
    """
    What a C{/health} request asked while a child serves found.

    @ivar hung: the child accepted the request but did not answer it in time.
    @ivar problem: what is wrong, or C{None} when C{/health} answered 200.
    """

    hung: bool
    problem: str | None


@define(eq=False)
class Child:
    """
    One TabbyAPI process, and the scheduler's bookkeeping about it (C{keepAlive}, C{inFlight},
    C{lastIdleCheck}).

    @ivar ownsListener: whether the sockets listening on a port (the first argument) all belong
        to a process (the second) or its descendants; a child whose port another process holds
        is never trusted.
    @ivar environment: what the child's environment adds to the proxy's (its GPUs).
    @ivar ended: fires once the process has exited.
    """

    log = Logger()

    profile: Profile
    port: int
    configPath: Path
    keepAlive: float
    owner: ChildOwner
    clock: IReactorTime
    agent: IAgent
    settings: ChildSettings
    metrics: Metrics
    # The keys as they are now, never to be logged.  Not in the repr: the child is the source of
    # its own log events, and those must hold no key.
    keys: Callable[[], Keys] = field(default=_authOff, repr=False)
    wallClock: Callable[[], float] = time.time
    ownsListener: Callable[[int, int], bool] = listenerOwnedBy
    # Added to the proxy's environment for the child: the GPUs it may use.
    environment: Mapping[str, str] = field(factory=dict)
    protocol: _ChildProtocol = field(init=False)
    state: ChildState = ChildState.STARTING
    transport: IProcessTransport | None = None
    startedAt: float = field(init=False)
    readyAt: float | None = None
    inFlight: int = 0
    stopReason: StopReason | None = None
    ended: Deferred[None] = field(factory=Deferred)
    loadTimeoutCall: IDelayedCall | None = None
    killCall: IDelayedCall | None = None
    readinessPoll: Deferred[None] | None = None
    healthCheck: Deferred[str | None] | None = None
    hangCheck: Deferred[HangVerdict] | None = None
    # Whether TabbyAPI said it loads the model (the load timeout counts from then).
    loadingSeen: bool = False
    spawnedPid: int | None = None
    lastIdleCheck: float = float("-inf")
    signalsSent: set[str] = field(factory=set)

    def __attrs_post_init__(self) -> None:
        self.protocol = _ChildProtocol(self.profile.id, self._exited, self.keys, self._lineSeen)
        self.startedAt = self.wallClock()

    @property
    def baseURL(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """
        The child's pid; still known once it has exited, for the reports about it.
        """
        if self.transport is not None and self.transport.pid is not None:
            return self.transport.pid
        return self.spawnedPid

    @property
    def serving(self) -> bool:
        """
        Whether the process is up and answering (ready, or draining its last requests).
        """
        return self.state in (ChildState.READY, ChildState.DRAINING)

    def lastLines(self) -> str:
        return "\n".join(self.protocol.lastLines)

    def spawn(
        self,
        install: TabbyInstall,
        reactor: IReactorProcess,
        wrapCommand: Callable[[Sequence[str]], Sequence[str]] = tuple,
    ) -> None:
        """
        Write the child's TabbyAPI config and spawn it; poll its C{/health} until it is ready.

        @raise OSError: the process could not be spawned (its config file is removed again).
        """
        writePrivate(self.configPath, yaml.safe_dump(install.childConfig(self.profile, self.port)))
        command = (*install.command, "--config", str(self.configPath))
        self.log.info(
            "Starting {model} on port {port}: {command}",
            model=self.profile.id,
            port=self.port,
            command=" ".join(command),
        )
        spawned = list(wrapCommand(command))
        try:
            self.transport = reactor.spawnProcess(
                self.protocol,
                spawned[0],
                spawned,
                env={**_childEnvironment(), **self.environment},
                path=str(install.directory),
            )
        except OSError:
            self.configPath.unlink(missing_ok=True)
            raise
        self.spawnedPid = self.transport.pid
        self.loadTimeoutCall = self.clock.callLater(self.settings.loadTimeout, self._loadTimedOut)
        self.readinessPoll = Deferred.fromCoroutine(self._awaitReady())
        self.readinessPoll.addErrback(lambda failure: failure.trap(CancelledError))

    def drain(self, reason: StopReason) -> None:
        """
        Take no new request; the owner stops the child for C{reason} once its last one ends.
        """
        if self.state is ChildState.READY:
            self.state = ChildState.DRAINING
            self.stopReason = reason

    def resume(self) -> None:
        """
        Take new requests again after a drain that made room for another model
        (L{StopReason.SWAP}), which that model no longer needs.
        """
        if self.state is ChildState.DRAINING and self.stopReason is StopReason.SWAP:
            self.state = ChildState.READY
            self.stopReason = None

    def checkHealth(self) -> Deferred[str | None] | None:
        """
        Ask a ready child's C{/health}, once at a time.

        @return: fires with what is wrong, or C{None} when it answers 200; C{None} instead of a
            Deferred when the child is not ready or a check is already under way.
        """
        if self.healthCheck is not None or self.state is not ChildState.READY:
            return None

        def done(result: object) -> object:
            self.healthCheck = None
            return result

        check: Deferred[str | None] = Deferred.fromCoroutine(self._judgeHealth())
        check.addBoth(done)
        if not check.called:
            self.healthCheck = check
        return check

    def checkHang(self) -> Deferred[HangVerdict] | None:
        """
        Ask a serving child's C{/health}, allowing it L{ChildSettings.hangTimeout}, once at a
        time.

        @return: fires with the verdict; C{None} instead of a Deferred when the child is not
            serving or a check is already under way.
        """
        if self.hangCheck is not None or not self.serving:
            return None

        def done(result: object) -> object:
            self.hangCheck = None
            return result

        check: Deferred[HangVerdict] = Deferred.fromCoroutine(self._judgeHang())
        check.addBoth(done)
        if not check.called:
            self.hangCheck = check
        return check

    async def _judgeHang(self) -> HangVerdict:
        _, silent, problem = await self._askHealth(self.baseURL + "/health", self.settings.hangTimeout)
        return HangVerdict(hung=silent, problem=problem)

    def stop(self, reason: StopReason, why: str) -> None:
        """
        SIGTERM now, SIGKILL after the grace period; C{ended} fires when the process has exited.
        """
        if self.state is ChildState.STOPPING:
            return
        self.stopReason = reason
        self.metrics.stops.labels(self.profile.id, reason.value).inc()
        if self.state is ChildState.STARTING and self.loadTimeoutCall is not None:
            if self.loadTimeoutCall.active():
                self.loadTimeoutCall.cancel()
        self.state = ChildState.STOPPING
        if self.readinessPoll is not None:
            self.readinessPoll.cancel()
        if self.healthCheck is not None:
            self.healthCheck.cancel()
        if self.hangCheck is not None:
            self.hangCheck.cancel()
        self.log.info("Stopping {model} (pid {pid}): {why}", model=self.profile.id, pid=self.pid, why=why)
        self._signal("TERM")
        self.killCall = self.clock.callLater(self.settings.stopGrace, self._kill)

    async def _awaitReady(self) -> None:
        url = self.baseURL + "/health"
        while True:
            # While it loads, no answer and an answer other than 200 both mean "not yet".
            answered, problem = await self._healthProblem(url)
            if self.state is not ChildState.STARTING:
                return
            if problem is None:
                if self.pid is not None and not self.ownsListener(self.port, self.pid):
                    self.readinessPoll = None
                    self._portTaken()
                else:
                    self._ready()
                return
            await deferLater(self.clock, self.settings.healthInterval)

    async def _judgeHealth(self) -> str | None:
        """
        What is wrong with a ready child, or C{None} when its C{/health} answers 200.  A child
        that does not answer at all is asked once more after a short while: it may be dying,
        and then its exit, not its health, is what to report.
        """
        url = self.baseURL + "/health"
        answered, problem = await self._healthProblem(url)
        # A stop cancels the check; the cancelled request reads as "no answer", and there is
        # nothing left to ask.
        if problem is not None and not answered and self.serving:
            await deferLater(self.clock, self.settings.healthInterval)
            answered, problem = await self._healthProblem(url)
        return problem

    async def _healthProblem(self, url: str) -> tuple[bool, str | None]:
        """
        Ask C{url} once, allowing L{ChildSettings.healthTimeout}.

        @return: whether an HTTP answer came, and what is wrong (C{None} for a 200).
        """
        answered, _, problem = await self._askHealth(url, self.settings.healthTimeout)
        return answered, problem

    async def _askHealth(self, url: str, timeout: float) -> tuple[bool, bool, str | None]:
        """
        Ask C{url} once, allowing C{timeout} for the whole answer.

        @return: whether an HTTP answer came, whether the child stayed silent (connected, but
            no whole answer within C{timeout}), and what is wrong (C{None} for a 200).
        """
        timedOut = False

        def giveUp() -> None:
            nonlocal timedOut
            timedOut = True
            asked.cancel()

        asked: Deferred[tuple[int, bytes]] = Deferred.fromCoroutine(self._getHealth(url))
        # Not addTimeout: the agent reports a cancelled request as one that got no answer, so
        # only this flag tells a silent child from one that refused the connection.
        timer = self.clock.callLater(timeout, giveUp)
        try:
            code, raw = await asked
        except (ConnectError, ConnectingCancelledError, DNSLookupError, ResponseFailed, ResponseNeverReceived,
                CancelledError, TimeoutError) as e:
            if timedOut:
                return False, True, f"GET /health did not answer within {timeout:g}s"
            if isinstance(e, (CancelledError, TimeoutError)):
                # A stop cancels the check, which ignores the answer.
                return False, False, "GET /health was cancelled"
            return False, False, f"GET /health failed: {e}"
        finally:
            if timer.active():
                timer.cancel()
        if code == 200:
            return True, False, None
        return True, False, f"GET /health answered {code}{_healthIssues(raw)}"

    async def _getHealth(self, url: str) -> tuple[int, bytes]:
        response = await self.agent.request(b"GET", url.encode("ascii"))
        return response.code, await readBody(response)

    def _ready(self) -> None:
        if self.loadTimeoutCall is not None and self.loadTimeoutCall.active():
            self.loadTimeoutCall.cancel()
        self.state = ChildState.READY
        self.readyAt = self.wallClock()
        self.metrics.loadSeconds.labels(self.profile.id).observe(self.readyAt - self.startedAt)
        self.log.info(
            "{model} is ready (pid {pid}) after {seconds:.2f}s",
            model=self.profile.id,
            pid=self.pid,
            seconds=self.readyAt - self.startedAt,
        )
        self.owner.childReady(self)

    def _portTaken(self) -> None:
        self.log.error(
            "Port {port} of {model} (pid {pid}) is held by another process: not trusting it",
            model=self.profile.id, pid=self.pid, port=self.port,
        )
        self.owner.childFailed(
            self,
            self.withLastLines(
                f"port {self.port} is held by a process that is not TabbyAPI for {self.profile.id} "
                f"(pid {self.pid}) or its child, which bound it first: the proxy sends it no request and "
                "no key; try again (the next start picks another port)"
            ),
        )
        self.metrics.failedStarts.labels(self.profile.id).inc()
        self.stop(StopReason.PORT_TAKEN, "its port is held by another process")

    def _lineSeen(self, line: str) -> None:
        """
        Readiness is never read from the console, but the port lines matter: TabbyAPI that finds
        its port busy says so and serves on the next port, which the proxy did not pick and whose
        listener nobody checked, or, when that one is busy too, says so and exits with status 0.
        Either way the child is stopped and its owner starts another on a port it picks.
        """
        if self.state is not ChildState.STARTING:
            return
        if "Loading model:" in line and not self.loadingSeen:
            # The load timeout times the model's load: counted again from here, so that an
            # interpreter slow to start on a busy machine does not eat into it (the start
            # before this line is bounded by the same limit).
            self.loadingSeen = True
            if self.loadTimeoutCall is not None and self.loadTimeoutCall.active():
                self.loadTimeoutCall.reset(self.settings.loadTimeout)
            return
        if "Switching to" in line:
            switch = _PORT_SWITCH.search(line)
            if switch is not None and int(switch.group(1)) == self.port:
                self._portBusy(f"TabbyAPI moved to port {switch.group(2)}, which the proxy did not pick",
                               f"it moved to port {switch.group(2)}")
        elif "are in use" in line:
            taken = _PORTS_TAKEN.search(line)
            if taken is not None and int(taken.group(1)) == self.port:
                self._portBusy(f"so was port {taken.group(2)}, and TabbyAPI gave up", f"so was port {taken.group(2)}")

    def _portBusy(self, outcome: str, why: str) -> None:
        """
        Stop a child whose port was busy at its start: whether TabbyAPI moved to a port nobody
        checked or gave up, the owner starts the model again on a port it picks.
        """
        self.log.warn(
            "Port {port} of {model} (pid {pid}) was busy and {outcome}: stopping it",
            model=self.profile.id, pid=self.pid, port=self.port, outcome=outcome,
        )
        # The owner first: a fake child that obeys SIGTERM at once exits inside stop().
        self.owner.childMoved(
            self,
            f"port {self.port} of TabbyAPI for {self.profile.id} was busy (another process listens on it), "
            f"and {outcome}",
        )
        self.stop(StopReason.PORT_MOVED, f"its port {self.port} was busy and {why}")

    def _loadTimedOut(self) -> None:
        if self.state is not ChildState.STARTING:
            return
        self.log.error(
            "{model} did not become ready within {timeout} (--load-timeout)",
            model=self.profile.id,
            timeout=describeDuration(self.settings.loadTimeout),
        )
        self.owner.childFailed(
            self,
            self.withLastLines(
                f"{self.profile.id} did not become ready within "
                f"{describeDuration(self.settings.loadTimeout)} (--load-timeout)"
            ),
        )
        self.metrics.failedStarts.labels(self.profile.id).inc()
        self.stop(StopReason.LOAD_TIMEOUT, "load timeout")

    def withLastLines(self, message: str) -> str:
        lines = self.lastLines()
        return f"{message}{LAST_OUTPUT}{lines}" if lines else message

    def _kill(self) -> None:
        self.log.warn(
            "{model} (pid {pid}) did not exit within {grace}s of SIGTERM; sending SIGKILL",
            model=self.profile.id,
            pid=self.pid,
            grace=self.settings.stopGrace,
        )
        self._signal("KILL")

    def _signal(self, signal: str) -> None:
        if self.transport is None:
            return
        self.signalsSent.add(signal)
        try:
            self.transport.signalProcess(signal)
        except ProcessExitedAlready:
            pass
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise

    def _exited(self, reason: Failure) -> None:
        if self.killCall is not None and self.killCall.active():
            self.killCall.cancel()
        if self.loadTimeoutCall is not None and self.loadTimeoutCall.active():
            self.loadTimeoutCall.cancel()
        stateAtExit = self.state
        self.state = ChildState.STOPPING
        if self.readinessPoll is not None:
            self.readinessPoll.cancel()
        if self.healthCheck is not None:
            self.healthCheck.cancel()
        if self.hangCheck is not None:
            self.hangCheck.cancel()
        self.configPath.unlink(missing_ok=True)
        how = describeExit(reason)
        if stateAtExit is ChildState.STARTING:
            self.metrics.failedStarts.labels(self.profile.id).inc()
            self.log.error(
                "TabbyAPI for {model} (pid {pid}) {how} while loading the model",
                model=self.profile.id, pid=self.pid, how=how, **_exitFields(reason),
            )
            self.owner.childFailed(
                self, self.withLastLines(f"TabbyAPI for {self.profile.id} {how} while loading the model")
            )
        elif stateAtExit in (ChildState.READY, ChildState.DRAINING) or _killedByOthers(reason, self.signalsSent):
            # A stop can race a crash (a health check fails because the child is dying): the
            # crash is what the status should tell.
            self.metrics.crashes.labels(self.profile.id).inc()
            self.log.error(
                "TabbyAPI for {model} (pid {pid}) {how} unexpectedly",
                model=self.profile.id, pid=self.pid, how=how, **_exitFields(reason),
            )
            self.owner.childCrashed(self, f"TabbyAPI for {self.profile.id} (pid {self.pid}) {how} unexpectedly")
        else:
            self.log.info("{model} stopped: {how}", model=self.profile.id, how=how, **_exitFields(reason))
        self.owner.childExited(self)
        self.ended.callback(None)


def _killedByOthers(reason: Failure, signalsSent: set[str]) -> bool:
    """
    Whether a process ended by a signal the proxy did not send it.
    """
    value = reason.value
    if not isinstance(value, ProcessTerminated) or value.signal is None:
        return False
    ours = {_SIGNAL_NUMBERS[name] for name in signalsSent if name in _SIGNAL_NUMBERS}
    return value.signal not in ours


_SIGNAL_NUMBERS = {"TERM": int(SIGTERM), "KILL": int(SIGKILL), "INT": int(SIGINT)}


def _healthIssues(raw: bytes) -> str:
    """
    The issues TabbyAPI lists in an unhealthy C{/health} answer, as C{": a; b"}, or C{""}.
    """
    try:
        document = json.loads(raw)
    except ValueError:
        return ""
    issues = document.get("issues") if isinstance(document, dict) else None
    if not isinstance(issues, list):
        return ""
    described = [str(issue.get("description", issue)) if isinstance(issue, dict) else str(issue) for issue in issues]
    return ": " + "; ".join(described) if described else ""


# Run by the interpreter that spawns the child: ask Linux to SIGKILL this process when its parent
# (the proxy) dies, check the parent did not die before that took effect, then become the child.
_PARENT_DEATH_PACT = (
    "import ctypes, os, signal, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:\n"  # PR_SET_PDEATHSIG
    "    raise OSError(ctypes.get_errno(), 'prctl(PR_SET_PDEATHSIG) failed')\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('tabbyproxy exited before TabbyAPI started')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def diesWithParent(command: Sequence[str]) -> Sequence[str]:
    """
    On Linux, C{command} run through a small wrapper that makes it die (SIGKILL) when the process
    that spawned it dies, even by SIGKILL; elsewhere C{command} unchanged.

    The wrapper costs one short interpreter start (tens of milliseconds) per model start; the pid
    the proxy sees is the real child's, as the wrapper replaces itself with it.
    """
    if not sys.platform.startswith("linux"):
        return tuple(command)
    return (sys.executable, "-I", "-S", "-c", _PARENT_DEATH_PACT, str(os.getpid()), *command)


def _childEnvironment() -> Mapping[str, str]:
    environment = dict(os.environ)
    # A piped Rich console wraps at 80 columns; a wide console keeps each log line whole.
    environment.setdefault("TABBY_LOG_CONSOLE_WIDTH", "1000")
    environment.setdefault("PYTHONUNBUFFERED", "1")
    return environment
