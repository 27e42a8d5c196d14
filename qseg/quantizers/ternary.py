"""Ternary quantizers: TWN weights (Li et al. 2016; paper B's TWN, paper A's
TernaryNet weights) and TernaryNet's annealed tanh activation (Heinrich et al. 2018)."""

from __future__ import annotations

import torch

from qseg.errors import QuantizerError
from qseg.quantizers.base import Quantizer, QuantSpec, check_axis, compute_dtype, straight_through
from qseg.quantizers.binary import scaled_codes
from qseg.quantizers.registry import register_kind

__all__ = ["Ternary", "TernaryTanh"]

_TERNARY_CODES = {"zero_point": 0, "qmin": -1, "qmax": 1}


class Ternary(Quantizer):
    """Ternary weight networks: ``delta = 0.7 E|w|``, ``alpha = mean(|w| : |w| > delta)``,
    output ``alpha * sign(w) * 1[|w| > delta]`` in ``{-alpha, 0, +alpha}``.

    Per tensor (paper B) or, with ``channel_axis``, per slice along that axis
    (per output filter, as paper A's and TernaryNet's code do: axis 0 for conv
    and linear weights, 1 for transposed conv). ``delta`` and ``alpha`` are
    statistics of the input and get no gradient; the gradient to ``w`` is the
    identity. A slice with no entry above ``delta`` (all zero) gets ``alpha = 0``.
    A NaN or infinity in a slice makes that slice's output NaN.

    Example:
        >>> import torch
        >>> Ternary()(torch.tensor([0.9, -0.6, 0.1, -0.05]))   # delta = 0.2275
        tensor([ 0.7500, -0.7500,  0.0000, -0.0000])
    """

    def __init__(self, channel_axis: int | None = None) -> None:
        super().__init__()
        self.channel_axis = check_axis("channel_axis", channel_axis)

    @property
    def bits(self) -> int:
        return 2

    @property
    def label(self) -> str:
        """``ternary``, or ``ternary/axis a`` per channel."""
        return "ternary" if self.channel_axis is None else f"ternary/axis {self.channel_axis}"

    def grid_values(self, x: torch.Tensor) -> torch.Tensor:
        """``-alpha, 0, alpha`` for each ``alpha`` of ``x`` (per slice along ``channel_axis``).

        Example:
            >>> import torch
            >>> Ternary(channel_axis=0).grid_values(torch.tensor([[0.9, -0.6], [0.5, 0.5]])).tolist()
            [-0.75, 0.0, 0.75, -0.5, 0.0, 0.5]
        """
        return scaled_codes(self, x, (-1.0, 0.0, 1.0), self.channel_axis)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(delta, alpha)``, shaped to broadcast against ``x``."""
        mag = x.abs()
        if self.channel_axis is None:
            dims = tuple(range(x.dim()))
        else:
            if self.channel_axis >= x.dim():
                raise QuantizerError(
                    f"channel_axis={self.channel_axis} is out of range for a tensor of shape {tuple(x.shape)}"
                )
            dims = tuple(d for d in range(x.dim()) if d != self.channel_axis)
        # statistics accumulate in float64: a float32 sum of large weights can
        # overflow where the mean itself is representable
        delta = 0.7 * mag.mean(dim=dims, keepdim=True, dtype=torch.float64)
        above = mag > delta
        count = above.sum(dim=dims, keepdim=True).clamp(min=1)
        alpha = (mag * above).sum(dim=dims, keepdim=True, dtype=torch.float64) / count
        alpha = torch.where(torch.isfinite(delta), alpha, torch.full_like(alpha, float("nan")))
        return delta, alpha.to(x.dtype)

    def spec(self, x: torch.Tensor | None = None) -> QuantSpec:
        """Codes ``{-1, 0, 1}`` with scale ``alpha`` of ``x``: a 0-d tensor, or one entry per
        slice along ``channel_axis``.

        Example:
            >>> import torch
            >>> q = Ternary(channel_axis=0)
            >>> w = torch.tensor([[0.9, -0.6, 0.1, -0.05], [0.2, 0.2, 0.2, 0.2]])
            >>> spec = q.spec(w)
            >>> spec.scale, spec.axis
            (tensor([0.7500, 0.2000]), 0)
            >>> spec.codes(q(w)).tolist()
            [[1, -1, 0, 0], [1, 1, 1, 1]]
        """
        if x is None:
            raise QuantizerError("Ternary.spec needs the tensor it quantizes")
        with torch.no_grad():
            _, alpha = self._stats(x.detach().to(compute_dtype(x)))
        if self.channel_axis is None:
            return QuantSpec(scale=alpha.reshape(()), **_TERNARY_CODES)
        return QuantSpec(scale=alpha.flatten(), axis=self.channel_axis, **_TERNARY_CODES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x.clone()
        with torch.no_grad():
            xc = x.detach().to(compute_dtype(x))
            delta, alpha = self._stats(xc)
            codes = torch.sign(xc) * (xc.abs() > delta)
            q = codes * alpha
        return straight_through(x, q.to(x.dtype))

    def extra_repr(self) -> str:
        return "" if self.channel_axis is None else f"channel_axis={self.channel_axis}"


class TernaryTanh(Quantizer):
    """TernaryNet's activation: ``0.5 tanh(2bx - b) - 0.5 tanh(-2bx - b)`` in training,
    ``sign(x) * 1[|x| > 0.5]`` in eval mode.

    The steepness ``b`` (buffer ``beta``) is annealed from ``beta_start`` to
    ``beta_end`` over training by calling :meth:`anneal` with the training
    progress; as ``b`` grows the soft function approaches the hard one. In eval
    mode the output is the hard ternary value and the gradient that of the soft
    function at the current ``b`` (so a model in eval mode can still be
    differentiated, e.g. for saliency).

    Example:
        >>> import torch
        >>> act = TernaryTanh().eval()
        >>> act(torch.tensor([-0.7, 0.2, 0.5, 0.51]))
        tensor([-1.,  0.,  0.,  1.])
    """

    fixed_grid = True
    nonlinearity = True
    annealed = True

    def __init__(self, beta_start: float = 3.0, beta_end: float = 8.0) -> None:
        super().__init__()
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e4:
                raise QuantizerError(f"{name} must be a number in (0, 1e4), got {value!r}")
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.register_buffer("beta", torch.tensor(self.beta_start))

    @property
    def bits(self) -> int:
        return 2

    @property
    def label(self) -> str:
        """``ternary tanh``."""
        return "ternary tanh"

    def anneal(self, progress: float) -> float:
        """Set ``beta`` for training progress in ``[0, 1]`` (linear from start to end); returns it.

        Call it once per epoch (or step) with the fraction of training done.

        Example:
            >>> act = TernaryTanh(beta_start=3.0, beta_end=8.0)
            >>> act.anneal(0.5)
            5.5
            >>> act.beta
            tensor(5.5000)
        """
        if not 0.0 <= progress <= 1.0:
            raise QuantizerError(f"progress must be in [0, 1], got {progress!r}")
        beta = self.beta_start + (self.beta_end - self.beta_start) * progress
        self.beta.fill_(beta)
        return beta

    def spec(self, x: torch.Tensor | None = None) -> QuantSpec:  # noqa: ARG002
        """The eval-mode grid ``{-1, 0, 1}`` with scale 1; ``x`` is not needed.

        Example:
            >>> import torch
            >>> act = TernaryTanh().eval()
            >>> act.spec().codes(act(torch.tensor([-0.7, 0.2, 0.9]))).tolist()
            [-1, 0, 1]
        """
        return QuantSpec(scale=torch.tensor(1.0), **_TERNARY_CODES)

    def frozen_spec(self) -> QuantSpec:
        """The eval-mode grid: ``clamp(round(x))`` to ``{-1, 0, 1}`` is ``sign(x) * 1[|x| > 0.5]``
        (ties to even put 0.5 at 0).

        Example:
            >>> TernaryTanh().frozen_spec()
            QuantSpec(scale=tensor(1.), zero_point=0, qmin=-1, qmax=1, axis=None)
        """
        return self.spec()

    def _soft(self, x: torch.Tensor) -> torch.Tensor:
        b = self.beta.to(x.dtype)
        return 0.5 * torch.tanh(b * (2 * x - 1)) + 0.5 * torch.tanh(b * (2 * x + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self._soft(x.to(compute_dtype(x))).to(x.dtype)
        with torch.no_grad():
            xc = x.detach().to(compute_dtype(x))
            hard = torch.sign(xc) * (xc.abs() > 0.5)
            hard = torch.where(torch.isnan(xc), xc, hard)
            b = self.beta.to(xc.dtype)
            slope = b * (torch.cosh(b * (2 * xc - 1)).pow(-2) + torch.cosh(b * (2 * xc + 1)).pow(-2))
        return straight_through(x, hard.to(x.dtype), slope)

    def extra_repr(self) -> str:
        return f"beta_start={self.beta_start}, beta_end={self.beta_end}"


register_kind("ternary", Ternary, optional=("channel_axis",))
register_kind("ternary_tanh", TernaryTanh, optional=("beta_start", "beta_end"))
