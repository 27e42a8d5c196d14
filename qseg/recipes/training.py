"""The training setup a recipe carries: optimizer, schedule, loss, INQ stages and
suggestive annotation.

``qseg.prepare`` does not read these; :func:`qseg.train.fit`, the INQ
:class:`~qseg.inq.Schedule`, :mod:`qseg.active` and ``qseg demo`` do, so a
built-in recipe reproduces a paper's whole setup and a user's own loop can ignore
it. Every field is validated with the key path in the error, as for the rest of
the recipe.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from qseg.errors import RecipeError
from qseg.recipes._checks import _check_keys, _check_str, _error

__all__ = ["Inq", "SuggestiveAnnotation", "Training"]

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("cosine", "constant", "step")
LOSSES = ("dice", "bce", "bce_dice")
UNCERTAINTIES = ("std", "variance")


def _number(path: str, value: object, low: float, high: float, *, integer: bool = False) -> Any:
    """``value`` if it is a number in ``[low, high]`` (an int when ``integer``)."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise _error(path, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
    if not low <= value <= high:
        raise _error(path, f"must be in [{low:g}, {high:g}], got {value!r}")
    return value if integer else float(value)


def _choice(path: str, value: object, allowed: tuple[str, ...]) -> str:
    if _check_str(path, value) not in allowed:
        raise _error(path, f"must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _fractions(path: str, value: object, *, last_is_one: bool) -> tuple[float, ...]:
    """A strictly increasing sequence of fractions in (0, 1]."""
    if not isinstance(value, (list, tuple)):
        raise _error(path, f"expected a list of fractions, got {value!r}")
    out = tuple(_number(f"{path}[{i}]", v, 0.0, 1.0) for i, v in enumerate(value))
    if any(v <= 0.0 for v in out):
        raise _error(path, f"fractions must be > 0, got {list(out)}")
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise _error(path, f"must be strictly increasing, got {list(out)}")
    if last_is_one and (not out or out[-1] != 1.0):
        raise _error(path, f"must end with 1.0 (every weight quantized at the last stage), got {list(out)}")
    if not last_is_one and out and out[-1] >= 1.0:
        raise _error(path, f"must be < 1.0 (fractions of training), got {list(out)}")
    return out


class _Section:
    """from_dict / to_dict for the flat sections below (each field is a plain value)."""

    @classmethod
    def from_dict(cls, data: object, path: str) -> Any:
        names = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
        _check_keys(data, path, names)
        assert isinstance(data, Mapping)
        try:
            return cls(**data)
        except RecipeError as exc:
            raise exc.nested(path) from None

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class Training(_Section):
    """How a paper trained its quantized network; :func:`qseg.train.fit` follows it.

    Args:
        optimizer: ``adam``, ``adamw`` or ``sgd`` (with ``momentum``).
        lr: initial learning rate.
        lr_schedule: ``cosine`` (annealed to 0 over ``epochs``), ``constant``, or
            ``step`` (multiplied by ``lr_drop_factor`` at each fraction of training in
            ``lr_drops``).
        lr_drops: fractions of training, strictly increasing in (0, 1), where a step
            schedule drops the rate.
        lr_drop_factor: the factor of each drop.
        weight_decay: L2 penalty of the optimizer.
        momentum: SGD momentum (ignored by Adam).
        loss: ``dice`` (soft dice), ``bce`` (binary cross-entropy on logits) or
            ``bce_dice`` (their mean, paper A's EM setting).
        epochs: passes over the training set.
        batch_size: images per step.

    Example:
        >>> Training.from_dict({"lr": 5e-4, "lr_schedule": "step", "lr_drops": [0.5]}, "training").lr_at(0.75)
        5e-05
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    lr_drops: tuple[float, ...] = ()
    lr_drop_factor: float = 0.1
    weight_decay: float = 0.0
    momentum: float = 0.9
    loss: str = "dice"
    epochs: int = 200
    batch_size: int = 4

    def __post_init__(self) -> None:
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        object.__setattr__(self, "lr", _number("lr", self.lr, 1e-12, 10.0))
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        object.__setattr__(self, "lr_drops", _fractions("lr_drops", self.lr_drops, last_is_one=False))
        if self.lr_schedule == "step" and not self.lr_drops:
            raise _error("lr_drops", "a step schedule needs at least one drop, e.g. [0.5]")
        if self.lr_schedule != "step" and self.lr_drops:
            raise _error(
                "lr_drops", f"only a step schedule drops the rate; lr_schedule is {self.lr_schedule!r}"
            )
        object.__setattr__(self, "lr_drop_factor", _number("lr_drop_factor", self.lr_drop_factor, 1e-6, 1.0))
        object.__setattr__(self, "weight_decay", _number("weight_decay", self.weight_decay, 0.0, 1.0))
        object.__setattr__(self, "momentum", _number("momentum", self.momentum, 0.0, 0.999))
        _choice("loss", self.loss, LOSSES)
        _number("epochs", self.epochs, 1, 100_000, integer=True)
        _number("batch_size", self.batch_size, 1, 100_000, integer=True)

    def lr_at(self, progress: float) -> float:
        """The learning rate after ``progress`` (0..1) of training.

        Example:
            >>> Training(lr=1e-3).lr_at(0.5)  # cosine: half way down
            0.0005
        """
        if self.lr_schedule == "constant":
            return self.lr
        if self.lr_schedule == "cosine":
            return round(self.lr * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0))), 15)
        drops = sum(progress >= d for d in self.lr_drops)
        return round(self.lr * self.lr_drop_factor**drops, 15)


@dataclass(frozen=True)
class Inq(_Section):
    """Incremental network quantization (paper B): the accumulated portions of each
    layer's weights frozen on the power-of-two grid, stage by stage.

    :func:`qseg.train.fit` splits the recipe's epochs evenly over the stages and
    advances the :class:`qseg.inq.Schedule` before each.

    Example:
        >>> Inq().portions
        (0.5, 0.75, 0.875, 1.0)
    """

    portions: tuple[float, ...] = (0.5, 0.75, 0.875, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "portions", _fractions("portions", self.portions, last_is_one=True))


@dataclass(frozen=True)
class SuggestiveAnnotation(_Section):
    """Suggestive annotation (Yang et al. 2017, as paper B runs it): ``models``
    networks trained on bootstrap samples rank the unlabelled pool by uncertainty;
    of the ``candidates`` most uncertain images, ``selected`` are chosen by greedy
    max-cover of descriptor similarity.

    Example:
        >>> SuggestiveAnnotation().selected
        8
    """

    models: int = 5
    candidates: int = 16
    selected: int = 8
    uncertainty: str = "std"

    def __post_init__(self) -> None:
        _number("models", self.models, 2, 1000, integer=True)
        _number("candidates", self.candidates, 1, 1_000_000, integer=True)
        _number("selected", self.selected, 1, 1_000_000, integer=True)
        if self.selected > self.candidates:
            raise _error("selected", f"cannot select {self.selected} of {self.candidates} candidates")
        _choice("uncertainty", self.uncertainty, UNCERTAINTIES)
