#!/usr/bin/env python3
"""
The least a relay on the proxy's stack can cost: Twisted's own TCP port forwarder
(C{twisted.protocols.portforward}) on the proxy's reactor and interpreter, with C{TCP_NODELAY} on
both of its connections as nginx and the proxy have it.  It copies each client connection's bytes
to a new connection upstream and back, with no HTTP parsing, no chunk decoding and no log line,
so whatever the proxy costs above it is the proxy's own code.  bench/run.py runs one in front of
each direct simulator (the C{twisted} contender).

    python bench/floor.py LISTEN_PORT UPSTREAM_PORT     # both on 127.0.0.1

Without C{TCP_NODELAY}, Nagle's algorithm holds an answer's last small write until the client's
delayed acknowledgement, about 40 ms per answer on one connection.
"""

from __future__ import annotations

import sys
from typing import Any, cast

from twisted.internet.interfaces import ITCPTransport
from twisted.protocols.portforward import ProxyClient, ProxyClientFactory, ProxyFactory, ProxyServer


class _Client(ProxyClient):
    def connectionMade(self) -> None:
        cast(ITCPTransport, self.transport).setTcpNoDelay(True)
        super().connectionMade()


class _ClientFactory(ProxyClientFactory):
    protocol = _Client


class _Server(ProxyServer):
    clientProtocolFactory = _ClientFactory

    def connectionMade(self) -> None:
        cast(ITCPTransport, self.transport).setTcpNoDelay(True)
        super().connectionMade()


class _Factory(ProxyFactory):
    protocol = _Server


def main(argv: list[str]) -> None:
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    listen, upstream = (int(port) for port in argv)
    reactor.listenTCP(listen, _Factory("127.0.0.1", upstream), interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
