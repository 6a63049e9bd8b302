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
from postfix_mtasts.policy.nexthop import BracketedNextHop, Resolve, Skip, classify_key
from postfix_mtasts.policy.tlsrpt import AnswerOptions

log = logging.getLogger("postfix_mtasts.lookup")

#: The profile a tcp_table listener and a bare ``socketmap:...:postfix`` use.
DEFAULT_PROFILE = "postfix"
#: The profile name answers to unknown map names are counted under, so that
#: the set of counted names stays bounded.
UNKNOWN_PROFILE = "(unknown)"
#: Raw keys whose classification is remembered, so that a repeated key skips
#: parsing (IP-literal check, IDNA, label rules). Cleared when full: the hot
#: set of next hops refills it at once. About 200 bytes per key.
KEY_CACHE_ENTRIES = 16_384


class ProfileOptions(Protocol):
    """The per-profile switches the responder needs (a config.Profile)."""

    @property
    def enforce_testing(self) -> bool: ...


class AnswerCounter(Protocol):
    """Counts answers per profile (the service's counters)."""

    def count_answer(self, profile: str, answer: Answer) -> None: ...


class Responder:
    """Answers one request; shared by every connection of every listener.

    With ``counters``, every answer is counted under its profile's name
    (under :data:`UNKNOWN_PROFILE` for unknown map names) once it is known.
    """

    def __init__(
        self,
        lookup: PolicyLookup,
        profiles: Mapping[str, ProfileOptions],
        bracketed: BracketedNextHop = BracketedNextHop.IGNORE,
        *,
        counters: AnswerCounter | None = None,
    ) -> None:
        self.lookup = lookup
        self.counters = counters
        self._profiles = profiles
        self._bracketed = bracketed
        # Per profile name: its AnswerOptions, built once (until a reload).
        self._options: dict[str, AnswerOptions] = {}
        self._decisions: dict[bytes, Resolve | Skip] = {}

    # A reload assigns these; the caches derived from them start afresh.
    @property
    def profiles(self) -> Mapping[str, ProfileOptions]:
        return self._profiles

    @profiles.setter
    def profiles(self, profiles: Mapping[str, ProfileOptions]) -> None:
        self._profiles = profiles
        self._options = {}

    @property
    def bracketed(self) -> BracketedNextHop:
        return self._bracketed

    @bracketed.setter
    def bracketed(self, bracketed: BracketedNextHop) -> None:
        self._bracketed = bracketed
        self._decisions = {}

    def _classify(self, key: bytes) -> Resolve | Skip:
        decisions = self._decisions
        decision = decisions.get(key)
        if decision is None:
            decision = classify_key(key, self._bracketed)
            if len(decisions) >= KEY_CACHE_ENTRIES:
                decisions.clear()
            decisions[key] = decision
        return decision

    def _answer_options(self, profile_name: str, profile: ProfileOptions) -> AnswerOptions:
        options = AnswerOptions.of(profile)
        self._options[profile_name] = options
        return options

    def respond(self, profile_name: str, key: bytes) -> Answer | Deferred[Answer]:
        counters = self.counters
        # A known profile's options are one lookup away (the profiles setter
        # empties this cache); an unknown map name is refused.
        options = self._options.get(profile_name)
        if options is None:
            profile = self._profiles.get(profile_name)
            if profile is None:
                names = ", ".join(sorted(self.profiles))
                log.warning("request for unknown map name %r (configured profiles: %s)", profile_name, names)
                refused = Answer.perm(f"unknown map name {profile_name!r}; configured: {names}")
                if counters is not None:
                    counters.count_answer(UNKNOWN_PROFILE, refused)
                return refused
            # enforce_testing, and the optional tlsrpt, tlsrpt_policy_failure and dane.
            options = self._answer_options(profile_name, profile)
        decision = self._decisions.get(key) or self._classify(key)
        if not isinstance(decision, Resolve):
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%r: not found without lookup (%s)", key, decision.reason)
            skipped = Answer.notfound(decision.reason)
            self.lookup.stats.count_skip(skipped)
            if counters is not None:
                counters.count_answer(profile_name, skipped)
            return skipped
        cached = self.lookup.answer_now(decision.domain, options)
        if cached is not None:
            if counters is not None:
                counters.count_answer(profile_name, cached)
            return cached
        resolving = Deferred.fromCoroutine(self.lookup.lookup(decision.domain, options))
        if counters is not None:
            def counted(answer: Answer, counters: AnswerCounter = counters) -> Answer:
                counters.count_answer(profile_name, answer)
                return answer

            resolving.addCallback(counted)
        return resolving
