"""
The operating system's limits that decide how many clients the proxy can hold: open files (each
connection is one), the listen backlog (connections the kernel queues until the proxy accepts
them), and the proxy's own cap on open connections, which answers clearly before the first two
run out and the kernel starts resetting connections in no log.
"""

from __future__ import annotations

import re
import resource
from pathlib import Path
from typing import Callable

from attrs import define, frozen

SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
FALLBACK_BACKLOG = 1024

DEFAULT_MAX_CONNECTIONS = 4096
# Files the proxy needs besides its clients' connections: the children's pipes, the connections
# to them, the log, the profiles read on SIGHUP.
RESERVED_FILES = 256

# Endpoint types whose listen() takes a backlog= argument.
_BACKLOG_ENDPOINTS = ("tcp", "tcp6", "unix", "ssl")
_HAS_BACKLOG = re.compile(r"(?:^|:)backlog=")


@frozen
class FileLimit:
    """
    The open-file limit (C{RLIMIT_NOFILE}) before and after L{raiseFileLimit}.
    """

    before: int
    soft: int
    hard: int


def raiseFileLimit(
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> FileLimit:
    """
    Raise the soft open-file limit to the hard one: systemd and most shells start services with
    a soft limit of 1024, which about a thousand idle clients use up.  An unlimited hard limit,
    or one the system refuses (macOS caps it below), leaves the soft limit as it was.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return FileLimit(before=soft, soft=soft, hard=hard)
    try:
        setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return FileLimit(before=soft, soft=soft, hard=hard)
    return FileLimit(before=soft, soft=hard, hard=hard)


def connectionRoom(limit: FileLimit) -> int | None:
    """
    How many client connections the open-file limit leaves room for, or C{None} if unlimited.
    """
    if limit.soft == resource.RLIM_INFINITY:
        return None
    return max(limit.soft - RESERVED_FILES, 1)


def systemBacklog(somaxconn: Path = SOMAXCONN) -> int:
    """
    The largest listen backlog the system allows (Linux's C{net.core.somaxconn}), or
    L{FALLBACK_BACKLOG} where it cannot be read.
    """
    try:
        value = int(somaxconn.read_text().strip())
    except (OSError, ValueError):
        return FALLBACK_BACKLOG
    return value if value > 0 else FALLBACK_BACKLOG


def withBacklog(description: str, backlog: int) -> str:
    """
    The endpoint string C{description} listening with C{backlog}, unless it gives its own
    C{backlog=} or is of a type that takes none.
    """
    kind = description.split(":", 1)[0]
    if kind not in _BACKLOG_ENDPOINTS or _HAS_BACKLOG.search(description):
        return description
    return f"{description}:backlog={backlog}"


@define
class ConnectionLimit:
    """
    The client connections open now, and how many may be: the proxy answers those over the
    limit with a 503 and closes them, rather than running out of files.
    """

    limit: int
    current: int = 0

    def opened(self) -> bool:
        """
        Count a new connection.

        @return: whether it is within the limit.
        """
        self.current += 1
        return self.current <= self.limit

    def closed(self) -> None:
        """
        Count a connection gone.
        """
        self.current -= 1
