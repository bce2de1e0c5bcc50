"""Typed reading of one ``server.toml`` table, with errors that name the key and its place."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def kind_of(value: object) -> str:
    """The TOML name of ``value``'s type."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def show_value(value: object) -> str:
    """``value`` as the error messages show it: its repr, cut to 40 characters."""
    """``value`` and its TOML type, short and on one line."""
    text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({kind_of(value)})"


class TomlTable:
    """One TOML table: typed, range-checked reads whose errors name ``[table] key``."""

    def __init__(self, raw: Mapping[str, Any], name: str, known: Iterable[str]) -> None:
        value = raw.get(name.split(".")[0], {})
        for part in name.split(".")[1:]:
            value = value.get(part, {}) if isinstance(value, dict) else value
        if not isinstance(value, dict):
            raise ValueError(f"[{name}] must be a table, got {show_value(value)}")
        known = set(known)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"unknown key(s) in [{name}]: {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
        self.name = name
        self.raw: dict[str, Any] = value

    def where(self, key: str) -> str:
        """``[table] key``, for messages."""
        return f"[{self.name}] {key}"

    def integer(self, key: str, default: int, *, low: int, high: int | None = None) -> int:
        """An integer in ``[low, high]`` (booleans and floats are refused)."""
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{self.where(key)} must be an integer, got {show_value(value)}")
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"{self.where(key)} must be {bounds}, got {value}")
        return value

    def number(
        self,
        key: str,
        default: float,
        *,
        low: float,
        high: float,
        low_open: bool = False,
        high_open: bool = False,
    ) -> float:
        """A finite number in the interval given (an integer is accepted, a boolean not)."""
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{self.where(key)} must be a number, got {show_value(value)}")
        number = float(value)
        if (
            not math.isfinite(number)
            or number < low
            or number > high
            or (low_open and number == low)
            or (high_open and number == high)
        ):
            closing = ")" if high_open or math.isinf(high) else "]"
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{closing}"
            raise ValueError(f"{self.where(key)} must be a number in {interval}, got {value!r}")
        return number

    def string(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        """One of ``choices``."""
        value = self.raw.get(key, default)
        if not isinstance(value, str):
            raise ValueError(f"{self.where(key)} must be a string, got {show_value(value)}")
        if value not in choices:
            raise ValueError(
                f"{self.where(key)} must be one of {', '.join(map(repr, choices))}, "
                f"got {show_value(value)}"
            )
        return value

    def integers(self, key: str, default: tuple[int, ...], *, most: int) -> tuple[int, ...]:
        """A non-empty array of at most ``most`` integers."""
        value = self.raw.get(key, list(default))
        if not isinstance(value, list) or not value:
            raise ValueError(
                f"{self.where(key)} must be a non-empty array of integers, got {show_value(value)}"
            )
        if len(value) > most:
            raise ValueError(f"{self.where(key)} holds {len(value)} values, at most {most}")
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int):
                raise ValueError(
                    f"{self.where(key)} must hold integers only, got {show_value(item)} in it"
                )
        return tuple(value)

    def path(self, key: str, base: Path, default: str | None = None) -> Path | None:
        """A path (relative to ``base``); an empty string or no key means none."""
        value = self.raw.get(key, default)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise ValueError(f"{self.where(key)} must be a path string, got {show_value(value)}")
        if "\0" in value:
            raise ValueError(f"{self.where(key)} contains a NUL byte")
        try:
            path = Path(value).expanduser()
            return path if path.is_absolute() else (base / path).resolve()
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{self.where(key)} {value!r} cannot be resolved: {exc}") from exc
