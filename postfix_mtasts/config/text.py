"""How configuration values are shown back to the admin in one-line errors."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Final

from postfix_mtasts.config.model import SHOWN_VALUE_MAX

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def one_line(text: str) -> str:
    return " ".join(text.split())


def show(value: object) -> str:
    """A value as the admin wrote it (TOML-like), short and on one line."""
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, str):
        shown = json.dumps(value)
    elif isinstance(value, int):
        shown = str(value) if abs(value) < 10**30 else "a very large integer"
    elif isinstance(value, float):
        shown = repr(value)
    elif isinstance(value, Mapping):
        shown = "a table"
    elif isinstance(value, list):
        shown = "[" + ", ".join(show(item) for item in value[:5]) + (", ...]" if len(value) > 5 else "]")
    else:
        shown = one_line(str(value))
    if len(shown) > SHOWN_VALUE_MAX:
        shown = shown[: SHOWN_VALUE_MAX - 3] + "..."
    return shown


def show_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def choices(options: tuple[str, ...]) -> str:
    return ", ".join(json.dumps(option) for option in options)
