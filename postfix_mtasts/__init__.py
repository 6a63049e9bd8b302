"""postfix-mtasts: an MTA-STS (RFC 8461) TLS policy map for Postfix."""

__version__ = "0.1.0"
