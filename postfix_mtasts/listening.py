"""How the listeners take a storm of connections: the listen backlog, and
running out of descriptors.

After ``postfix reload`` every smtp process connects at once (100 by
default, 500-2000 on big sites). The kernel queues connections the daemon
has not accepted yet up to the listen backlog and drops the SYNs beyond it;
the clients retry after 1, 3, 7 s. So the backlog defaults to the largest
the kernel allows (``net.core.somaxconn``).

When the process runs out of descriptors, Twisted's accept loop refuses
(accepts and closes) new connections and reports each at info level;
:class:`RefusalLog` turns those reports into one warning when a burst of
refusals begins and one line when a connection is accepted again.
"""

from __future__ import annotations

import logging

from postfix_mtasts import limits

log = logging.getLogger("postfix_mtasts.service")

#: Where Linux publishes the cap it puts on every listen backlog.
SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"


def kernel_backlog_limit(path: str = SOMAXCONN_PATH) -> int | None:
    """net.core.somaxconn, or None where it cannot be read (not Linux)."""
    try:
        with open(path) as f:
            value = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return value if value > 0 else None


def listen_backlog(configured: int, kernel_limit: int | None) -> int:
    """The backlog to ask ``listen()`` for: the configured one, else (0) the kernel's largest."""
    if configured:
        return configured
    return kernel_limit if kernel_limit is not None else limits.LISTEN_BACKLOG_DEFAULT


def backlog_capped(configured: int, kernel_limit: int | None) -> str | None:
    """One line for the log when the kernel will give less than ``listen.backlog`` asks; else None."""
    if not configured or kernel_limit is None or configured <= kernel_limit:
        return None
    return (
        f"listen.backlog = {configured} but the kernel caps every backlog at {kernel_limit} "
        f"(net.core.somaxconn); raise it with: sysctl -w net.core.somaxconn={configured}"
    )
