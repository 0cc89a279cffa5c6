"""Errors raised at the edge, before anything compiles.

Every message is one line that names the setting, the value it got and what
was expected, so a batch log shows the cause without a traceback.
"""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A setting is out of range, of the wrong type or inconsistent.

    ``str(error)`` is one line: ``<key>: got <value>; expected <what>``.
    """

    def __init__(self, key: str, value: Any, expected: str, hint: str = "") -> None:
        self.key = key
        self.value = value
        self.expected = expected
        self.hint = hint
        message = f"{key}: got {value!r}; expected {expected}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)

    def __reduce__(self):
        # Rebuilt from its fields, so that it crosses process boundaries intact: a
        # launcher (submitit, joblib) pickles a failed job's error to report it.
        return type(self), (self.key, self.value, self.expected, self.hint)


def check_finite(key: str, value: float) -> float:
    """Return ``value`` as float, refusing NaN, infinities and non-numbers."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, value, "a real number") from None
    if not math.isfinite(number):
        raise ConfigError(key, value, "a finite number (not NaN or infinity)")
    return number


def check_positive(key: str, value: float) -> float:
    """Return ``value`` if it is a finite number > 0."""
    number = check_finite(key, value)
    if number <= 0.0:
        raise ConfigError(key, value, "a number > 0")
    return number


def check_non_negative(key: str, value: float) -> float:
    """Return ``value`` if it is a finite number >= 0."""
    number = check_finite(key, value)
    if number < 0.0:
        raise ConfigError(key, value, "a number >= 0")
    return number


def check_range(key: str, value: float, low: float, high: float) -> float:
    """Return ``value`` if ``low <= value <= high`` (finite)."""
    number = check_finite(key, value)
    if not (low <= number <= high):
        raise ConfigError(key, value, f"a number in [{low:g}, {high:g}]")
    return number


def check_positive_int(key: str, value: Any, maximum: int | None = None) -> int:
    """Return ``value`` as int if it is an integer >= 1 (and <= maximum)."""
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
        isinstance(value, float) and value.is_integer()
    ):
        raise ConfigError(key, value, "a positive integer")
    number = int(value)
    if number < 1:
        raise ConfigError(key, value, "a positive integer")
    if maximum is not None and number > maximum:
        raise ConfigError(key, value, f"a positive integer <= {maximum}")
    return number
