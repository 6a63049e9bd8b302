"""Pure RFC 8461 logic: TXT records, policy files, MX patterns, next-hop keys
and the answers Postfix gets. Nothing here imports Twisted or does I/O."""
