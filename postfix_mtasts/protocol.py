"""Thin Twisted protocols: bytes from Postfix → codec → responder → codec → bytes.

Both protocols answer each connection's requests in the order they arrived,
pipelined ones too, even when a later request is answered from the cache
before an earlier one has finished resolving. A framing error closes that one
connection and nothing else. A client that sends without reading its replies
is not read from while more than the transport's buffer size of them waits to
be sent, so its replies cannot pile up in memory or its requests crowd out
other connections.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar, cast
from typing import Protocol as TypingProtocol

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from postfix_mtasts import limits
from postfix_mtasts.codec import FramingError, MalformedRequest, ReplyTooLong, socketmap, tcptable
from postfix_mtasts.errors import log_failure
from postfix_mtasts.policy.model import Answer, AnswerKind
from postfix_mtasts.policy.tlsrpt import essential_answer
from postfix_mtasts.responder import DEFAULT_PROFILE, Responder

log = logging.getLogger("postfix_mtasts.protocol")

#: Requests one connection may have waiting for an answer; Postfix sends one
#: at a time, so more than this is a misbehaving client, and it is closed.
MAX_PENDING_PER_CONNECTION = 1000

#: Encoded replies remembered per protocol class, keyed by the Answer object:
#: a warm hit returns the same Answer each time, so its bytes are made once.
#: Cleared when full; the hot answers come back at once.
REPLY_CACHE_ENTRIES = 4096

TCP_TABLE_CODES = {
    AnswerKind.OK: 200,
    AnswerKind.NOTFOUND: 500,
    AnswerKind.TEMP: 400,
    AnswerKind.PERM: 400,
}


def _writes_eagerly(transport: object) -> bool:
    """True for Twisted's own TCP and UNIX stream transports, whose buffer
    state ``_write`` reads; anything else (test transports, wrappers) always
    goes through ``write``."""
    return (isinstance(transport, tcp.Connection) and hasattr(transport, "_tempDataBuffer")
            and hasattr(transport, "dataBuffer"))


def describe_peer(address: IAddress | None) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None:
        return f"{host}:{port}"
    name = getattr(address, "name", None)
    return f"unix:{name.decode() if isinstance(name, bytes) else name or '?'}"


class ConnectionTracker(TypingProtocol):
    """Who wants to know which connections are open (the service, to drain
    them at shutdown)."""

    def opened(self, connection: _LookupProtocol) -> None: ...

    def closed(self, connection: _LookupProtocol) -> None: ...


@implementer(IPushProducer)
class _LookupProtocol(Protocol):
    """What socketmap and tcp_table share: ordering, idle timeout, errors,
    and, as the producer of its own replies, not reading while they pile up."""

    # Per subclass (see __init_subclass__): id(answer) → (answer, its reply).
    # The answer is held, so its id cannot be reused while it is here.
    _replies: ClassVar[dict[int, tuple[Answer, bytes]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._replies = {}

    def __init__(
        self,
        responder: Responder,
        idle_timeout: float,
        clock: IReactorTime,
        tracker: ConnectionTracker | None = None,
    ) -> None:
        self.responder = responder
        self.idle_timeout = idle_timeout
        self._clock: IReactorTime = clock
        self._tracker = tracker
        self._idle_call: IDelayedCall | None = None
        self._active_at = 0.0
        # Each slot is a one-element list: the encoded reply, or None while
        # its lookup is still running.
        self._pending: deque[list[bytes | None]] = deque()
        self._closed = False
        # Set after a framing error: no more reading; close once answered.
        self._draining = False
        # The socket replies may be sent on at once (see _write), or None.
        self._socket: socket.socket | None = None
        # Not reading because replies pile up (see pauseProducing); held: not
        # reading for good (the daemon is stopping).
        self._paused_for_replies = False
        self._held = False

    # Subclasses: decode a chunk into events and encode one answer.
    def decode(self, data: bytes) -> list[Any]:
        raise NotImplementedError

    def answer_event(self, event: Any) -> Answer | Deferred[Answer]:
        raise NotImplementedError

    def encode(self, answer: Answer) -> bytes:
        raise NotImplementedError

    @property
    def peer(self) -> str:
        return describe_peer(self.transport.getPeer() if self.transport else None)

    @property
    def busy(self) -> bool:
        """True while a request of this connection still waits for its answer."""
        return bool(self._pending)

    def connectionMade(self) -> None:
        if self._tracker is not None:
            self._tracker.opened(self)
        if _writes_eagerly(self.transport):
            self._socket = cast(socket.socket, cast(Any, self.transport).getHandle())
            # Twisted pauses a streaming producer when the transport's buffer
            # passes its bufferSize and resumes it once the buffer is empty.
            cast(Any, self.transport).registerProducer(self, True)
        self._arm_idle_timer()

    # --- IPushProducer: the transport says when replies pile up -------------------

    def pauseProducing(self) -> None:
        self._paused_for_replies = True
        cast(Any, self.transport).stopReading()

    def resumeProducing(self) -> None:
        if not self._paused_for_replies:
            return
        self._paused_for_replies = False
        transport: Any = self.transport
        if transport.disconnecting:
            # Twisted closes a connection only once its producer is gone.
            transport.unregisterProducer()
        elif not (self._closed or self._draining or self._held):
            transport.startReading()

    def stopProducing(self) -> None:
        """The connection is gone; nothing to stop."""

    def hold(self) -> None:
        """Read no more requests from this connection (the daemon is stopping);
        those received are still answered."""
        self._held = True
        cast(Any, self.transport).pauseProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._tracker is not None:
            self._tracker.closed(self)
        self._closed = True
        self._pending.clear()
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _arm_idle_timer(self) -> None:
        """Note activity (connect, each whole request, each reply): the idle
        countdown runs from now. Only a time is written; the timer, when it
        fires, waits again for whatever is left (cheaper than moving it each time)."""
        self._active_at = self._clock.seconds()
        if self._idle_call is None:
            self._idle_call = self._clock.callLater(self.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_call = None
        if self._closed:
            return
        left = self._active_at + self.idle_timeout - self._clock.seconds()
        if left > 0 or self._pending:
            # Active since, or a lookup is still running: not idle.
            self._idle_call = self._clock.callLater(left if left > 0 else self.idle_timeout,
                                                    self._idle_expired)
            return
        log.debug("%s: closing idle connection after %gs", self.peer, self.idle_timeout)
        self._close()

    def _write(self, data: bytes) -> None:
        """Send a reply. Twisted's ``write`` only buffers it and asks the
        reactor to watch for writability: two more epoll_ctl calls and a
        loop turn per reply, most of what a warm hit costs. When the
        transport has nothing buffered, the reply goes to its socket at
        once; whatever does not fit is handed to ``write``, behind which
        every later reply queues, so order holds."""
        transport: Any = self.transport
        sock = self._socket
        if (sock is not None and not transport.dataBuffer and not transport._tempDataBuffer
                and not transport.disconnecting):
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # write() meets the same error and closes the connection
            if sent == len(data):
                return
            if sent:
                data = data[sent:]
        transport.write(data)

    def _close(self) -> None:
        self._closed = True
        assert self.transport is not None
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._closed or self._draining:
            return
        try:
            events = self.decode(data)
        except FramingError as e:
            # Answer what came complete before the bad bytes, then close.
            log.info("%s: closing connection: malformed request: %s", self.peer, e.reason)
            events = list(e.decoded)
            self._draining = True
        if events:
            # Only whole requests count as activity: a client dripping a
            # request byte by byte is idle and gets closed like one.
            self._arm_idle_timer()
        for event in events:
            if len(self._pending) >= MAX_PENDING_PER_CONNECTION:
                self._abandon(f"more than {MAX_PENDING_PER_CONNECTION} requests waiting")
                return
            if isinstance(event, MalformedRequest):
                result: Answer | Deferred[Answer] = Answer.perm(event.reason)
                log.info("%s: malformed request: %s", self.peer, event.reason)
            else:
                try:
                    result = self.answer_event(event)
                except Exception:
                    log.exception("%s: internal error answering a request", self.peer)
                    result = Answer.temp("internal error")
            self._queue(result)
        if self._draining and not self._pending:
            self._close()

    def _abandon(self, why: str) -> None:
        log.info("%s: closing connection: %s", self.peer, why)
        self._pending.clear()
        self._close()

    def _queue(self, result: Answer | Deferred[Answer]) -> None:
        # isinstance against Answer, not Deferred: Deferred's ABC metaclass
        # makes that check cost five times as much, on every request.
        if isinstance(result, Answer):
            if not self._pending:
                self._write(self._encode_safely(result))
            else:
                self._pending.append([self._encode_safely(result)])
            return
        slot: list[bytes | None] = [None]
        self._pending.append(slot)
        result.addErrback(self._internal_error)
        result.addCallback(self._completed, slot)

    def _internal_error(self, failure: Failure) -> Answer:
        log_failure(log, f"{self.peer}: internal error during lookup", failure)
        return Answer.temp("internal error")

    def _completed(self, answer: Answer, slot: list[bytes | None]) -> None:
        if self._closed:
            return
        slot[0] = self._encode_safely(answer)
        pending = self._pending
        while pending and pending[0][0] is not None:
            reply = pending.popleft()[0]
            assert reply is not None
            self._write(reply)
        self._arm_idle_timer()
        if self._draining and not pending:
            self._close()

    def _encode_safely(self, answer: Answer) -> bytes:
        replies = self._replies
        known = replies.get(id(answer))
        if known is not None and known[0] is answer:
            return known[1]
        try:
            reply = self.encode(answer)
        except ReplyTooLong as e:
            too_long = e
        else:
            if len(replies) >= REPLY_CACHE_ENTRIES:
                replies.clear()
            replies[id(answer)] = (answer, reply)
            return reply
        # Drop the optional TLSRPT policy_string attributes first; match= and
        # the rest of the policy are never shortened.
        essential = essential_answer(answer)
        if essential is not None:
            try:
                reply = self.encode(essential)
            except ReplyTooLong as e:
                too_long = e
            else:
                log.info("%s: reply too long for the protocol (%s); sent without policy_string",
                         self.peer, too_long)
                return reply
        log.error("%s: reply too long for the protocol (%s); answering TEMP", self.peer, too_long)
        return self.encode(Answer.temp("policy answer too long for this protocol"))


class SocketmapProtocol(_LookupProtocol):
    """Postfix socketmap: netstrings of ``NAME key`` → ``OK|NOTFOUND|TEMP|PERM data``."""

    def __init__(
        self,
        responder: Responder,
        idle_timeout: float = limits.SOCKETMAP_IDLE_TIMEOUT,
        *,
        clock: IReactorTime,
        tracker: ConnectionTracker | None = None,
    ) -> None:
        super().__init__(responder, idle_timeout, clock, tracker)
        self._decoder = socketmap.SocketmapDecoder()

    def dataReceived(self, data: bytes) -> None:
        # Postfix's usual case, without the general path's lists and loop:
        # one whole request in the chunk and no earlier one still waiting.
        if not self._pending and not self._closed and not self._draining:
            request = self._decoder.whole_request(data)
            if request is not None:
                if self._idle_call is not None:
                    self._active_at = self._clock.seconds()  # _arm_idle_timer's usual case
                else:
                    self._arm_idle_timer()
                try:
                    result = self.responder.respond(*request)
                except Exception:
                    log.exception("%s: internal error answering a request", self.peer)
                    result = Answer.temp("internal error")
                if isinstance(result, Answer):
                    self._write(self._encode_safely(result))
                else:
                    self._queue(result)
                return
        super().dataReceived(data)

    def decode(self, data: bytes) -> list[Any]:
        return self._decoder.feed(data)

    def answer_event(self, event: socketmap.SocketmapRequest) -> Answer | Deferred[Answer]:
        return self.responder.respond(event.name, event.key)

    def encode(self, answer: Answer) -> bytes:
        # Postfix logs the text of TEMP and PERM replies; NOTFOUND carries none.
        data = "" if answer.kind is AnswerKind.NOTFOUND else answer.data
        return socketmap.encode_reply(answer.kind._value_, data)


class TcpTableProtocol(_LookupProtocol):
    """Postfix tcp_table: ``get key`` lines → ``200|400|500 text`` lines."""

    def __init__(
        self,
        responder: Responder,
        idle_timeout: float = limits.TCP_TABLE_IDLE_TIMEOUT,
        profile: str = DEFAULT_PROFILE,
        *,
        clock: IReactorTime,
        tracker: ConnectionTracker | None = None,
    ) -> None:
        super().__init__(responder, idle_timeout, clock, tracker)
        self.profile = profile
        self._decoder = tcptable.TcpTableDecoder()

    def decode(self, data: bytes) -> list[Any]:
        return self._decoder.feed(data)

    def answer_event(self, event: tcptable.TcpTableRequest) -> Answer | Deferred[Answer]:
        return self.responder.respond(self.profile, event.key)

    def encode(self, answer: Answer) -> bytes:
        code = TCP_TABLE_CODES[answer.kind]
        text = answer.data or ("not found" if code == 500 else "")
        return tcptable.encode_reply(code, text)


class _LookupFactory(Factory):
    """What both factories share: one responder, the idle timeout, the clock,
    and whoever tracks connections (``tracker``) or counts accepts (``on_accept``)."""

    def __init__(
        self,
        responder: Responder,
        idle_timeout: float,
        *,
        clock: IReactorTime,
        tracker: ConnectionTracker | None = None,
        on_accept: Callable[[], None] | None = None,
    ) -> None:
        self.responder = responder
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.tracker = tracker
        self.on_accept = on_accept


class SocketmapFactory(_LookupFactory):
    """Builds a :class:`SocketmapProtocol` per connection, sharing one responder."""

    def __init__(
        self,
        responder: Responder,
        idle_timeout: float = limits.SOCKETMAP_IDLE_TIMEOUT,
        *,
        clock: IReactorTime,
        tracker: ConnectionTracker | None = None,
        on_accept: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(responder, idle_timeout, clock=clock, tracker=tracker, on_accept=on_accept)

    def buildProtocol(self, addr: IAddress | None) -> SocketmapProtocol:
        if self.on_accept is not None:
            self.on_accept()
        protocol = SocketmapProtocol(
            self.responder, self.idle_timeout, clock=self.clock, tracker=self.tracker
        )
        protocol.factory = self
        return protocol


class TcpTableFactory(_LookupFactory):
    """Builds a :class:`TcpTableProtocol` per connection, sharing one responder."""

    def __init__(
        self,
        responder: Responder,
        idle_timeout: float = limits.TCP_TABLE_IDLE_TIMEOUT,
        profile: str = DEFAULT_PROFILE,
        *,
        clock: IReactorTime,
        tracker: ConnectionTracker | None = None,
        on_accept: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(responder, idle_timeout, clock=clock, tracker=tracker, on_accept=on_accept)
        self.profile = profile

    def buildProtocol(self, addr: IAddress | None) -> TcpTableProtocol:
        if self.on_accept is not None:
            self.on_accept()
        protocol = TcpTableProtocol(
            self.responder, self.idle_timeout, self.profile, clock=self.clock, tracker=self.tracker
        )
        protocol.factory = self
        return protocol
