"""Shared test configuration.

Tests that need something from the machine (Debian's postfix, Redis,
PostgreSQL, unbound, ...) call :func:`require` instead of ``pytest.skip``: on
a developer's laptop they skip, but with ``MTASTS_REQUIRE_ALL=1`` (set by
``.ci/run``) a missing service fails the test, so CI proves every part.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_ALL_VARIABLE = "MTASTS_REQUIRE_ALL"


def require(what: str, available: bool) -> None:
    """Skip (or, under CI, fail) the calling test unless ``available``."""
    if not available:
        missing(what)


def missing(what: str) -> NoReturn:
    if os.environ.get(REQUIRE_ALL_VARIABLE):
        pytest.fail(f"{what} is required under {REQUIRE_ALL_VARIABLE}=1 but missing")
    pytest.skip(f"{what} is not available on this machine")
