"""DoReFa-Net k-bit weights (Zhou et al. 2016), paper B's DoReFa baseline."""

from __future__ import annotations

import torch

from qseg.quantizers.base import Quantizer, QuantSpec, check_int, compute_dtype, straight_through
from qseg.quantizers.binary import Binary
from qseg.quantizers.registry import register_kind

__all__ = ["DoReFa"]


class DoReFa(Quantizer):
    """DoReFa weights: ``w' = tanh(w) / (2 max|tanh(w)|) + 0.5``,
    ``q = round(w' (2^k - 1)) / (2^k - 1)``, output ``2q - 1``.

    The ``2^k`` levels are odd multiples of ``1/(2^k - 1)`` in ``[-1, 1]`` (no zero).
    qseg computes the output as ``code * scale`` with the odd integer
    ``code = 2 round(w' (2^k - 1)) - (2^k - 1)`` and ``scale = 1/(2^k - 1)`` rounded
    once to the compute dtype, so the exported codes reproduce it exactly; this
    differs from evaluating ``2q - 1`` literally by at most one float rounding.
    The gradient is straight-through at the rounding only and flows through
    ``tanh`` and the max, as in DoReFa. ``bits=1`` is DoReFa's special case
    ``sign(w) * E|w|``, computed by :class:`Binary` with ``scale="mean"``.
    A NaN anywhere makes every output NaN (the max defines the grid).

    Args:
        bits: ``k`` in ``[1, 16]``.

    Example:
        >>> import torch
        >>> DoReFa(2)(torch.tensor([-1.0, -0.1, 0.1, 1.0]))
        tensor([-1.0000, -0.3333,  0.3333,  1.0000])
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self._bits = check_int("bits", bits, 1, 16)
        self._binary = Binary(scale="mean") if bits == 1 else None

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def label(self) -> str:
        """``DoReFa k-bit``."""
        return f"DoReFa {self._bits}-bit"

    @property
    def levels(self) -> int:
        """``2^k - 1``: the number of steps between -1 and +1."""
        return 2**self._bits - 1

    def spec(self, x: torch.Tensor | None = None) -> QuantSpec:
        """Odd codes in ``[-(2^k - 1), 2^k - 1]`` with scale ``1 / (2^k - 1)``; for ``k = 1``
        the grid of ``Binary(scale="mean")``, which needs ``x``.

        Example:
            >>> import torch
            >>> q, w = DoReFa(2), torch.tensor([-1.0, -0.1, 0.1, 1.0])
            >>> spec = q.spec(w)
            >>> spec.qmin, spec.qmax, spec.codes(q(w)).tolist()
            (-3, 3, [-3, -1, 1, 3])
        """
        if self._binary is not None:
            return self._binary.spec(x)
        dtype = torch.float32 if x is None else compute_dtype(x)
        n = self.levels
        return QuantSpec(scale=torch.tensor(1.0 / n, dtype=dtype), zero_point=0, qmin=-n, qmax=n)

    def grid_values(self, x: torch.Tensor) -> torch.Tensor:
        """The ``2^k`` odd multiples of ``1 / (2^k - 1)`` (no zero); for ``k = 1`` the two
        levels of ``Binary(scale="mean")`` for ``x``.

        Example:
            >>> import torch
            >>> [round(v, 4) for v in DoReFa(2).grid_values(torch.zeros(1)).tolist()]
            [-1.0, -0.3333, 0.3333, 1.0]
        """
        if self._binary is not None:
            return self._binary.grid_values(x)
        n = self.levels
        return torch.arange(-n, n + 1, 2, dtype=torch.float64) * float(self.spec(x).scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._binary is not None:
            return self._binary(x)
        if x.numel() == 0:
            return x.clone()
        n = self.levels
        t = torch.tanh(x.to(compute_dtype(x)))
        # an all-zero tensor has max|tanh| = 0: map it to w' = 0.5 instead of 0/0
        peak = t.abs().max()
        peak = torch.where(peak == 0, torch.ones_like(peak), peak)
        unit = t / (2 * peak) + 0.5
        scaled = unit * n
        j = straight_through(scaled, torch.round(scaled.detach()))
        scale = torch.tensor(1.0 / n, dtype=t.dtype, device=t.device)
        return ((2 * j - n) * scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self._bits}"


register_kind("dorefa", DoReFa, required=("bits",))
