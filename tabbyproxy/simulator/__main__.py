"""
The simulator's command line (``python -m tabbyproxy.simulator``): TabbyAPI's flags read,
its config merged, the server run on the reactor until a signal stops it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Sequence


from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from tabbyproxy.simulator.config import SimulatorConfig, loadMergedConfig
from tabbyproxy.simulator.console import Console
from tabbyproxy.simulator.server import Simulator


def parseArgs(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tabbyproxy.simulator",
        description="A GPU-free TabbyAPI simulator for tests.",
    )
    parser.add_argument("--config", default=None)
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", default=None)
    parser.add_argument("--disable-auth", dest="disable_auth", default=None)
    # Other TabbyAPI flags are accepted and ignored, so any TabbyAPI command line works here.
    parsed, _ = parser.parse_known_args(list(argv))
    return parsed


def main(argv: Sequence[str] | None = None) -> int:
    from twisted.internet import reactor as _reactor

    # The default reactor provides time, TCP and threads (callFromThread), all used here.
    reactor: Any = _reactor
    # Twisted's own errors go to stderr (warnings and up), never into the TabbyAPI console.
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr),
                              [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False,
    )
    console = Console()
    args = parseArgs(sys.argv[1:] if argv is None else argv)
    cwd = Path.cwd()
    if args.config is not None:
        console.info("Config file override detected in args.")
    config = SimulatorConfig.fromMerged(
        loadMergedConfig(cwd, args, dict(os.environ)), cwd)
    sim = Simulator(reactor=reactor, config=config, cwd=cwd, console=console)

    def handler(signum: int, frame: FrameType | None) -> None:
        # Signal handlers may not touch the reactor directly; callFromThread wakes it safely.
        reactor.callFromThread(sim.onSignal, signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    reactor.callWhenRunning(sim.begin)
    reactor.run(installSignalHandlers=False)
    if sim.loadError is not None:
        raise sim.loadError
    return sim.exitCode


if __name__ == "__main__":
    sys.exit(main())
