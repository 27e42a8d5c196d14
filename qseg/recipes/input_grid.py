"""The grid of the model's input (the recipe's ``input`` key): with it the first layer
reads integer codes, and a model whose first and last layers are quantized too is
integer from its input to its output, so every runtime computes it bit for bit."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qseg.errors import RecipeError
from qseg.quantizers.base import MAX_BITS
from qseg.recipes._checks import _check_keys, _error
from qseg.recipes.quantizer_config import QuantizerConfig

__all__ = ["InputGrid"]


@dataclass(frozen=True)
class InputGrid:
    """The input's grid: ``bits`` stored bits covering ``range`` ``[lo, hi]``.

    The grid is fixed point (a power-of-two step, so that products with the first
    layer's weights stay exact in every runtime and kernel): unsigned when
    ``lo >= 0``, sign-magnitude otherwise, with the finest step whose grid still
    covers ``[lo, hi]``. Values outside the grid clamp to its ends. Raw 8-bit
    microscopy is ``{bits: 8, range: [0, 255]}`` (step 1); an image scaled to
    ``[0, 1]`` is ``{bits: 8, range: [0, 1]}`` (step 1/128); CT in Hounsfield
    units is ``{bits: 16, range: [-1024, 3071]}`` (step 1/8).

    Example:
        >>> InputGrid(8, (0, 255)).config.label, InputGrid(8, (0, 1)).config.label
        ('Q8.0 unsigned', 'Q1.7 unsigned')
        >>> InputGrid(16, (-1024, 3071)).config.label
        'Q12.3'
        >>> InputGrid(8, (-1024, 3071))
        Traceback (most recent call last):
        ...
        qseg.errors.RecipeError: range: 8 bits cannot cover [-1024, 3071] with a step of at most 1 (it needs 13); use more bits or scale the input
    """

    bits: int
    range: tuple[float, float]

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= MAX_BITS:
            raise _error("bits", f"expected an integer in [2, {MAX_BITS}], got {self.bits!r}")
        value = self.range
        if (
            not isinstance(value, (tuple, list))
            or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not all(math.isfinite(v) for v in value)
        ):
            raise _error("range", f"expected two finite numbers [lo, hi], got {value!r}")
        lo, hi = value
        if not lo < hi:
            raise _error("range", f"expected lo < hi, got [{lo}, {hi}]")
        object.__setattr__(self, "range", (lo, hi))
        self.config  # noqa: B018  (validates that the bits can cover the range)

    @property
    def signed(self) -> bool:
        """Whether the grid holds negative values (``lo < 0``)."""
        return self.range[0] < 0

    @property
    def config(self) -> QuantizerConfig:
        """The fixed-point quantizer of this grid."""
        lo, hi = self.range
        magnitude_bits = self.bits - 1 if self.signed else self.bits
        largest = max(abs(lo), abs(hi))
        frac_bits = math.floor(math.log2((2**magnitude_bits - 1) / largest))
        int_bits = magnitude_bits - frac_bits
        if int_bits < 0:  # the range lies inside [-1, 1]: a pure fraction is the finest grid
            int_bits, frac_bits = 0, magnitude_bits
        if frac_bits < 0:
            needed = self.bits
            while (2 ** (needed - 1 if self.signed else needed) - 1) < largest:
                needed += 1
            raise _error(
                "range",
                f"{self.bits} bits cannot cover [{_num(lo)}, {_num(hi)}] with a step of at most 1 "
                f"(it needs {needed}); use more bits or scale the input",
            )
        if frac_bits > MAX_BITS:
            raise _error(
                "range", f"[{_num(lo)}, {_num(hi)}] is too narrow for a step of at least 2^-{MAX_BITS}"
            )
        return QuantizerConfig(
            "fixed_point", {"int_bits": int_bits, "frac_bits": frac_bits, "signed": self.signed}
        )

    def to_dict(self) -> dict[str, Any]:
        """The mapping :meth:`from_dict` reads.

        Example:
            >>> InputGrid(8, (0, 255)).to_dict()
            {'bits': 8, 'range': [0, 255]}
        """
        return {"bits": self.bits, "range": list(self.range)}

    @classmethod
    def from_dict(cls, data: object, path: str) -> InputGrid:
        """Build and validate from ``{bits: 8, range: [0, 255]}``; errors name keys below ``path``.

        Example:
            >>> InputGrid.from_dict({"bits": 8, "range": [0, 1]}, "input").config.label
            'Q1.7 unsigned'
            >>> InputGrid.from_dict({"bits": 8}, "input")
            Traceback (most recent call last):
            ...
            qseg.errors.RecipeError: input: missing key 'range'
        """
        if not isinstance(data, Mapping):
            raise _error(path, f"expected a mapping such as {{bits: 8, range: [0, 255]}}, got {data!r}")
        _check_keys(data, path, ("bits", "range"), ("bits", "range"))
        value = data["range"]
        try:
            return cls(data["bits"], tuple(value) if isinstance(value, list) else value)
        except RecipeError as exc:
            raise exc.nested(path) from None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
