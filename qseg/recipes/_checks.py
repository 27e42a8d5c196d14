"""Validation helpers shared by the recipe dataclasses: each error names its key path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qseg.errors import RecipeError


def _error(path: str, message: str) -> RecipeError:
    return RecipeError(message, path)


def _check_keys(data: Mapping[str, Any], path: str, allowed: Sequence[str], required: Sequence[str] = ()):
    if not isinstance(data, Mapping):
        raise _error(path, f"expected a mapping, got {type(data).__name__} {data!r}")
    for key in data:
        if key not in allowed:
            raise _error(f"{path}.{key}" if path else str(key), f"unknown key; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in data:
            raise _error(path, f"missing key {key!r}")


def _check_bool(path: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _error(path, f"expected true or false, got {value!r}")
    return value


def _check_str(path: str, value: object) -> str:
    if not isinstance(value, str):
        raise _error(path, f"expected a string, got {value!r}")
    return value
