"""Shared test configuration.

Tests that need something from the machine (Debian's postfix, Redis,
PostgreSQL, unbound, ...) call :func:`require` instead of ``pytest.skip``: on
a developer's laptop they skip, but with ``MTASTS_REQUIRE_ALL=1`` (set by
``.ci/run``) a missing service fails the test, so CI proves every part.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
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


@pytest.fixture
def collector() -> Iterator[None]:
    """Leave the process's garbage collector as it was found: its thresholds,
    and nothing frozen, for tests that tune it or freeze objects."""
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
