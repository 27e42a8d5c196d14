"""Argument checks shared by the modules of :mod:`qseg.active`, and the option types they check."""

from __future__ import annotations

from typing import Literal

from qseg.errors import AnnotationError

UncertaintyKind = Literal["std", "variance"]
Universe = Literal["pool", "candidates"]


def _check_kind(kind: str) -> None:
    if kind not in ("std", "variance"):
        raise AnnotationError(f"uncertainty must be 'std' or 'variance', got {kind!r}")


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AnnotationError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_universe(universe: str) -> None:
    if universe not in ("pool", "candidates"):
        raise AnnotationError(f"universe must be 'pool' or 'candidates', got {universe!r}")
