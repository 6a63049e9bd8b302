"""The values that flow between discovery, the cache and the answer."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Mode(enum.Enum):
    """A policy's ``mode`` (RFC 8461 §3.2)."""

    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy file.

    ``mx`` holds the patterns as published (lower-cased A-labels, ``*.`` kept),
    in the published order; ``max_age`` is already clamped to RFC 8461's limit.
    """

    mode: Mode
    max_age: int
    mx: tuple[str, ...]


class AnswerKind(enum.Enum):
    """What a lookup tells Postfix, independent of the wire protocol."""

    OK = "OK"
    NOTFOUND = "NOTFOUND"
    TEMP = "TEMP"
    PERM = "PERM"


@dataclass(frozen=True, slots=True)
class Answer:
    """One reply to Postfix: ``data`` is the policy string for OK, a reason otherwise."""

    kind: AnswerKind
    data: str = ""

    @classmethod
    def ok(cls, data: str) -> Answer:
        return cls(AnswerKind.OK, data)

    @classmethod
    def notfound(cls, why: str = "") -> Answer:
        return cls(AnswerKind.NOTFOUND, why)

    @classmethod
    def temp(cls, reason: str) -> Answer:
        return cls(AnswerKind.TEMP, reason)

    @classmethod
    def perm(cls, reason: str) -> Answer:
        return cls(AnswerKind.PERM, reason)
