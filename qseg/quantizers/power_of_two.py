"""INQ's power-of-two grid (Zhou et al. 2017), as paper B (Xu et al. 2018) uses it.

For a layer with weights ``W`` and ``b`` bits: ``s = max|W|``,
``n1 = floor(log2(4s/3))``, ``n2 = n1 + 1 - 2^(b-1)/2`` and the grid is
``P = {0} U {+-2^p : n2 <= p <= n1}``: ``2^(b-2)`` exponents, ``2^(b-1) + 1``
values, which fit in ``b`` bits.

INQ quantizes a layer in portions (:class:`qseg.inq.Schedule`); the quantizer
holds which entries are already on the grid, so that this state travels with
the model's ``state_dict``.
"""

from __future__ import annotations

import torch

from qseg.errors import QuantizerError
from qseg.quantizers.base import Quantizer, QuantSpec, check_int, compute_dtype, straight_through
from qseg.quantizers.registry import register_kind

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

    *Incremental mode* (INQ's partial quantization, driven by
    :class:`qseg.inq.Schedule`): after :meth:`begin_incremental` only the entries
    of the boolean buffer ``frozen`` are put on the grid and the others pass
    through as they are; the gradient is zero on frozen entries and the identity
    elsewhere. ``frozen`` only grows (:meth:`freeze`), ``stage`` counts the
    freezes, and both travel in the ``state_dict`` (a fresh quantizer takes the
    mask's shape from the checkpoint it loads). Outside incremental mode the
    quantizer quantizes every entry, as described above.

    Args:
        bits: ``b`` in ``[2, 16]``; the grid has ``2^(b-2)`` exponents.

    Example:
        >>> import torch
        >>> q = PowerOfTwo(bits=5)
        >>> q(torch.tensor([0.9, 0.3, -0.1, 0.001]))   # s = 0.9 -> n1 = 0, n2 = -7
        tensor([ 1.0000,  0.2500, -0.1250,  0.0000])
        >>> w = torch.tensor([0.9, 0.3, -0.1, 0.001])
        >>> q.begin_incremental(w)
        >>> q.freeze(torch.tensor([True, False, True, False]))
        >>> q(w)                                       # frozen entries on the grid, the others float
        tensor([ 1.0000,  0.3000, -0.1250,  0.0010])
        >>> q.fully_quantized
        False
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self._bits = check_int("bits", bits, 2, 16)
        self.register_buffer("n1", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("bounds_fixed", torch.tensor(False))
        self.register_buffer("incremental", torch.tensor(False))
        self.register_buffer("stage", torch.tensor(0, dtype=torch.int64))
        # no shape until a schedule names the weight (begin_incremental)
        self.register_buffer("frozen", torch.zeros(0, dtype=torch.bool))

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def label(self) -> str:
        """``INQ b-bit``."""
        return f"INQ {self._bits}-bit"

    @property
    def num_exponents(self) -> int:
        """How many powers of two the grid holds on each side of zero: ``2^(b-2)``."""
        return 2 ** (self._bits - 2)

    def bounds(self, x: torch.Tensor | None = None) -> tuple[int, int]:
        """``(n1, n2)``: the fixed bounds, or those of ``x`` while none are fixed.

        Example:
            >>> PowerOfTwo(bits=5).bounds(torch.tensor([0.9, -0.2]))
            (0, -7)
        """
        if bool(self.bounds_fixed):
            n1 = int(self.n1)
        else:
            if x is None:
                raise QuantizerError("PowerOfTwo.bounds needs a tensor while its bounds are not fixed")
            n1 = self._n1_of(x)
        return n1, n1 + 1 - self.num_exponents

    def fix_bounds(self, x: torch.Tensor) -> tuple[int, int]:
        """Compute ``(n1, n2)`` from ``x`` and keep them for every later call.

        Example:
            >>> q = PowerOfTwo(bits=5)
            >>> q.fix_bounds(torch.tensor([0.9]))
            (0, -7)
            >>> q(torch.tensor([3.0, 0.3]))             # saturates at 2^n1
            tensor([1.0000, 0.2500])
        """
        self.n1.fill_(self._n1_of(x))
        self.bounds_fixed.fill_(True)
        return self.bounds()

    def release_bounds(self) -> None:
        """Go back to computing the bounds from each input.

        Example:
            >>> q = PowerOfTwo(bits=5)
            >>> _ = q.fix_bounds(torch.tensor([0.9]))
            >>> q.release_bounds()
            >>> q(torch.tensor([3.0, 0.3]))             # bounds from this input: n1 = 2
            tensor([4.0000, 0.2500])
        """
        self.bounds_fixed.fill_(False)

    def begin_incremental(self, weight: torch.Tensor) -> None:
        """Enter incremental mode for ``weight``: nothing frozen, stage 0, so the
        output is the input unchanged until :meth:`freeze` adds entries.

        Example:
            >>> q = PowerOfTwo(bits=5)
            >>> w = torch.tensor([0.9, 0.3])
            >>> q.begin_incremental(w)
            >>> q(w), q.frozen
            (tensor([0.9000, 0.3000]), tensor([False, False]))
        """
        self.frozen = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
        self.incremental.fill_(True)
        self.stage.zero_()

    def freeze(self, more: torch.Tensor) -> None:
        """Add the entries of the boolean mask ``more`` to the frozen set and count
        one stage. The set only grows: entries already frozen stay frozen.

        Example:
            >>> q = PowerOfTwo(bits=5)
            >>> q.begin_incremental(torch.zeros(3))
            >>> q.freeze(torch.tensor([True, False, False]))
            >>> q.freeze(torch.tensor([False, False, True]))
            >>> q.frozen, int(q.stage)
            (tensor([ True, False,  True]), 2)
        """
        if not bool(self.incremental):
            raise QuantizerError(
                "PowerOfTwo.freeze needs incremental mode: call begin_incremental(weight) first"
            )
        if more.dtype != torch.bool or more.shape != self.frozen.shape:
            raise QuantizerError(
                f"PowerOfTwo.freeze takes a boolean mask of shape {tuple(self.frozen.shape)}, "
                f"got {more.dtype} of shape {tuple(more.shape)}"
            )
        self.frozen |= more.to(self.frozen.device)
        self.stage += 1

    @property
    def fully_quantized(self) -> bool:
        """Whether the output lies on the grid everywhere: always outside
        incremental mode, inside it only once every entry is frozen."""
        return not bool(self.incremental) or bool(self.frozen.all())

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
        """``None``: powers of two are not a uniform integer grid (exporters keep the
        quantized float weights instead).

        Example:
            >>> PowerOfTwo(bits=5).spec(torch.tensor([0.9])) is None
            True
        """
        return None

    def grid_values(self, x: torch.Tensor) -> torch.Tensor:
        """``0`` and ``+-2^p`` for ``n2 <= p <= n1`` (the fixed bounds, or those of ``x``).

        Example:
            >>> PowerOfTwo(bits=3).grid_values(torch.tensor([0.9])).sort().values.tolist()
            [-1.0, -0.5, 0.0, 0.5, 1.0]
        """
        n1, n2 = self.bounds(x.detach())
        powers = [2.0**p for p in range(n2, n1 + 1)]
        return torch.tensor([0.0, *powers, *(-v for v in powers)], dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x.clone()
        if bool(self.incremental):
            return self._forward_incremental(x)
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

    def _forward_incremental(self, x: torch.Tensor) -> torch.Tensor:
        frozen = self.frozen
        if frozen.shape != x.shape:
            raise QuantizerError(
                f"the INQ mask has shape {tuple(frozen.shape)} but the input {tuple(x.shape)}: "
                "call begin_incremental with the tensor this quantizer quantizes"
            )
        dtype = compute_dtype(x)
        with torch.no_grad():
            xc = x.detach().to(dtype)
            if not bool(frozen.any()):
                # a copy, never the input itself: an in-place op on the output must not
                # reach the weight
                return straight_through(x, xc.clone().to(x.dtype))
            n1, n2 = self.bounds(xc)
            q = torch.where(frozen, self._round(xc, n1, n2), xc)
        return straight_through(x, q.to(x.dtype), (~frozen).to(x.dtype))

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        mask = state_dict.get(prefix + "frozen")
        if isinstance(mask, torch.Tensor) and mask.shape != self.frozen.shape:
            # the mask's shape is the weight's, unknown to a quantizer no schedule has seen
            self.frozen = torch.zeros(mask.shape, dtype=torch.bool, device=self.frozen.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

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
        inq = ""
        if bool(self.incremental):
            share = float(self.frozen.float().mean()) if self.frozen.numel() else 0.0
            inq = f", INQ stage {int(self.stage)}, {share:.1%} frozen"
        return f"bits={self._bits}{fixed}{inq}"


register_kind("power_of_two", PowerOfTwo, required=("bits",))
