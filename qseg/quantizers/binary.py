"""One-bit quantizers: BNN's sign (paper A's BNN baseline) and DoReFa's mean-scaled
sign for 1-bit weights (paper B's DoReFa baseline)."""

from __future__ import annotations

from typing import Literal

import torch

from qseg.errors import QuantizerError
from qseg.quantizers.base import Quantizer, QuantSpec, check_choice, compute_dtype, straight_through
from qseg.quantizers.registry import register_kind

__all__ = ["Binary"]


def sign_plus(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` with 0 mapped to +1, NaN kept: exactly two finite values."""
    return torch.where(x >= 0, 1.0, torch.where(torch.isnan(x), x, -1.0))


def mean_abs(x: torch.Tensor) -> torch.Tensor:
    """``E|x|`` over the whole tensor, as a 0-d tensor of ``x``'s dtype (detached).

    Accumulated in float64: a float32 sum of large weights can overflow where the
    mean itself is representable."""
    return x.detach().abs().mean(dtype=torch.float64).to(x.dtype)


def scaled_codes(
    quantizer: Quantizer, x: torch.Tensor, codes: tuple[float, ...], axis: int | None
) -> torch.Tensor:
    """``codes`` times each scale ``quantizer(x)`` shows (its largest magnitude, per slice
    along ``axis``): the exact levels of a ``code * scale`` grid, also where a scale is 0."""
    with torch.no_grad():
        magnitude = quantizer(x.detach()).double().abs()
    if axis is None:
        scales = magnitude.max().reshape(1)
    else:
        scales = magnitude.amax(dim=[d for d in range(x.dim()) if d != axis])
    return torch.outer(scales, torch.tensor(codes, dtype=torch.float64)).ravel()


class Binary(Quantizer):
    """Binarizes to ``{-1, +1}`` (``scale="none"``) or ``{-E|x|, +E|x|}`` (``scale="mean"``).

    ``scale="none"`` is BNN (Hubara et al. 2016): ``sign(x)`` with ``sign(0) = +1``
    and gradient ``g * 1[|x| <= 1]``; use it for weights and activations.
    ``scale="mean"`` is DoReFa's 1-bit weight: ``sign(x) * E|x|`` with the mean
    taken over the whole tensor and held constant in backward, gradient the
    identity (a NaN anywhere makes every output NaN).

    Paper A's BNN also clips the latent float weights to [-1, 1] after each
    optimizer step; that belongs to the training recipe, not to this module.

    Example:
        >>> import torch
        >>> Binary()(torch.tensor([0.3, -2.0, 0.0]))
        tensor([ 1., -1.,  1.])
        >>> Binary(scale="mean")(torch.tensor([0.5, -1.0, 1.5]))
        tensor([ 1., -1.,  1.])
    """

    nonlinearity = True

    def __init__(self, scale: Literal["none", "mean"] = "none") -> None:
        super().__init__()
        self.scale = check_choice("scale", scale, ("none", "mean"))

    @property
    def bits(self) -> int:
        return 1

    @property
    def label(self) -> str:
        """``binary``, or ``binary x mean`` with ``scale="mean"``."""
        return "binary x mean" if self.scale == "mean" else "binary"

    @property
    def fixed_grid(self) -> bool:
        """True for ``scale="none"`` (``{-1, +1}``); the mean scale is a statistic of the tensor."""
        return self.scale == "none"

    @property
    def clips_latent_weights(self) -> bool:
        """True for BNN's ``scale="none"``: its gradient is zero outside ``[-1, 1]``."""
        return self.scale == "none"

    def grid_values(self, x: torch.Tensor) -> torch.Tensor:
        """``+-1`` times the level ``self(x)`` reaches (1, or ``E|x|``; 0 for an all-zero tensor).

        Example:
            >>> import torch
            >>> Binary(scale="mean").grid_values(torch.tensor([0.5, -1.0, 1.5])).tolist()
            [-1.0, 1.0]
        """
        return scaled_codes(self, x, (-1.0, 1.0), None)

    def spec(self, x: torch.Tensor | None = None) -> QuantSpec:
        """Codes ``{-1, +1}`` with scale 1 (``scale="none"``) or ``E|x|`` (``scale="mean"``,
        which needs ``x``).

        Example:
            >>> import torch
            >>> q, w = Binary(scale="mean"), torch.tensor([0.25, -0.5, 0.75])
            >>> spec = q.spec(w)
            >>> spec.scale, spec.codes(q(w)).tolist()
            (tensor(0.5000), [1, -1, 1])
        """
        if self.scale == "none":
            scale = torch.tensor(1.0)
        else:
            if x is None:
                raise QuantizerError("Binary(scale='mean').spec needs the tensor it quantizes")
            scale = mean_abs(x.to(compute_dtype(x)))
        # codes are +-1; 0 lies inside [qmin, qmax] but is never produced
        return QuantSpec(scale=scale, zero_point=0, qmin=-1, qmax=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x.clone()
        dtype = compute_dtype(x)
        with torch.no_grad():
            xc = x.detach().to(dtype)
            q = sign_plus(xc)
            if self.scale == "none":
                mask = (xc.abs() <= 1).to(dtype)
            else:
                q = q * mean_abs(xc)
                mask = None
        return straight_through(x, q.to(x.dtype), mask)

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}"


register_kind("binary", Binary, optional=("scale",))
