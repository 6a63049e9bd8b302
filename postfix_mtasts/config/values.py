"""Reading one TOML value of a given kind, or refusing it with one line that
names the file, the dotted key and what is wrong."""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Mapping
from typing import TypeVar

from postfix_mtasts.config.model import SECONDS_MAX, ConfigError
from postfix_mtasts.config.text import choices, show, show_key

_T = TypeVar("_T")


class ValueReader:
    """Reads the values of one configuration source (``source`` names it in errors)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> ConfigError:
        where = f"{key}: " if key else ""
        return ConfigError(f"{self.source}: {where}{problem}")

    def table(self, data: Mapping[str, object], prefix: str, known: tuple[str, ...]) -> Mapping[str, object]:
        """Reject keys of ``data`` not in ``known``, suggesting the closest one."""
        for key in data:
            if key not in known:
                dotted = f"{prefix}.{show_key(key)}" if prefix else show_key(key)
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise self.fail("", f"unknown key {dotted}{hint}")
        return data

    def subtable(self, data: Mapping[str, object], key: str, prefix: str) -> Mapping[str, object]:
        value = data.get(key, {})
        dotted = f"{prefix}.{key}" if prefix else key
        if not isinstance(value, Mapping):
            raise self.fail(dotted, f"must be a table ([{dotted}]), got {show(value)}")
        return value

    def seconds(
        self,
        data: Mapping[str, object],
        key: str,
        prefix: str,
        default: float,
        minimum: float,
        *,
        above: bool = False,
        below: float | None = None,
    ) -> float:
        """A finite number of seconds >= ``minimum`` (> if ``above``), < ``below``."""
        value = data.get(key, default)
        bound = f"> {minimum:g}" if above else f">= {minimum:g}"
        if below is not None:
            bound += f" and < {below:g}"
        dotted = f"{prefix}.{key}"
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(value, float) and math.isnan(value))
            or (value <= minimum if above else value < minimum)
            or (below is not None and value >= below)
        ):
            raise self.fail(dotted, f"must be a number of seconds {bound}, got {show(value)}")
        if value > SECONDS_MAX:
            raise self.fail(dotted, f"must be at most {SECONDS_MAX} seconds (ten years), got {show(value)}")
        return float(value)

    def integer(
        self,
        data: Mapping[str, object],
        key: str,
        prefix: str,
        default: int,
        minimum: int,
        maximum: int,
    ) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise self.fail(
                f"{prefix}.{key}",
                f"must be a whole number from {minimum} to {maximum}, got {show(value)}",
            )
        return value

    def boolean(self, data: Mapping[str, object], key: str, prefix: str, default: bool) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(
                f"{prefix}.{key}",
                f"must be true or false (no quotes), got {show(value)}",
            )
        return value

    def string(self, data: Mapping[str, object], key: str, prefix: str, default: str) -> str:
        value = data.get(key, default)
        if not isinstance(value, str):
            raise self.fail(f"{prefix}.{key}", f"must be a string, got {show(value)}")
        if "\0" in value:
            raise self.fail(
                f"{prefix}.{key}",
                f"must not contain a NUL character, got {show(value)}",
            )
        return value

    def choice(
        self,
        data: Mapping[str, object],
        key: str,
        prefix: str,
        options: tuple[str, ...],
        default: str,
    ) -> str:
        value = data.get(key, default)
        if value not in options or not isinstance(value, str):
            close = difflib.get_close_matches(value, options, n=1) if isinstance(value, str) else []
            hint = f" (did you mean {json.dumps(close[0])}?)" if close else ""
            raise self.fail(
                f"{prefix}.{key}",
                f"must be one of {choices(options)}, got {show(value)}{hint}",
            )
        return value

    def path(self, data: Mapping[str, object], key: str, prefix: str) -> str:
        """An absolute path, or empty for "the built-in default"."""
        value = self.string(data, key, prefix, "")
        if value and not value.startswith("/"):
            raise self.fail(
                f"{prefix}.{key}",
                f"must be an absolute path or empty, got {show(value)}",
            )
        return value

    def items(
        self,
        data: Mapping[str, object],
        key: str,
        prefix: str,
        parse: Callable[[str], _T],
        example: str,
    ) -> tuple[_T, ...]:
        """A list of strings, each turned into a value by ``parse``."""
        value = data.get(key, [])
        dotted = f"{prefix}.{key}"
        if not isinstance(value, list):
            raise self.fail(
                dotted,
                f"must be a list, e.g. [{json.dumps(example)}], got {show(value)}",
            )
        result = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(f"{dotted}[{index}]", f"must be a string, got {show(item)}")
            try:
                result.append(parse(item))
            except ConfigError as error:
                raise self.fail(f"{dotted}[{index}]", str(error)) from None
        return tuple(result)

    # -- sections --
