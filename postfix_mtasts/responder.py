"""From a Postfix request (map name, raw key) to an :class:`Answer`.

The protocols call :meth:`Responder.respond`; it picks the profile, turns the
raw key into a policy domain (or a reason for "not found" without any DNS),
and asks the lookup. A warm hit comes back as a plain value, without a
Deferred, so it costs no more than a dictionary lookup.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from twisted.internet.defer import Deferred

from postfix_mtasts.lookup import PolicyLookup
from postfix_mtasts.policy.model import Answer
from postfix_mtasts.policy.nexthop import BracketedNextHop, Resolve, classify_key
from postfix_mtasts.policy.tlsrpt import AnswerOptions

log = logging.getLogger("postfix_mtasts.lookup")

#: The profile a tcp_table listener and a bare ``socketmap:...:postfix`` use.
DEFAULT_PROFILE = "postfix"


class ProfileOptions(Protocol):
    """The per-profile switches the responder needs (a config.Profile)."""

    @property
    def enforce_testing(self) -> bool: ...


class Responder:
    """Answers one request; shared by every connection of every listener."""

    def __init__(
        self,
        lookup: PolicyLookup,
        profiles: Mapping[str, ProfileOptions],
        bracketed: BracketedNextHop = BracketedNextHop.IGNORE,
    ) -> None:
        self.lookup = lookup
        self.profiles = profiles
        self.bracketed = bracketed

    def respond(self, profile_name: str, key: bytes) -> Answer | Deferred[Answer]:
        profile = self.profiles.get(profile_name)
        if profile is None:
            known = ", ".join(sorted(self.profiles))
            log.warning("request for unknown map name %r (configured profiles: %s)", profile_name, known)
            return Answer.perm(f"unknown map name {profile_name!r}; configured: {known}")
        decision = classify_key(key, self.bracketed)
        if not isinstance(decision, Resolve):
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%r: not found without lookup (%s)", key, decision.reason)
            skipped = Answer.notfound(decision.reason)
            self.lookup.stats.count_skip(skipped)
            return skipped
        # enforce_testing, and the optional tlsrpt, tlsrpt_policy_failure and dane.
        options = AnswerOptions.of(profile)
        cached = self.lookup.answer_now(decision.domain, options)
        if cached is not None:
            return cached
        return Deferred.fromCoroutine(self.lookup.lookup(decision.domain, options))
