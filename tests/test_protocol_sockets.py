# pytest_twisted has no type information: its decorators are untyped.
# mypy: disable-error-code="untyped-decorator"
"""The socketmap protocol on real loopback sockets, where replies are sent at
once when nothing is buffered (protocol._write) and through Twisted's buffer
otherwise: every reply arrives whole and in request order. A client that
pipelines requests without reading is not read from while its replies fill
the buffer, so they cannot pile up in the daemon (issue 20), and such a
connection still closes when the daemon closes it."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from postfix_mtasts.codec import socketmap
from postfix_mtasts.policy.model import Answer
from postfix_mtasts.protocol import SocketmapFactory, SocketmapProtocol
from tests.test_protocol import ScriptedResponder

reactor: Any = global_reactor

BIG = Answer.ok("x" * 90_000)  # far more than the shrunken socket buffers hold
SMALL = Answer.ok("secure match=mx.example.com")


class _Server:
    def __init__(self, responder: ScriptedResponder) -> None:
        self.protocols: list[SocketmapProtocol] = []
        outer = self

        class Factory(SocketmapFactory):
            def buildProtocol(self, addr: Any) -> SocketmapProtocol:
                protocol = super().buildProtocol(addr)
                outer.protocols.append(protocol)
                return protocol

        self.port = reactor.listenTCP(0, Factory(responder, clock=reactor), interface="127.0.0.1")

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port.getHost().port)

    async def close(self, client: socket.socket) -> None:
        """Close the client, wait until the server saw it, stop listening."""
        client.close()
        while not all(p._closed for p in self.protocols):
            await deferLater(0.01)
        self.protocols.clear()
        await self.port.stopListening()


@pytest_twisted.async_yield_fixture()
async def slow() -> AsyncIterator[Deferred[Answer]]:
    d: Deferred[Answer] = Deferred()
    yield d
    if not d.called:
        d.callback(SMALL)


def _read_replies(client: socket.socket, count: int) -> list[tuple[str, str]]:
    decoder = socketmap.SocketmapReplyDecoder()
    replies: list[tuple[str, str]] = []
    while len(replies) < count:
        data = client.recv(65536)
        if not data:
            break
        replies.extend(decoder.feed(data))
    return replies


@pytest_twisted.ensureDeferred
async def test_pipelined_replies_keep_their_order_around_a_slow_lookup(slow: Deferred[Answer]) -> None:
    server = _Server(ScriptedResponder({b"slow.example": slow, b"fast.example": SMALL}))
    client = socket.create_connection(server.address, timeout=10)
    try:
        client.sendall(socketmap.encode_request("postfix", b"fast.example")
                       + socketmap.encode_request("postfix", b"slow.example")
                       + socketmap.encode_request("postfix", b"fast.example"))
        reading = deferToThread(_read_replies, client, 3)
        reactor.callLater(0.2, slow.callback, Answer.ok("slow"))
        replies = await reading
        assert replies == [("OK", SMALL.data), ("OK", "slow"), ("OK", SMALL.data)]
        assert server.protocols[0]._socket is not None, "replies on TCP should go out at once"
    finally:
        await server.close(client)


@pytest_twisted.ensureDeferred
async def test_a_reply_larger_than_the_socket_buffer_arrives_whole_before_the_next() -> None:
    server = _Server(ScriptedResponder({b"big.example": BIG, b"fast.example": SMALL}))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    client.connect(server.address)
    try:
        while not server.protocols or server.protocols[0].transport is None:
            await deferLater(0.01)
        transport: Any = server.protocols[0].transport
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.sendall(socketmap.encode_request("postfix", b"big.example"))
        # The client reads nothing yet: the big reply cannot all go out at once.
        while not transport.dataBuffer and not transport._tempDataBuffer:
            await deferLater(0.01)
        client.sendall(socketmap.encode_request("postfix", b"fast.example"))
        await deferLater(0.1)
        replies = await deferToThread(_read_replies, client, 2)
        assert replies == [("OK", BIG.data), ("OK", SMALL.data)]
    finally:
        await server.close(client)


#: Requests a client pipelines without reading: their replies are far more
#: than the kernel's loopback buffers (shrunk below) and Twisted's hold.
PIPELINED = 60_000
#: Bounded polls (0.01 s each) for the server to pause or to close.
POLLS = 1000


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_is_not_read_from_while_its_replies_pile_up() -> None:
    server = _Server(ScriptedResponder({b"fast.example": SMALL}))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(30)
    client.connect(server.address)
    request = socketmap.encode_request("postfix", b"fast.example")
    reply = socketmap.encode_reply("OK", SMALL.data)
    try:
        while not server.protocols or server.protocols[0].transport is None:
            await deferLater(0.01)
        protocol = server.protocols[0]
        transport: Any = protocol.transport
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sending = deferToThread(client.sendall, request * PIPELINED)
        # One read of requests past the buffer size: what may be queued before the pause.
        bound = transport.bufferSize + (transport.bufferSize // len(request) + 1) * len(reply)
        most = 0
        for _ in range(100):
            await deferLater(0.01)
            most = max(most, len(transport.dataBuffer) - transport.offset + transport._tempDataLen)
        assert most <= bound, (most, bound)
        assert protocol._paused_for_replies, "the server should have stopped reading"
        replies = await deferToThread(_read_replies, client, PIPELINED)
        await sending
        assert replies == [("OK", SMALL.data)] * PIPELINED
        assert not protocol._paused_for_replies
    finally:
        await server.close(client)


def _read_until_closed(client: socket.socket) -> list[tuple[str, str]]:
    """Every whole reply until the server closes (a close with requests
    still unread reaches the client as a reset)."""
    decoder = socketmap.SocketmapReplyDecoder()
    replies: list[tuple[str, str]] = []
    try:
        while data := client.recv(65536):
            replies.extend(decoder.feed(data))
    except ConnectionResetError:
        pass
    return replies


@pytest_twisted.ensureDeferred
async def test_a_connection_closed_while_not_read_from_still_closes() -> None:
    """Twisted closes a connection only once its producer is gone: one paused
    for piling replies must still close (idle timeout, framing error, shutdown)."""
    server = _Server(ScriptedResponder({b"fast.example": SMALL}))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(server.address)
    client.setblocking(False)
    requests = socketmap.encode_request("postfix", b"fast.example") * PIPELINED
    try:
        while not server.protocols or server.protocols[0].transport is None:
            await deferLater(0.01)
        protocol = server.protocols[0]
        transport: Any = protocol.transport
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        for _ in range(POLLS):
            if protocol._paused_for_replies:
                break
            try:
                requests = requests[client.send(requests) :]
            except BlockingIOError:
                pass
            await deferLater(0.01)
        assert protocol._paused_for_replies
        protocol._close()
        client.setblocking(True)
        client.settimeout(30)
        replies = await deferToThread(_read_until_closed, client)
        assert replies == [("OK", SMALL.data)] * len(replies)
        for _ in range(POLLS):
            if not transport.connected:
                break
            await deferLater(0.01)
        assert not transport.connected
    finally:
        await server.close(client)


async def deferLater(seconds: float) -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d
