"""
Whose socket listens on a port (L{tabbyproxy.listener}), on fake /proc trees and on this
process's own listening socket.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tabbyproxy.listener import listenerOwnedBy, listeningInodes, processTree

_HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def _socketLine(address: str, port: int, state: str, inode: int) -> str:
    return f"   0: {address}:{port:04X} 00000000:0000 {state} 00000000:00000000 00:00000000 00000000  1000  0 {inode} 1 0 100 0 0 10 0\n"


class FakeProc:
    """
    A /proc with the socket tables and the processes a test gives it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "net").mkdir(parents=True)
        self.tcp = [_HEADER]
        self.tcp6 = [_HEADER]
        self.write()

    def write(self) -> None:
        (self.root / "net" / "tcp").write_text("".join(self.tcp))
        (self.root / "net" / "tcp6").write_text("".join(self.tcp6))

    def listen(self, port: int, inode: int, ipv6: bool = False) -> None:
        table = self.tcp6 if ipv6 else self.tcp
        table.append(_socketLine("00000000000000000000000001000000" if ipv6 else "0100007F", port, "0A", inode))
        self.write()

    def connection(self, port: int, inode: int) -> None:
        self.tcp.append(_socketLine("0100007F", port, "01", inode))
        self.write()

    def process(self, pid: int, parent: int, sockets: tuple[int, ...] = (), name: str = "python") -> None:
        directory = self.root / str(pid)
        (directory / "fd").mkdir(parents=True)
        (directory / "stat").write_text(f"{pid} ({name}) S {parent} {pid} {pid} 0 -1 4194304\n")
        os.symlink("/dev/null", directory / "fd" / "0")
        for number, inode in enumerate(sockets, start=3):
            os.symlink(f"socket:[{inode}]", directory / "fd" / str(number))


class ListenerOwnerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proc = FakeProc(Path(self.mktemp()))
        # The proxy (100), its child (200) and the child's own child (300); a stranger (400).
        self.proc.process(100, 1)
        self.proc.process(200, 100, name="python main.py (x) y")
        self.proc.process(300, 200, sockets=(5555,))
        self.proc.process(400, 1, sockets=(6666,))

    def test_listenerOfTheChildTreeIsTrusted(self) -> None:
        """
        A port whose listening socket a descendant of the child holds belongs to the child.
        """
        self.proc.listen(8000, 5555)
        self.assertEqual(processTree(200, self.proc.root), {200, 300})
        self.assertTrue(listenerOwnedBy(8000, 200, self.proc.root))

    def test_squatterIsNotTrusted(self) -> None:
        """
        A port that another process listens on does not belong to the child, nor does one with
        a squatter beside the child's own socket (on IPv6), nor one that nobody listens on.
        """
        self.proc.listen(8000, 6666)
        self.assertFalse(listenerOwnedBy(8000, 200, self.proc.root))
        self.proc.listen(8001, 5555)
        self.proc.listen(8001, 6666, ipv6=True)
        self.assertEqual(listeningInodes(8001, self.proc.root), {5555, 6666})
        self.assertFalse(listenerOwnedBy(8001, 200, self.proc.root))
        self.assertFalse(listenerOwnedBy(8002, 200, self.proc.root))

    def test_connectionsAreNotListeners(self) -> None:
        """
        Only listening sockets count: a connection to or from the port is not its listener.
        """
        self.proc.connection(8000, 6666)
        self.proc.listen(8000, 5555)
        self.assertEqual(listeningInodes(8000, self.proc.root), {5555})
        self.assertTrue(listenerOwnedBy(8000, 200, self.proc.root))

    def test_withoutProcNothingCanBeTold(self) -> None:
        """
        Where there is no /proc/net/tcp (not Linux), every listener is taken as the child's.
        """
        self.assertTrue(listenerOwnedBy(8000, 200, Path(self.mktemp())))


class RealProcTests(SynchronousTestCase):
    def test_ownListeningSocket(self) -> None:
        """
        On Linux, a socket this process listens on belongs to it; once closed, the port has no
        listener at all.
        """
        if not sys.platform.startswith("linux"):
            raise SkipTest("/proc/net/tcp is Linux's")
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        self.assertTrue(listenerOwnedBy(port, os.getpid()))
        listening.close()
        self.assertFalse(listenerOwnedBy(port, os.getpid()))
