"""Tests for the Postfix answer derived from a policy."""

from __future__ import annotations

import pytest

from postfix_mtasts.policy.answer import describe, policy_answer
from postfix_mtasts.policy.model import Answer, AnswerKind, Mode, Policy
from postfix_mtasts.policy.policyfile import parse_policy

RFC_MX = ("mail.example.com", "*.example.net", "backupmx.example.com")
RFC_SECURE = "secure match=.example.net:backupmx.example.com:mail.example.com servername=hostname"


def test_enforce() -> None:
    answer = policy_answer(Policy(Mode.ENFORCE, 604800, RFC_MX))
    assert answer == Answer(AnswerKind.OK, RFC_SECURE)


def test_enforce_ignores_enforce_testing() -> None:
    policy = Policy(Mode.ENFORCE, 604800, RFC_MX)
    assert policy_answer(policy, enforce_testing=True) == policy_answer(policy)


def test_testing_is_not_found_by_default() -> None:
    answer = policy_answer(Policy(Mode.TESTING, 86400, RFC_MX))
    assert answer == Answer(AnswerKind.NOTFOUND, "policy mode testing")


def test_testing_enforced_on_request() -> None:
    answer = policy_answer(Policy(Mode.TESTING, 86400, RFC_MX), enforce_testing=True)
    assert answer == Answer(AnswerKind.OK, RFC_SECURE)


@pytest.mark.parametrize("enforce_testing", [False, True])
def test_none_is_not_found(enforce_testing: bool) -> None:
    answer = policy_answer(Policy(Mode.NONE, 86400, ()), enforce_testing=enforce_testing)
    assert answer == Answer(AnswerKind.NOTFOUND, "policy mode none")


def test_none_with_mx_is_still_not_found() -> None:
    answer = policy_answer(Policy(Mode.NONE, 86400, RFC_MX), enforce_testing=True)
    assert answer.kind is AnswerKind.NOTFOUND


def test_enforce_without_mx_is_a_temporary_failure() -> None:
    answer = policy_answer(Policy(Mode.ENFORCE, 86400, ()))
    assert answer == Answer(AnswerKind.TEMP, "policy mode enforce without mx patterns")


def test_from_parsed_policy() -> None:
    body = b"version: STSv1\nmode: enforce\nmx: *.Mail.Example\nmx: mx1.mail.example\nmax_age: 1\n"
    answer = policy_answer(parse_policy(body))
    assert answer == Answer.ok("secure match=.mail.example:mx1.mail.example servername=hostname")


DESCRIPTIONS = [
    (Answer.ok(RFC_SECURE), RFC_SECURE),
    (Answer.notfound("policy mode testing"), "not found (policy mode testing)"),
    (Answer.notfound(), "not found"),
    (Answer.temp("DNS timeout"), "temporary failure (DNS timeout)"),
    (Answer.perm("bad request"), "permanent failure (bad request)"),
    (Answer.perm(""), "permanent failure"),
]


@pytest.mark.parametrize(("answer", "text"), DESCRIPTIONS)
def test_describe(answer: Answer, text: str) -> None:
    assert describe(answer) == text


def test_describe_covers_every_kind() -> None:
    for kind in AnswerKind:
        assert describe(Answer(kind, "x"))
