"""Fixed point ``Q i.f`` of paper A (AskariHemmat et al. 2019), made well-behaved.

qseg's default (``overflow="saturate"``): step ``2^-f``, round to nearest with
ties to even, magnitude saturating at ``2^i - 2^-f``, sign-magnitude (so the grid
is symmetric). ``overflow="wrap"`` reproduces the published formula bit for bit,
defects included; it exists to reproduce the paper, not to train new models.
"""

from __future__ import annotations

from typing import Literal

import torch

from qseg.errors import QuantizerError
from qseg.quantizers.base import (
    MAX_BITS,
    Quantizer,
    QuantSpec,
    check_choice,
    check_int,
    compute_dtype,
    straight_through,
)
from qseg.quantizers.registry import register_kind

__all__ = ["FixedPoint"]

Overflow = Literal["saturate", "wrap"]
Ste = Literal["clipped", "identity"]


class FixedPoint(Quantizer):
    """Fixed point with ``int_bits`` integer and ``frac_bits`` fraction bits.

    Args:
        int_bits: integer bits ``i`` (0 for pure fractions, as in paper A's Qw0.4).
        frac_bits: fraction bits ``f``; the step is ``2^-f``.
        signed: sign-magnitude when True (one more stored bit); when False,
            negative inputs clamp to 0, so an unsigned ``Q6.0`` is a quantized ReLU
            with the 64 levels ``0..63``.
        overflow: ``"saturate"`` (default) clamps the magnitude at ``2^i - 2^-f``.
            ``"wrap"`` is paper A's published formula: the integer part saturates
            at ``2^i - 1`` but the fraction is kept, so the map is not monotone at
            ``|x| >= 2^i`` (at Q0.4, 1.3 becomes 0.3125), and the fraction may round
            up to 1.0 without carrying (0.97 becomes 1.0), one level more than the
            paper counts.
        ste: gradient in backward. ``"clipped"`` (default) passes the gradient
            where the input lies inside the representable range (after rounding)
            and zero where it saturates, like ``torch.fake_quantize_*``;
            ``"identity"`` passes it everywhere, as paper A's code does.

    Example:
        >>> import torch
        >>> q = FixedPoint(0, 4)                       # paper A's Qw0.4
        >>> q(torch.tensor([0.30, -0.97, 1.30]))
        tensor([ 0.3125, -0.9375,  0.9375])
        >>> q.bits                                     # the sign needs a bit too
        5
    """

    fixed_grid = True

    def __init__(
        self,
        int_bits: int,
        frac_bits: int,
        signed: bool = True,
        overflow: Overflow = "saturate",
        ste: Ste = "clipped",
    ) -> None:
        super().__init__()
        self.int_bits = check_int("int_bits", int_bits, 0, MAX_BITS)
        self.frac_bits = check_int("frac_bits", frac_bits, 0, MAX_BITS)
        if not 1 <= int_bits + frac_bits <= MAX_BITS:
            raise QuantizerError(
                f"int_bits + frac_bits must be in [1, {MAX_BITS}], got {int_bits} + {frac_bits}"
            )
        if not isinstance(signed, bool):
            raise QuantizerError(f"signed must be True or False, got {signed!r}")
        self.signed = signed
        self.overflow = check_choice("overflow", overflow, ("saturate", "wrap"))
        self.ste = check_choice("ste", ste, ("clipped", "identity"))

    @property
    def label(self) -> str:
        """``Q i.f``, with `` unsigned`` and `` wrap`` where they apply: ``Q0.4``, ``Q6.0 unsigned``."""
        text = f"Q{self.int_bits}.{self.frac_bits}" + ("" if self.signed else " unsigned")
        return text + (" wrap" if self.overflow == "wrap" else "")

    @property
    def step(self) -> float:
        """Distance between neighbouring levels: ``2^-frac_bits``."""
        return 2.0**-self.frac_bits

    @property
    def max_code(self) -> int:
        """Largest integer code magnitude the forward can produce."""
        if self.overflow == "wrap":
            # the unsaturated fraction can reach 1.0 on top of the largest integer part
            return 2 ** (self.int_bits + self.frac_bits)
        return 2 ** (self.int_bits + self.frac_bits) - 1

    @property
    def bits(self) -> int:
        return self.max_code.bit_length() + int(self.signed)

    def spec(self, x: torch.Tensor | None = None) -> QuantSpec:  # noqa: ARG002
        """Codes in ``[-max_code, max_code]`` (``[0, max_code]`` unsigned) with scale ``2^-f``;
        ``x`` is not needed.

        Example:
            >>> FixedPoint(0, 4).spec()
            QuantSpec(scale=tensor(0.0625), zero_point=0, qmin=-15, qmax=15, axis=None)
            >>> FixedPoint(6, 0, signed=False).spec().qmin, FixedPoint(6, 0, signed=False).spec().qmax
            (0, 63)
        """
        qmin = -self.max_code if self.signed else 0
        return QuantSpec(scale=torch.tensor(self.step), zero_point=0, qmin=qmin, qmax=self.max_code)

    def frozen_spec(self) -> QuantSpec | None:
        """:meth:`spec` in saturate mode, where the forward is ``clamp(round(x / 2^-f))``;
        ``None`` in wrap mode, whose published formula is not that.

        Example:
            >>> FixedPoint(0, 4).frozen_spec().qmax, FixedPoint(0, 4, overflow="wrap").frozen_spec()
            (15, None)
        """
        return self.spec() if self.overflow == "saturate" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        hi = 2 ** (self.int_bits + self.frac_bits) - 1
        lo = -hi if self.signed else 0
        with torch.no_grad():
            xc = x.detach().to(dtype)
            codes = torch.round_(xc * 2.0**self.frac_bits)
            mask = None
            if self.overflow == "saturate":
                q = codes.clamp(lo, hi)
                if self.ste == "clipped":
                    # clamping changed nothing exactly where the value is representable
                    mask = q == codes
                q.mul_(self.step)
            else:
                if self.ste == "clipped":
                    mask = (codes >= lo) & (codes <= hi)
                q = self._published(xc)
        return straight_through(x, q.to(x.dtype), mask)

    def _published(self, x: torch.Tensor) -> torch.Tensor:
        """Paper A's formula: ``sign(x) * (quantize(x_i, i) + quantize(x_f, f))``."""
        if not self.signed:
            x = x.clamp(min=0)
        mag = x.abs()
        whole = torch.floor(mag)
        frac = mag - whole
        whole_q = whole.clamp(max=2**self.int_bits - 1)
        # clamp(x_f, f) = min(x_f, 2^f - 1) never binds for a fraction < 1 once f >= 1;
        # for f = 0 the bound is 0, which drops the fraction (truncation toward zero)
        frac_q = torch.round(frac.clamp(max=2**self.frac_bits - 1) * 2.0**self.frac_bits) * self.step
        return torch.sign(x) * (whole_q + frac_q)

    def extra_repr(self) -> str:
        parts = [f"int_bits={self.int_bits}", f"frac_bits={self.frac_bits}", f"signed={self.signed}"]
        if self.overflow != "saturate":
            parts.append(f"overflow={self.overflow!r}")
        if self.ste != "clipped":
            parts.append(f"ste={self.ste!r}")
        return ", ".join(parts)


register_kind(
    "fixed_point",
    FixedPoint,
    required=("int_bits", "frac_bits"),
    optional=("signed", "overflow", "ste"),
    as_signed=lambda params: {**params, "signed": True},
)
