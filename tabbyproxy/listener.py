"""
Whose socket listens on a TCP port, read from Linux's /proc: the kernel's socket tables
(C{/proc/net/tcp}, C{/proc/net/tcp6}) give the inode of each socket listening on the port, and
each process's C{/proc/PID/fd} links name the sockets it holds (C{socket:[INODE]}).

The proxy picks a free port for TabbyAPI and waits for it to listen there, which takes as long
as the model's load; meanwhile any local user may bind that port and answer C{/health}.  A
listener is trusted only when every socket listening on the port belongs to the child or one of
its descendants, so a squatter never gets a request, a prompt or a key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

PROC = Path("/proc")

# The state column of a listening socket in /proc/net/tcp.
_LISTEN = "0A"


def listenerOwnedBy(port: int, pid: int, proc: Path = PROC) -> bool:
    """
    Whether some socket listens on C{port} and every one that does belongs to process C{pid}
    or one of its descendants.

    Where the system has no C{/proc/net/tcp} (not Linux) there is no way to tell, and the
    answer is C{True}.
    """
    if not (proc / "net" / "tcp").exists():
        return True
    listening = listeningInodes(port, proc)
    if not listening:
        return False
    held: set[int] = set()
    for member in processTree(pid, proc):
        held |= socketInodes(member, proc)
    return listening <= held


def listeningInodes(port: int, proc: Path = PROC) -> set[int]:
    """
    The inodes of the IPv4 and IPv6 sockets listening on C{port}.
    """
    inodes: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def processStat(pid: int, proc: Path = PROC) -> list[str] | None:
    """
    The fields of C{/proc/PID/stat} after the command name (the state first, then the parent's
    pid, ...), or C{None} when the process is gone.
    """
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name, in parentheses, may hold spaces and parentheses: fields follow the last ")".
    return stat.rsplit(")", 1)[1].split()


def processStats(proc: Path = PROC) -> Iterator[tuple[int, list[str]]]:
    """
    Every process now alive (zombies included) with its L{processStat} fields.
    """
    for entry in proc.iterdir():
        if entry.name.isdigit():
            fields = processStat(int(entry.name), proc)
            if fields is not None:
                yield int(entry.name), fields


def processTree(pid: int, proc: Path = PROC) -> set[int]:
    """
    C{pid} and all its descendants now alive, from each process's parent in C{/proc/PID/stat}.
    """
    children: dict[int, list[int]] = {}
    for process, fields in processStats(proc):
        children.setdefault(int(fields[1]), []).append(process)
    tree = {pid}
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), ()):
            if child not in tree:
                tree.add(child)
                pending.append(child)
    return tree


def socketInodes(pid: int, proc: Path = PROC) -> set[int]:
    """
    The inodes of the sockets process C{pid} holds open (none where it is gone or not ours to
    read).
    """
    inodes: set[int] = set()
    try:
        descriptors = list((proc / str(pid) / "fd").iterdir())
    except OSError:
        return inodes
    for descriptor in descriptors:
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue
        if target.startswith("socket:[") and target.endswith("]"):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes
