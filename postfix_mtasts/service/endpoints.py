"""Where the daemon listens: Twisted endpoints for inet and unix addresses, and
the sockets systemd passed (socket activation)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort

from postfix_mtasts.activation import adopted_stream_endpoint
from postfix_mtasts.config import ListenAddress
from postfix_mtasts.errors import StartupError


def listen_environment_now() -> dict[str, str]:
    """systemd's LISTEN_* variables still in this process's environment.

    Importing ``twisted.internet.endpoints`` deletes LISTEN_PID and LISTEN_FDS,
    so the command line copies them before any such import and passes them in;
    this is the fallback for a daemon started some other way.
    """
    return {name: value for name, value in os.environ.items() if name.startswith("LISTEN_")}


def endpoint_for(address: ListenAddress, backlog: int | None = None) -> str:
    """The Twisted endpoint description of an inet or unix address, with
    ``backlog`` as its listen backlog (None: Twisted's default)."""
    if address.kind == "systemd":
        raise ValueError(f"{address}: a socket from systemd has no description; use server_endpoint()")
    description = address.endpoint_description()
    if backlog is not None:
        description += f":backlog={backlog}"
    if address.kind == "unix":
        # A lock file lets Twisted remove the stale socket a crash left behind.
        description += ":lockfile=1"
    return description


def server_endpoint(
    reactor: Any, address: ListenAddress, listen_environment: Mapping[str, str], backlog: int | None = None
) -> Any:
    """A server endpoint for ``address``; a systemd socket is adopted from the
    descriptors passed, and keeps the backlog its unit's Backlog= gave it."""
    if address.kind != "systemd":
        return serverFromString(reactor, endpoint_for(address, backlog))  # type: ignore[no-untyped-call]
    fd = inherited_descriptor(address, listen_environment)
    sock = socket.socket(fileno=fd)
    family = sock.family
    kind = sock.type
    sock.detach()  # the descriptor stays open: Twisted adopts (duplicates) it
    if kind != socket.SOCK_STREAM or family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        raise StartupError(f"{address}: the socket systemd passed is not a stream socket (use ListenStream=)")
    return adopted_stream_endpoint(reactor, fd, family)


def inherited_descriptor(address: ListenAddress, listen_environment: Mapping[str, str]) -> int:
    """The descriptor systemd passed for ``address`` (sd_listen_fds(3) rules: LISTEN_PID must be ours)."""
    from twisted.python.systemd import ListenFDs

    # fromEnvironment deletes what it read; it gets a copy.
    fds = ListenFDs.fromEnvironment(environ=dict(listen_environment))
    descriptors = fds.inheritedDescriptors()
    if address.systemd_name:
        named = fds.inheritedNamedDescriptors()
        fd = named.get(address.systemd_name)
        if fd is None:
            names = ", ".join(sorted(named)) or "none"
            raise StartupError(
                f"{address}: systemd passed no socket named {address.systemd_name!r} (names passed: "
                f"{names}); start the .socket unit with FileDescriptorName={address.systemd_name}, "
                "then restart the service"
            )
        return fd
    index = address.systemd_index or 0
    if index >= len(descriptors):
        raise StartupError(f"{address}: systemd passed {len(descriptors)} sockets, not {index + 1}")
    return descriptors[index]


async def stop_listening(port: IListeningPort) -> None:
    """Close ``port`` and wait until it is closed."""
    stopped = port.stopListening()
    if stopped is not None:
        await stopped
