"""Every fixed size, timeout and interval of the daemon, named in one place.

Values an administrator may want to change are also config keys; the numbers
here are then only their defaults.
"""

# --- Postfix protocols -------------------------------------------------------
#: Postfix's socketmap_max_query_size: longest request Postfix sends.
SOCKETMAP_MAX_REQUEST = 10_000
#: Postfix's socketmap_max_reply_size: a longer reply is an error in Postfix.
SOCKETMAP_MAX_REPLY = 100_000
#: Longest tcp_table request or reply line Postfix accepts (dict_tcp.c).
TCP_TABLE_MAX_LINE = 4096
#: Seconds an idle tcp_table connection is kept open by default.
TCP_TABLE_IDLE_TIMEOUT = 60.0
#: Seconds an idle socketmap connection is kept open by default. Postfix keeps
#: its socketmap connections open for reuse; it reconnects when we close them.
SOCKETMAP_IDLE_TIMEOUT = 300.0

#: Connections a listener accepts per reactor turn to begin with (Twisted adapts
#: it to the load), for a unix socket passed by systemd: what Twisted's own ports start at.
INHERITED_SOCKET_FIRST_ACCEPTS = 100

# --- RFC 8461 ---------------------------------------------------------------
#: Largest max_age RFC 8461 §3.2 allows (about one year). Larger values are
#: clamped to this; see policy.policyfile.
MAX_AGE_LIMIT = 31_557_600
#: Largest policy body accepted, after content decoding (RFC 8461 §3.3).
POLICY_BODY_LIMIT = 64 * 1024
#: Longest policy id (RFC 8461 §3.1).
POLICY_ID_MAX_LENGTH = 32
#: Total deadline for one HTTPS policy fetch, connect to last byte.
FETCH_TIMEOUT = 30.0
#: Deadline for one DNS query.
DNS_TIMEOUT = 5.0

# --- Cache ------------------------------------------------------------------
#: Seconds between TXT id checks of a cached policy.
RECHECK_INTERVAL = 60.0
#: How long a lookup waits for such a check before answering from the cache.
RECHECK_DEADLINE = 2.0
#: How long a first (cold) lookup waits for discovery and fetch.
FIRST_LOOKUP_DEADLINE = 20.0
#: No new fetch for a TXT id whose fetch failed before this (RFC 8461 §3.3).
FETCH_RETRY_BACKOFF = 300.0
#: Bounds on how long "this domain has no MTA-STS" is remembered.
NEGATIVE_TTL_MIN = 300.0
NEGATIVE_TTL_MAX = 86_400.0
#: Proactive refresh: re-fetch a policy once it is this old (RFC 8461 §3.3
#: suggests daily).
REFRESH_AFTER = 86_400.0
#: How often the refresher looks for work, and how many fetches it runs at once.
REFRESH_SCAN_INTERVAL = 60.0
REFRESH_CONCURRENCY = 8
#: Random delay added to each refresh so that a fleet does not fetch in step.
REFRESH_JITTER = 300.0
#: A policy nobody has asked for in this long is no longer refreshed.
REFRESH_IDLE_LIMIT = 30 * 86_400.0
#: Entries kept in the in-memory front of the cache.
MEMORY_ENTRIES = 200_000
#: How long start-up waits for a shared store (Redis, PostgreSQL) to open
#: before declaring it down and serving from the local copy.
STORE_OPEN_DEADLINE = 5.0
#: Threads resolving policy hosts with the system resolver (getaddrinfo)
#: when no nameservers are configured; a lookup waiting for a thread still
#: counts against its fetch deadline.
ADDRESS_LOOKUP_THREADS = 8
#: Upper bounds (seconds) of the policy fetch duration histogram's buckets.
FETCH_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# --- TLS reports ------------------------------------------------------------
#: Seconds between two looks at the watched Maildir and IMAP folder.
REPORTS_POLL_INTERVAL = 60.0
#: Bound on one look at the IMAP folder (connect, log in, fetch and store all).
REPORTS_IMAP_TIMEOUT = 300.0
#: Seconds between two looks at the report store for alerts and metrics.
REPORTS_WATCH_INTERVAL = 300.0
#: Seconds sendmail may take to accept an alert mail before it is killed.
SENDMAIL_TIMEOUT = 60.0
#: Bytes of sendmail's error output kept for the log line.
SENDMAIL_ERROR_BYTES = 2_000
#: Most (policy domain, reporter, result) series exported: reports come from
#: anyone who can send mail, and must not make the metrics unbounded.
REPORT_METRIC_SERIES = 10_000
#: Longest label value (a domain or reporter name) exported as is.
REPORT_LABEL_MAX = 253
#: Audits the dashboard runs at once, and how long one result is shown again.
REPORT_CHECKS_AT_ONCE = 2
REPORT_CHECK_CACHE_SECONDS = 300.0

# --- Listeners ----------------------------------------------------------------
#: Listen backlog when the kernel's cap (net.core.somaxconn) cannot be read:
#: what current Linux allows by default. Enough for 2000 Postfix smtp
#: processes connecting at once after ``postfix reload``.
LISTEN_BACKLOG_DEFAULT = 4096
#: How long a listener stops accepting after an accept failed and nothing
#: was refused (Twisted's reserved descriptor gone, or the kernel out of
#: memory); connections wait in the backlog meanwhile. Without the pause the
#: listener, still readable, would come back on every loop turn.
ACCEPT_PAUSE = 0.25
#: A burst of accept failures ends (and is summed up in the log) once
#: connections have been accepted for this long without a new failure.
ACCEPT_BURST_QUIET = 5.0
