"""Sockets systemd passes, served in this process's reactor: a unix socket is
served as the ``.socket`` unit made it (its path, owner and mode untouched),
and stopping leaves systemd's listening socket accepting for the next start;
a TCP socket goes to Twisted's own adopted endpoint."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, UNIXClientEndpoint
from twisted.internet.error import AlreadyListened
from twisted.internet.protocol import Factory, Protocol

from postfix_mtasts.activation import InheritedUnixEndpoint, adopted_stream_endpoint
from tests.support.daemon import ensure_deferred

pytestmark = pytest.mark.integration

#: The mode a .socket unit gives the socket (SocketMode=), unlike Twisted's 0666.
UNIT_MODE = 0o660
BACKLOG = 8
CLIENT_TIMEOUT = 10.0


def reactor() -> Any:
    from twisted.internet import reactor as installed

    return installed


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        transport.write(data)


class Collect(Protocol):
    """Sends a greeting on connect and fires ``echoed`` with what comes back."""

    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.echoed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(b"hello")

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        transport.loseConnection()
        self.echoed.callback(data)


@pytest.fixture
def systemd_socket() -> Iterator[tuple[socket.socket, str]]:
    """A listening unix socket made the way systemd makes one for a .socket
    unit: bound, chmod SocketMode=, listening; the test holds it as systemd does."""
    # A unix socket path must stay under 108 bytes; pytest's tmp_path may not.
    directory = tempfile.mkdtemp(prefix="mtasts-act-")
    path = f"{directory}/socketmap"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, UNIT_MODE)
    listener.listen(BACKLOG)
    try:
        yield listener, path
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


async def echo_through(path: str) -> bytes:
    collect = Collect()
    endpoint = UNIXClientEndpoint(reactor(), path, timeout=CLIENT_TIMEOUT)  # type: ignore[no-untyped-call]
    await endpoint.connect(Factory.forProtocol(lambda: collect))
    collect.echoed.addTimeout(CLIENT_TIMEOUT, reactor())
    return await collect.echoed


@ensure_deferred
async def test_a_passed_unix_socket_is_served_with_the_units_mode(
    systemd_socket: tuple[socket.socket, str],
) -> None:
    listener, path = systemd_socket
    endpoint = adopted_stream_endpoint(reactor(), os.dup(listener.fileno()), socket.AF_UNIX)
    port = await endpoint.listen(Factory.forProtocol(Echo))
    try:
        assert await echo_through(path) == b"hello"
        assert stat.S_IMODE(os.stat(path).st_mode) == UNIT_MODE
    finally:
        await port.stopListening()


@ensure_deferred
async def test_stopping_leaves_the_socket_file_and_systemds_socket_accepting(
    systemd_socket: tuple[socket.socket, str],
) -> None:
    listener, path = systemd_socket
    endpoint = adopted_stream_endpoint(reactor(), os.dup(listener.fileno()), socket.AF_UNIX)
    port = await endpoint.listen(Factory.forProtocol(Echo))
    await port.stopListening()

    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == UNIT_MODE
    # What systemd sees once the daemon is gone: a client connects and the
    # socket it kept still accepts, so the next start finds it queued.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)
        accepted, _ = listener.accept()
        accepted.close()


@ensure_deferred
async def test_a_restart_serves_the_same_socket_again(
    systemd_socket: tuple[socket.socket, str],
) -> None:
    listener, path = systemd_socket
    for _ in range(2):
        endpoint = adopted_stream_endpoint(reactor(), os.dup(listener.fileno()), socket.AF_UNIX)
        port = await endpoint.listen(Factory.forProtocol(Echo))
        try:
            assert await echo_through(path) == b"hello"
        finally:
            await port.stopListening()


@ensure_deferred
async def test_an_endpoint_listens_once(systemd_socket: tuple[socket.socket, str]) -> None:
    listener, _ = systemd_socket
    endpoint = adopted_stream_endpoint(reactor(), os.dup(listener.fileno()), socket.AF_UNIX)
    port = await endpoint.listen(Factory.forProtocol(Echo))
    try:
        with pytest.raises(AlreadyListened):
            await endpoint.listen(Factory.forProtocol(Echo))
    finally:
        await port.stopListening()


def test_tcp_sockets_go_to_twisteds_adopted_endpoint(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        endpoint = adopted_stream_endpoint(reactor(), listener.fileno(), socket.AF_INET)
        assert isinstance(endpoint, AdoptedStreamServerEndpoint)
    unix_endpoint = adopted_stream_endpoint(reactor(), -1, socket.AF_UNIX)
    assert isinstance(unix_endpoint, InheritedUnixEndpoint)
