"""INQ's power-of-two grid (Zhou et al. 2017), as paper B (Xu et al. 2018) uses it.

For a layer with weights ``W`` and ``b`` bits: ``s = max|W|``,
``n1 = floor(log2(4s/3))``, ``n2 = n1 + 1 - 2^(b-1)/2`` and the grid is
``P = {0} U {+-2^p : n2 <= p <= n1}``: ``2^(b-2)`` exponents, ``2^(b-1) + 1``
values, which fit in ``b`` bits.
"""

from __future__ import annotations

import torch

from qseg.errors import QuantizerError
from qseg.quantizers.base import Quantizer, QuantSpec, check_int, compute_dtype, straight_through

__all__ = ["PowerOfTwo"]


def nearest_exponent(mag: torch.Tensor) -> torch.Tensor:
    """The integer ``p`` with ``3 * 2^(p-2) <= mag < 3 * 2^(p-1)`` for ``mag > 0``.

    That is ``floor(log2(4 * mag / 3))``, the exponent of the power of two nearest to
    ``mag`` (ties to the larger). Computed from the exact binary exponent, not
    from a rounded logarithm: ``mag = m * 2^e`` with ``m`` in ``[0.5, 1)`` lies
    between ``2^(e-1)`` and ``2^e``, whose midpoint is ``m = 0.75``.
    """
    mantissa, exponent = torch.frexp(mag)
    return exponent.to(torch.int64) - (mantissa < 0.75).to(torch.int64)


class PowerOfTwo(Quantizer):
    """Rounds to the nearest value of INQ's grid ``{0} U {+-2^p : n2 <= p <= n1}``.

    qseg rounds to the *nearest* grid value, ties toward the larger magnitude (as
    the paper's intervals ``3*2^(p-2) <= |w| < 3*2^(p-1)`` do), and saturates at
    ``2^n1``; the rule as printed maps ``|w| >= 3*2^(n1-1)`` to 0, which cannot
    happen for the tensor that defined ``n1`` but can once the bounds are fixed
    and the weights move on.

    The bounds are computed from each input until :meth:`fix_bounds` stores them
    (INQ fixes them when a layer's first portion is quantized); they are buffers,
    so they travel in the ``state_dict``. The gradient is the identity.

    While the bounds come from the input, a NaN or infinite entry leaves no grid
    and the whole output is NaN; an all-zero input stays zero. With fixed bounds,
    infinities saturate to ``+-2^n1`` and a NaN stays a NaN where it is.

    Args:
        bits: ``b`` in ``[2, 16]``; the grid has ``2^(b-2)`` exponents.

    Example:
        >>> import torch
        >>> q = PowerOfTwo(bits=5)
        >>> q(torch.tensor([0.9, 0.3, -0.1, 0.001]))   # s = 0.9 -> n1 = 0, n2 = -7
        tensor([ 1.0000,  0.2500, -0.1250,  0.0000])
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self._bits = check_int("bits", bits, 2, 16)
        self.register_buffer("n1", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("bounds_fixed", torch.tensor(False))

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def num_exponents(self) -> int:
        """How many powers of two the grid holds on each side of zero: ``2^(b-2)``."""
        return 2 ** (self._bits - 2)

    def bounds(self, x: torch.Tensor | None = None) -> tuple[int, int]:
        """``(n1, n2)``: the fixed bounds, or those of ``x`` while none are fixed."""
        if bool(self.bounds_fixed):
            n1 = int(self.n1)
        else:
            if x is None:
                raise QuantizerError("PowerOfTwo.bounds needs a tensor while its bounds are not fixed")
            n1 = self._n1_of(x)
        return n1, n1 + 1 - self.num_exponents

    def fix_bounds(self, x: torch.Tensor) -> tuple[int, int]:
        """Compute ``(n1, n2)`` from ``x`` and keep them for every later call."""
        self.n1.fill_(self._n1_of(x))
        self.bounds_fixed.fill_(True)
        return self.bounds()

    def release_bounds(self) -> None:
        """Go back to computing the bounds from each input."""
        self.bounds_fixed.fill_(False)

    def _n1_of(self, x: torch.Tensor) -> int:
        if x.numel() == 0:
            raise QuantizerError("cannot derive power-of-two bounds from an empty tensor")
        s = x.detach().abs().max().to(compute_dtype(x))
        if not torch.isfinite(s) or s == 0:
            raise QuantizerError(
                f"cannot derive power-of-two bounds: max|x| is {float(s)} "
                "(the tensor is all zero or holds a non-finite value)"
            )
        return int(nearest_exponent(s))

    def spec(self, x: torch.Tensor | None = None) -> QuantSpec | None:  # noqa: ARG002
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x.clone()
        dtype = compute_dtype(x)
        with torch.no_grad():
            xc = x.detach().to(dtype)
            if bool(self.bounds_fixed):
                n1 = int(self.n1)
            else:
                s = xc.abs().max()
                if not torch.isfinite(s):
                    # max|x| defines the grid: without a finite one there is no answer
                    return straight_through(x, torch.full_like(x, float("nan")))
                if s == 0:
                    return straight_through(x, torch.zeros_like(x))
                n1 = int(nearest_exponent(s))
            q = self._round(xc, n1, n1 + 1 - self.num_exponents)
        return straight_through(x, q.to(x.dtype))

    @staticmethod
    def _round(x: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
        mag = x.abs()
        p = nearest_exponent(mag).clamp_(n2, n1)
        p = torch.where(torch.isinf(mag), n1, p)
        power = torch.ldexp(torch.ones_like(mag), p)
        # below 2^(n2-1), the midpoint between 0 and 2^n2, the nearest value is 0; that
        # midpoint can underflow to 0 in the compute dtype, so 0 itself is tested too
        to_zero = (mag < 2.0 ** (n2 - 1)) | (mag == 0)
        q = torch.where(to_zero, torch.zeros_like(mag), power)
        q = torch.copysign(q, x)
        return torch.where(torch.isnan(x), x, q)

    def extra_repr(self) -> str:
        fixed = f", n1={int(self.n1)}" if bool(self.bounds_fixed) else ""
        return f"bits={self._bits}{fixed}"
