"""Listening sockets that systemd created and passed (socket activation).

A TCP socket is adopted with Twisted's own endpoint. A unix socket needs one
of its own: Twisted's unix port treats an adopted socket as if it had bound it
itself, so it chmods the path to 0666 when it starts, unlinks the path and
shuts the socket down when it stops. Under systemd that breaks everything the
``.socket`` unit promises: the unit's ``SocketUser=``/``SocketMode=`` are
overridden (or, for the unprivileged daemon, which cannot even reach the path
in Postfix's ``private/`` directory, start-up fails), and after one restart the
socket systemd keeps listening on refuses every connection. The port here
leaves the path, its owner and mode, and the shared socket as systemd made
them, and only closes its own copy.
"""

from __future__ import annotations

import fcntl
import os
import socket
from typing import Any

from twisted.internet import defer, error, tcp, unix
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from postfix_mtasts.limits import INHERITED_SOCKET_FIRST_ACCEPTS


class InheritedUnixPort(unix.Port):
    """A unix listener on a socket another process (systemd) bound and listens on."""

    # Closing our copy must not shut down the listening socket systemd shares.
    _shouldShutdown = False

    def startListening(self) -> None:
        """Serve the adopted socket as it is: no bind, no chmod, no new backlog."""
        skt = self._preexistingSocket
        if skt is None:
            raise error.CannotListenError(  # type: ignore[no-untyped-call]
                None, self._bindPath, "no inherited socket to listen on"
            )
        self._preexistingSocket = None
        # Twisted keeps one descriptor in reserve to shed connections at EMFILE.
        reserved: Any = tcp._reservedFD
        reserved.reserve()
        factory: Any = self.factory
        factory.doStart()
        self.connected = True
        self.socket = skt
        self.fileno = skt.fileno  # type: ignore[method-assign]
        self.numberAccepts = INHERITED_SOCKET_FIRST_ACCEPTS
        self.startReading()  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure) -> None:
        """Close our copy; the socket file stays for systemd and the next start."""
        tcp.Port.connectionLost(self, reason)  # type: ignore[no-untyped-call]


@implementer(IStreamServerEndpoint)
class InheritedUnixEndpoint:
    """Listens once on an inherited unix socket descriptor, then closes that descriptor."""

    def __init__(self, reactor: Any, fd: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self._used = False

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        if self._used:
            return defer.fail(error.AlreadyListened())
        self._used = True
        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            # fromListeningDescriptor duplicates the descriptor (close-on-exec).
            adopt: Any = InheritedUnixPort._fromListeningDescriptor
            port: InheritedUnixPort = adopt(self.reactor, self.fd, factory)
            port.startListening()
            os.close(self.fd)
        except BaseException:
            return defer.fail()
        return defer.succeed(port)


def adopted_stream_endpoint(reactor: Any, fd: int, family: int) -> IStreamServerEndpoint:
    """The endpoint that serves a listening stream socket passed as ``fd``."""
    if family == socket.AF_UNIX:
        return InheritedUnixEndpoint(reactor, fd)
    endpoint: IStreamServerEndpoint = AdoptedStreamServerEndpoint(reactor, fd, family)  # type: ignore[no-untyped-call]
    return endpoint
