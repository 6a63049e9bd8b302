"""Turning a policy into what Postfix is told (its TLS policy table syntax)."""

from __future__ import annotations

from postfix_mtasts.policy.model import Answer, AnswerKind, Mode, Policy
from postfix_mtasts.policy.mx import postfix_match_list

#: The Postfix TLS security level that verifies the certificate against names.
SECURE_LEVEL = "secure"
#: Tell Postfix to send the MX host name as SNI (RFC 8461 §4.2 checks that name).
SERVERNAME = "servername=hostname"


def policy_answer(policy: Policy, enforce_testing: bool = False) -> Answer:
    """The answer for a domain with ``policy``.

    ``enforce`` (or ``testing`` with ``enforce_testing``) gives
    ``secure match=<mx list> servername=hostname``; otherwise not found, so
    Postfix applies its default TLS level. An enforce policy without MX
    patterns cannot come from :func:`parse_policy`; it answers a temporary
    failure rather than a ``match=`` that would match nothing or everything.
    """
    if policy.mode is Mode.NONE:
        return Answer.notfound("policy mode none")
    if policy.mode is Mode.TESTING and not enforce_testing:
        return Answer.notfound("policy mode testing")
    if not policy.mx:
        return Answer.temp(f"policy mode {policy.mode.value} without mx patterns")
    return Answer.ok(f"{SECURE_LEVEL} match={postfix_match_list(policy.mx)} {SERVERNAME}")


_KIND_WORDS = {
    AnswerKind.NOTFOUND: "not found",
    AnswerKind.TEMP: "temporary failure",
    AnswerKind.PERM: "permanent failure",
}


def describe(answer: Answer) -> str:
    """A short form of ``answer`` for a log line.

    E.g. ``secure match=...`` or ``not found (policy mode testing)``.
    """
    if answer.kind is AnswerKind.OK:
        return answer.data
    words = _KIND_WORDS[answer.kind]
    return f"{words} ({answer.data})" if answer.data else words
