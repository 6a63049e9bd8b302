"""What Postfix is told while an entry is in force, shaped by a profile.

The policy answer itself is pure (:mod:`postfix_mtasts.policy.answer`,
:mod:`postfix_mtasts.policy.tlsrpt`); this adds the line logged when TLSRPT
attributes had to be left out.
"""

from __future__ import annotations

import logging

from postfix_mtasts.cache import CacheEntry, Source
from postfix_mtasts.policy.answer import policy_answer
from postfix_mtasts.policy.model import Answer, AnswerKind
from postfix_mtasts.policy.tlsrpt import AnswerOptions, policy_failure_answer, with_sts_attributes

log = logging.getLogger("postfix_mtasts.lookup")


def entry_answer(entry: CacheEntry, options: bool | AnswerOptions) -> Answer:
    """What Postfix is told while ``entry`` is in force, shaped by a profile's
    options (a bool is ``enforce_testing`` alone)."""
    wanted = AnswerOptions.of(options)
    if entry.source is Source.FETCHED and entry.policy is not None:
        answer = policy_answer(entry.policy, wanted.enforce_testing)
        if wanted.tlsrpt:
            answer, omitted = with_sts_attributes(answer, entry.domain, entry.policy, entry.policy_text)
            if omitted:
                log.info("%s: left out of the TLSRPT attributes: %s", entry.domain, "; ".join(omitted))
        return answer
    if entry.source is Source.NEGATIVE:
        return Answer.notfound("no MTA-STS policy published")
    if wanted.policy_failure and entry.failure_category:
        failed = policy_failure_answer(entry.domain, entry.failure_category)
        if failed is not None:
            return failed
    return Answer.notfound(f"no usable policy: {entry.failure}")


def describe(answer: Answer) -> str:
    """An answer as the log line says it."""
    if answer.kind is AnswerKind.OK:
        return answer.data
    if answer.kind is AnswerKind.NOTFOUND:
        return "not found"
    return f"{answer.kind.value} {answer.data}"
