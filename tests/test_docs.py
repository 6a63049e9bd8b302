"""The documents an admin reads first must render: a broken reStructuredText
construct would show up as raw markup (or vanish) on PyPI and in viewers."""

from __future__ import annotations

import io
from pathlib import Path

import docutils.core
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["README.rst", "bench/README.rst"])
def test_document_renders_without_warnings(name: str) -> None:
    warnings = io.StringIO()
    docutils.core.publish_string(
        (ROOT / name).read_text(encoding="utf-8"),
        writer="null",
        settings_overrides={"warning_stream": warnings, "report_level": 2, "halt_level": 5},
    )
    assert warnings.getvalue() == ""


def test_readme_names_the_two_setup_commands() -> None:
    text = (ROOT / "README.rst").read_text(encoding="utf-8")
    assert "    make run\n" in text and "    make test\n" in text
