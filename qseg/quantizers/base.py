"""What every quantizer shares: the module base class, the grid description used
by the exporters, the straight-through autograd function and argument checks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qseg.errors import QuantizerError

__all__ = ["MAX_BITS", "QuantSpec", "Quantizer", "straight_through"]

#: Widest magnitude (integer + fraction) any uniform quantizer accepts. Integer
#: codes of this width are exact in float32 (24-bit significand), so a quantized
#: float32 tensor and its integer codes describe the same values.
MAX_BITS = 16


@dataclass(frozen=True)
class QuantSpec:
    """The uniform integer grid a quantizer's output lies on.

    A quantized value ``y`` equals ``(code - zero_point) * scale`` for an integer
    ``code`` in ``[qmin, qmax]``. ``scale`` is a 0-d tensor (per tensor) or a 1-d
    tensor with one entry per slice along ``axis`` (per channel), always positive:
    a data-dependent scale that comes out 0 (an all-zero tensor or slice, whose
    values are all 0) is stored as 1 with codes 0. This is what the exporters turn
    into ONNX QuantizeLinear/DequantizeLinear pairs.

    Example:
        >>> import torch
        >>> spec = QuantSpec(scale=torch.tensor([0.5, 0.25]), zero_point=0, qmin=-3, qmax=3, axis=0)
        >>> y = torch.tensor([[1.0, -0.5], [0.25, 0.75]])   # row i on the grid of step scale[i]
        >>> spec.codes(y).tolist()
        [[2, -1], [1, 3]]
        >>> torch.equal(spec.dequantize(spec.codes(y)), y)
        True
    """

    scale: torch.Tensor
    zero_point: int
    qmin: int
    qmax: int
    axis: int | None = None

    def __post_init__(self) -> None:
        scale = torch.where(self.scale == 0, torch.ones_like(self.scale), self.scale)
        object.__setattr__(self, "scale", scale)

    def _broadcast_scale(self, like: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(device=like.device)
        if self.axis is None:
            return scale
        shape = [1] * like.dim()
        shape[self.axis] = -1
        return scale.reshape(shape)

    def codes(self, y: torch.Tensor) -> torch.Tensor:
        """Integer codes (as an int64 tensor) of a tensor that lies on this grid.

        Example:
            >>> import torch
            >>> from qseg.quantizers import FixedPoint
            >>> q = FixedPoint(0, 2)
            >>> q.spec().codes(q(torch.tensor([0.3, -0.8, 2.0])))   # step 0.25, codes in [-3, 3]
            tensor([ 1, -3,  3])
        """
        scale = self._broadcast_scale(y)
        return torch.round(y.to(scale.dtype) / scale).to(torch.int64) + self.zero_point

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Values of integer codes: ``(codes - zero_point) * scale``.

        Example:
            >>> import torch
            >>> spec = QuantSpec(scale=torch.tensor(0.25), zero_point=0, qmin=-3, qmax=3)
            >>> spec.dequantize(torch.tensor([1, -3, 3]))
            tensor([ 0.2500, -0.7500,  0.7500])
        """
        scale = self._broadcast_scale(codes)
        return (codes - self.zero_point).to(scale.dtype) * scale


class Quantizer(nn.Module):
    """Base class of qseg's quantizers.

    A quantizer maps a tensor onto its grid in ``forward`` and passes a
    straight-through gradient in backward. Subclasses declare how many bits a
    stored value really needs (:attr:`bits`, sign included) and describe their
    grid for export (:meth:`spec`). All state lives in buffers, so ``state_dict``
    round-trips and loads with ``torch.load(weights_only=True)``.

    Half-precision inputs (float16, bfloat16) are quantized in float32 and the
    result cast back, so the output is the grid value rounded to the input's
    dtype. A NaN input gives NaN at that position (quantizers whose grid depends
    on the whole tensor, such as :class:`Ternary`, give NaN everywhere), never a
    silent number.

    Example:
        >>> import torch
        >>> from qseg.quantizers import FixedPoint, Ternary
        >>> x = torch.tensor([0.3, -0.8, 0.05])
        >>> for q in (FixedPoint(0, 2), Ternary()):
        ...     print(type(q).__name__, q.bits, q.spec(x).codes(q(x)).tolist())
        FixedPoint 3 [1, -3, 0]
        Ternary 2 [1, -1, 0]
    """

    # What the rest of qseg asks a quantizer instead of testing its class. Each has a
    # neutral default here; a subclass overrides what differs (a class attribute, or a
    # property where the answer depends on its arguments). See docs/quantizers.md,
    # "Adding a quantizer kind".

    #: The grid holds negative values (an unsigned ``FixedPoint``, a ``Uniform`` in
    #: ``unsigned`` mode do not).
    signed: bool = True
    #: The grid is fixed by the arguments, not a statistic of the tensor: tensors that
    #: meet at a concatenation or an addition can share it, so it may quantize activations.
    fixed_grid: bool = False
    #: The grid's range is set from observed values by :func:`qseg.calibrate` through
    #: :meth:`observe_range` (``Uniform``).
    calibrated: bool = False
    #: On activations it is the activation function itself (BNN's sign, TernaryNet's
    #: ternary tanh): ``prepare`` removes the ReLU it stands in for.
    nonlinearity: bool = False
    #: It follows the training progress: training loops call :meth:`anneal` every epoch.
    annealed: bool = False
    #: The float weights it quantizes are kept in ``[-1, 1]`` after every optimizer step
    #: (BNN, paper A), where its straight-through gradient is not zero.
    clips_latent_weights: bool = False
    #: Set by ``prepare`` on an activation quantizer whose input nothing reads after it (its
    #: only user in the graph, made by an op whose backward does not keep it): a kind that
    #: can (``Uniform``) then quantizes in the input's own buffer while training, which
    #: spares a full-size allocation per step. Off for a quantizer used on its own.
    overwrites_input: bool = False
    #: Its training path can also give the gradient of a ReLU that reads its output
    #: (``Uniform``; :func:`~qseg.quantizers.fused.ste_fake_quant`'s ``relu``).
    can_absorb_relu: bool = False
    #: Set by ``prepare`` on an unsigned activation quantizer whose only reader is a ReLU
    #: module: while training it gives that ReLU's gradient too, and the ReLU (made a
    #: :class:`~qseg.nn.ReLUAfterQuant`) passes its output on untouched, since a grid
    #: from 0 leaves it nothing to rectify.
    absorbs_relu: bool = False

    @property
    def bits(self) -> int:
        """Bits one stored value needs, sign included."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        """A short name for tables (``Q0.4``, ``int8/ch``, ``ternary``); the class name
        unless a subclass says better."""
        return type(self).__name__

    @property
    def activation_grid(self) -> bool:
        """True when the quantizer can stand on activations: a fixed grid, or a grid set
        by calibration."""
        return self.fixed_grid or self.calibrated

    @property
    def range_set(self) -> bool:
        """False while a grid that comes from data (a calibrated one) is still unset."""
        return True

    def observe_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:  # noqa: ARG002
        """Set the grid so that it covers ``[lo, hi]``: what :func:`qseg.calibrate` does to
        quantizers that are :attr:`calibrated`; the others refuse.

        Example:
            >>> import torch
            >>> from qseg.quantizers import FixedPoint
            >>> FixedPoint(0, 4).observe_range(torch.tensor(0.0), torch.tensor(1.0))
            Traceback (most recent call last):
            ...
            qseg.errors.QuantizerError: FixedPoint's grid is not calibrated: it has no range to set
        """
        raise QuantizerError(f"{type(self).__name__}'s grid is not calibrated: it has no range to set")

    def frozen_spec(self) -> QuantSpec | None:
        """The grid an activation quantizer freezes into for deployment
        (``qseg.convert``'s ``FrozenActQuant``), or ``None`` when its forward is not
        ``clamp(round(x / scale) + zero_point, qmin, qmax)`` on a fixed grid, exactly.

        Example:
            >>> from qseg.quantizers import Binary, FixedPoint
            >>> FixedPoint(6, 0, signed=False).frozen_spec()
            QuantSpec(scale=tensor(1.), zero_point=0, qmin=0, qmax=63, axis=None)
            >>> Binary().frozen_spec() is None               # sign(0) = +1 is not a rounding
            True
        """
        return None

    def grid_values(self, x: torch.Tensor) -> torch.Tensor:
        """Every value the quantizer can output for ``x`` (float64, maybe repeated, in
        no particular order): by default the values of :meth:`spec`'s grid, or, without
        a uniform grid, the values ``self(x)`` takes. Used to draw the grid
        (:func:`qseg.plots.quantizer_grid`).

        Example:
            >>> import torch
            >>> from qseg.quantizers import FixedPoint
            >>> FixedPoint(0, 1).grid_values(torch.zeros(2))
            tensor([-0.5000,  0.0000,  0.5000], dtype=torch.float64)
        """
        spec = self.spec(x)
        if spec is None:
            return self(x).detach().double().flatten()
        codes = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.int64) - spec.zero_point
        return torch.outer(spec.scale.double().flatten(), codes.double()).ravel()

    def anneal(self, progress: float) -> float | None:  # noqa: ARG002
        """Follow the training progress in ``[0, 1]``; nothing unless :attr:`annealed`.

        Example:
            >>> from qseg.quantizers import FixedPoint, TernaryTanh
            >>> FixedPoint(0, 4).anneal(0.5) is None, TernaryTanh(3.0, 8.0).anneal(0.5)
            (True, 5.5)
        """
        return None

    def learned_range(self) -> list[nn.Parameter]:
        """The parameters of the grid that training learns (LSQ's scale), which
        :func:`qseg.training_hooks` freezes late in training; none by default.

        Example:
            >>> from qseg.quantizers import FixedPoint, Uniform
            >>> FixedPoint(0, 4).learned_range(), Uniform(4, learn_scale=True).learned_range()
            ([], [Parameter containing:
            tensor(1., requires_grad=True)])
        """
        return []

    def init_from(self, x: torch.Tensor, reset: bool = False) -> None:
        """Set a grid that comes from the data from ``x``, if it is not set yet (or
        always, with ``reset``); quantizers whose grid is fixed by their arguments do
        nothing.

        Example:
            >>> import torch
            >>> from qseg.quantizers import FixedPoint, Uniform
            >>> FixedPoint(0, 4).init_from(torch.ones(3))        # nothing to set
            >>> q = Uniform(8)
            >>> q.init_from(torch.tensor([0.5, -1.27]))
            >>> q.scale
            tensor(0.0100)
        """

    def spec(self, x: torch.Tensor) -> QuantSpec | None:
        """The integer grid ``self(x)`` lies on, or ``None`` when it is not uniform.

        ``x`` is the tensor that will be quantized: quantizers whose grid depends
        on the data (ternary scale, DoReFa) need it; the others ignore it.

        Example:
            >>> import torch
            >>> from qseg.quantizers import Ternary
            >>> q, w = Ternary(), torch.tensor([0.9, -0.6, 0.1, -0.05])
            >>> spec = q.spec(w)                  # alpha = mean(|w| : |w| > 0.7 E|w|)
            >>> spec.scale, spec.qmin, spec.qmax
            (tensor(0.7500), -1, 1)
            >>> torch.equal(spec.dequantize(spec.codes(q(w))), q(w))
            True
        """
        raise NotImplementedError


class _StraightThrough(torch.autograd.Function):
    """Returns ``q`` in forward; passes the incoming gradient to ``x`` in backward,
    multiplied by ``mask`` where one is given."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None):  # noqa: ARG004
        ctx.has_mask = mask is not None
        if mask is not None:
            ctx.save_for_backward(mask)
        # a fresh tensor object over the same memory: returning the input itself makes
        # autograd treat the output as a view, and an in-place op after the quantizer
        # (ReLU(inplace=True), common in backbones) would then be refused
        return q.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.has_mask:
            (mask,) = ctx.saved_tensors
            grad = grad * mask
        return grad, None, None


def straight_through(x: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``q`` in the forward pass, with the gradient of the identity (times ``mask``)
    flowing to ``x``.

    ``q`` must be computed from ``x`` without autograd. Unlike the common
    ``x + (q - x).detach()``, the forward value is exactly ``q`` (no float
    cancellation, and an infinite ``x`` does not turn into NaN).

    Example:
        >>> import torch
        >>> x = torch.tensor([0.4, 1.6, 3.0], requires_grad=True)
        >>> y = straight_through(x, torch.round(x.detach()), mask=torch.tensor([1.0, 1.0, 0.0]))
        >>> y.tolist()
        [0.0, 2.0, 3.0]
        >>> y.sum().backward()
        >>> x.grad                            # identity, zeroed where the mask is 0
        tensor([1., 1., 0.])
    """
    return _StraightThrough.apply(x, q, mask)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a quantizer computes in: float32 for half types, else the input's."""
    if not x.is_floating_point():
        raise QuantizerError(f"quantizers take floating-point tensors, got dtype {x.dtype}")
    if x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi]``, or a QuantizerError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise QuantizerError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise QuantizerError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_choice(name: str, value: object, choices: tuple) -> object:
    """``value`` if it is one of ``choices``, else a QuantizerError naming ``name``."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise QuantizerError(f"{name} must be one of {allowed}; got {value!r}")
    return value


def check_axis(name: str, axis: int | None) -> int | None:
    """A channel axis: ``None`` (per tensor) or a non-negative int."""
    if axis is None:
        return None
    return check_int(name, axis, 0, 7)
