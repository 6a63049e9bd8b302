"""Postfix 3.10's TLSRPT attributes in an MTA-STS answer, and the per-profile
switches that shape an answer.

Postfix 3.10 accepts, after ``secure match=...``, the name=value attributes
of its TLSRPT_README ("MTA-STS Support via smtp_tls_policy_maps"):
``policy_type=sts``, ``policy_domain=NAME``, one ``mx_host_pattern=PATTERN``
per ``mx:`` line, one ``{ policy_string = LINE }`` per policy line (braces
because a line holds spaces), and ``policy_failure=TYPE``, which makes
Postfix fail delivery with that TLSRPT result. Postfix splits a policy on
blanks and commas outside ``{ }`` (mystrtokq), strips one brace pair with
the whitespace inside it (extpar), then cuts ``name = value`` at the first
``=`` (split_nameval). So a value is safe in braces unless it holds a brace,
a line break or another control character; such a line is never sent.
Older Postfix rejects every one of these attributes: the options are for
Postfix 3.10 and later only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from postfix_mtasts.policy.model import Answer, AnswerKind, Policy

#: RFC 8460 §4.3 policy type of an MTA-STS policy, as Postfix spells it.
POLICY_TYPE_STS = "sts"
#: The policy_failure values Postfix 3.10 accepts for an MTA-STS failure
#: (tlsrpt_wrapper.c); "validation-failure" exists too but says less.
POLICY_FAILURES = ("sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid")
#: The security level Postfix enforces MTA-STS policies at; policy_failure
#: only means something where a policy is enforced.
FAILURE_LEVEL = "secure"
#: Longest policy line sent as a policy_string. RFC 8461 sets no bound, but no
#: real policy line comes close; a longer one would only push every other
#: policy_string out of a tcp_table reply (4096 bytes).
POLICY_STRING_MAX = 1000

# Characters that would end or unbalance a "{ name = value }" group, or that
# Postfix would read as a separator: braces, CR, LF and every other control.
_UNSAFE_IN_BRACES = re.compile(r"[{}\x00-\x08\x0a-\x1f\x7f]")
# A bare (brace-less) attribute value: no blank, comma, brace or control.
_BARE_VALUE = re.compile(r"[A-Za-z0-9*._-]+\Z")


@dataclass(frozen=True, slots=True)
class AnswerOptions:
    """What a profile asks of an answer; hashable, so the cache keys on it.

    ``enforce_testing``: answer ``testing`` policies like ``enforce`` ones.
    ``tlsrpt``: add Postfix 3.10's TLSRPT attributes to MTA-STS answers.
    ``policy_failure``: answer a policy that is promised but unusable with
    ``policy_failure=...`` (Postfix then defers the mail) instead of not found.
    ``dane``: let DNSSEC-proven TLSA records take precedence (``dane-only``
    or ``dane``) over an MTA-STS answer.
    """

    enforce_testing: bool = False
    tlsrpt: bool = False
    policy_failure: bool = False
    dane: bool = False
    #: The four switches as one small int, distinct for distinct options:
    #: what the front keys a domain's answers on, since an int is hashed in C
    #: and every warm hit looks its answer up.
    code: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "code",
            self.enforce_testing | self.tlsrpt << 1 | self.policy_failure << 2 | self.dane << 3,
        )

    def __hash__(self) -> int:
        return self.code

    @classmethod
    def of(cls, profile: object) -> AnswerOptions:
        """The options of ``profile``: AnswerOptions, a bool (``enforce_testing``
        alone, the older call form) or any object with those attributes."""
        if isinstance(profile, AnswerOptions):
            return profile
        if isinstance(profile, bool):
            return cls(enforce_testing=profile)
        return cls(
            enforce_testing=bool(getattr(profile, "enforce_testing", False)),
            tlsrpt=bool(getattr(profile, "tlsrpt", False)),
            policy_failure=bool(getattr(profile, "tlsrpt_policy_failure", False)),
            dane=bool(getattr(profile, "dane", False)),
        )


@dataclass(frozen=True, slots=True)
class TrimmableAnswer(Answer):
    """An OK answer carrying policy_string attributes that may be dropped.

    ``essential`` is the same answer without them: what a protocol sends when
    ``data`` is longer than its reply limit. ``match=`` and every other
    attribute are in both, so a shorter reply never weakens the policy.
    """

    essential: str = ""


def essential_answer(answer: Answer) -> Answer | None:
    """``answer`` without its droppable attributes, or None if it has none."""
    if isinstance(answer, TrimmableAnswer) and answer.essential != answer.data:
        return Answer.ok(answer.essential)
    return None


@dataclass(frozen=True, slots=True)
class PolicyStrings:
    """The policy lines fit to send, in published order, and why others were not."""

    lines: tuple[str, ...]
    omitted: tuple[str, ...] = ()


def unsafe_reason(value: str) -> str | None:
    """Why ``value`` cannot be a braced attribute value, or None if it can."""
    if not value:
        return "is empty"
    found = _UNSAFE_IN_BRACES.search(value)
    if found is not None:
        char = found.group()
        what = f"'{char}'" if char in "{}" else f"control character \\x{ord(char):02x}"
        return f"contains {what}, which Postfix's policy parser would misread"
    if len(value) > POLICY_STRING_MAX:
        return f"is longer than {POLICY_STRING_MAX} characters"
    return None


def policy_strings(policy_text: str) -> PolicyStrings:
    """Each non-blank line of the fetched policy, stripped, in published order.

    Lines are split on LF (a CR before it is dropped, as the policy parser
    does); a line that is unsafe in braces is left out with its line number
    and reason.
    """
    lines: list[str] = []
    omitted: list[str] = []
    for number, raw in enumerate(policy_text.split("\n"), start=1):
        line = raw.removesuffix("\r").strip(" \t")
        if not line:
            continue
        reason = unsafe_reason(line)
        if reason is None:
            lines.append(line)
        else:
            omitted.append(f"line {number} {reason}")
    return PolicyStrings(tuple(lines), tuple(omitted))


def _bare(name: str, value: str, omitted: list[str]) -> str | None:
    """``name=value``, or None (with a reason) if the value is not a plain token."""
    if _BARE_VALUE.match(value):
        return f"{name}={value}"
    omitted.append(f"{name} {value!r} is not a plain host name")
    return None


def with_sts_attributes(
    answer: Answer, domain: str, policy: Policy, policy_text: str
) -> tuple[Answer, tuple[str, ...]]:
    """Add the TLSRPT attributes of an MTA-STS policy to its OK ``answer``.

    Returns the new answer (a :class:`TrimmableAnswer` when it has
    policy_string attributes) and the reasons for every value left out. A
    non-OK answer is returned as it is: the attributes are an error on
    anything but an MTA-STS policy.
    """
    if answer.kind is not AnswerKind.OK:
        return answer, ()
    omitted: list[str] = []
    parts = [answer.data, f"policy_type={POLICY_TYPE_STS}"]
    domain_part = _bare("policy_domain", domain, omitted)
    if domain_part is not None:
        parts.append(domain_part)
    for pattern in policy.mx:
        pattern_part = _bare("mx_host_pattern", pattern, omitted)
        if pattern_part is not None:
            parts.append(pattern_part)
    essential = " ".join(parts)
    strings = policy_strings(policy_text)
    omitted.extend(strings.omitted)
    if not strings.lines:
        return Answer.ok(essential), tuple(omitted)
    full = " ".join([essential, *(f"{{ policy_string = {line} }}" for line in strings.lines)])
    return TrimmableAnswer(AnswerKind.OK, full, essential), tuple(omitted)


def policy_failure_answer(domain: str, failure: str) -> Answer | None:
    """``secure policy_type=sts policy_domain=D policy_failure=F``, or None when
    ``failure`` is not one Postfix accepts (then "not found" stands)."""
    if failure not in POLICY_FAILURES or not _BARE_VALUE.match(domain):
        return None
    return Answer.ok(
        f"{FAILURE_LEVEL} policy_type={POLICY_TYPE_STS} policy_domain={domain} policy_failure={failure}"
    )
