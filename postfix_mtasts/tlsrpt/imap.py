"""The daemon's IMAP watcher: store the reports of new mail in an IMAP folder.

One look, with Twisted's own IMAP4 client: connect (TLS from the first byte
unless ``tls = false``), log in, select the folder, then for each message to
take, fetch it without marking it read (``BODY.PEEK[]``), store its reports,
and only then mark it done: moved to ``done_folder`` (copied, flagged
deleted, expunged at the end of the look), or, without one, flagged
``\\Seen``. Which messages are taken: with a done folder, every message
still in the folder; without one, the unread ones. A store that cannot be
written ends the look before the message is marked, so it is taken again
next time; a message without a readable report is logged and marked done.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.mail import imap4

from postfix_mtasts.config import ImapConfig
from postfix_mtasts.tlsrpt.ingest import Tally, ingest
from postfix_mtasts.tlsrpt.sources import MAX_INPUT_BYTES, read_bytes
from postfix_mtasts.tlsrpt.store import IReportStore
from postfix_mtasts.tlsrpt.store.threaded import ThreadedReportStore

log = logging.getLogger("postfix_mtasts.tlsrpt.imap")

#: Largest message fetched; a larger one is logged and marked done unread.
MAX_MESSAGE_BYTES = MAX_INPUT_BYTES
SEEN = "\\Seen"
DELETED = "\\Deleted"


class ImapError(Exception):
    """The IMAP server cannot be used (unreachable, login refused, no such
    folder); ``str()`` is one line naming the server and the reason."""


class _Client(imap4.IMAP4Client):
    """IMAP4Client that says when the server's greeting has arrived."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.greeted: defer.Deferred[None] = defer.Deferred()

    def serverGreeting(self, caps: Any) -> None:
        if not self.greeted.called:
            self.greeted.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        # A failed TLS handshake, a server that hangs up: no greeting will come.
        if not self.greeted.called:
            self.greeted.errback(ImapError(f"connection lost before the greeting: {_one_line(reason.value)}"))
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


def read_password(path: str) -> str:
    """The first line of the password file; raises ImapError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ImapError(f"[reports.imap] password_file {path}: cannot read: {reason}") from None
    if not password:
        raise ImapError(f"[reports.imap] password_file {path}: the first line is empty")
    return password


def endpoint(reactor: IReactorTCP, settings: ImapConfig) -> Any:
    """TCP to the server, wrapped in verified TLS unless ``tls = false``."""
    tcp = TCP4ClientEndpoint(reactor, settings.host, settings.port)
    if not settings.tls:
        return tcp
    trust: Any = None
    if settings.ca_file:
        with open(settings.ca_file, "rb") as f:
            trust = Certificate.loadPEM(f.read())
    options = optionsForClientTLS(settings.host, trustRoot=trust) if trust else optionsForClientTLS(
        settings.host
    )
    return wrapClientTLS(options, tcp)


async def ingest_imap(
    reactor: IReactorTCP | IReactorTime, settings: ImapConfig, store: ThreadedReportStore
) -> Tally:
    """One look at the folder; raises ImapError or ReportStoreError."""
    where = f"imap://{settings.user}@{settings.host}:{settings.port}/{settings.folder}"
    password = read_password(settings.password_file)
    client: Any  # Twisted's IMAP4Client has no type hints
    try:
        client = await endpoint(cast(IReactorTCP, reactor), settings).connect(Factory.forProtocol(_Client))
    except Exception as e:
        raise ImapError(f"{where}: cannot connect: {_one_line(e)}") from None
    try:
        try:
            await client.greeted
        except ImapError as e:
            raise ImapError(f"{where}: {e}") from None
        await _step(where, "login", client.login(settings.user.encode(), password.encode()))
        await _step(where, f"select {settings.folder}", client.select(settings.folder))
        if settings.done_folder:
            try:
                await client.create(settings.done_folder)
            except imap4.IMAP4Exception:
                pass  # it exists already
        # Twisted's Query() has no type hints; the search keys are RFC 3501's.
        query = "(UNDELETED)" if settings.done_folder else "(UNSEEN)"
        uids = await _step(where, "search", client.search(query, uid=True))
        tally = Tally()
        try:
            for uid in uids:
                tally.add(await _take(client, where, settings, store, uid))
        finally:
            if settings.done_folder and uids:
                await _step(where, "expunge", client.expunge())
        try:
            await client.logout()
        except Exception:
            pass  # the work is done; the connection is closed below anyway
        return tally
    finally:
        if client.transport is not None:
            client.transport.loseConnection()


async def _take(client: Any, where: str, settings: ImapConfig, store: ThreadedReportStore,
                uid: int) -> Tally:
    """Store the reports of one message, then mark it done."""
    source = f"{where};UID={uid}"
    sizes = await _step(where, "fetch size", client.fetchSize(str(uid), uid=True))
    size = max((int(v.get("RFC822.SIZE", 0)) for v in sizes.values()), default=0)
    tally = Tally()
    if size > MAX_MESSAGE_BYTES:
        tally.count_unreadable(source, f"larger than {MAX_MESSAGE_BYTES} bytes")
    else:
        fetched = await _step(where, "fetch", client.fetchSpecific(str(uid), uid=True, peek=True))
        data = _body(fetched)
        if data is None:
            tally.count_unreadable(source, "the server sent no message body")
        else:
            def job(reports: IReportStore) -> Tally:
                return ingest(reports, read_bytes(source, data))

            tally = await store.run(job)
    if settings.done_folder:
        await _step(where, f"copy to {settings.done_folder}",
                    client.copy(str(uid), settings.done_folder, uid=True))
        await _step(where, "flag", client.addFlags(str(uid), [SEEN, DELETED], uid=True))
    else:
        await _step(where, "flag", client.addFlags(str(uid), [SEEN], uid=True))
    return tally


def _body(fetched: dict[int, list[list[Any]]]) -> bytes | None:
    """The message from a ``BODY.PEEK[]`` answer, ``{seq: [[..., "BODY", [], text]]}``.
    Twisted decodes the literal with the charmap codec: encoding it the same
    way gives back the bytes the server sent."""
    for items in fetched.values():
        for item in items:
            for i in range(len(item) - 2):
                if item[i] == "BODY" and isinstance(item[i + 1], list):
                    text = item[i + 2]
                    return text if isinstance(text, bytes) else str(text).encode("charmap")
    return None


async def _step(where: str, what: str, d: defer.Deferred[Any]) -> Any:
    try:
        return await d
    except imap4.IMAP4Exception as e:
        raise ImapError(f"{where}: {what} refused: {_one_line(e)}") from None


def _one_line(error: BaseException) -> str:
    text = error.args[0] if error.args else error
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join(str(text).split()) or type(error).__name__
