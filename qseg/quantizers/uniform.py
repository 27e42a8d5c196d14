"""Uniform integer grids with a scale set from data: int8 and friends.

The papers' fixed point fixes the step (``2^-f``) by hand. ``Uniform`` keeps the
grid's *shape* fixed (``bits`` codes, symmetric, unsigned or with a zero point)
and finds its *scale* from the tensor: at the first forward, from
:func:`qseg.calibrate`'s statistics, or learned by gradient descent during QAT
(LSQ, Esser et al. 2020). With ``power_of_two_scale`` the scale is rounded up to
a power of two: dynamic fixed point, a per-layer ``Q i.f`` whose fraction length
comes from the data (paper A's hardware story, per layer).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from qseg.errors import QuantizerError
from qseg.quantizers.base import (
    MAX_BITS,
    Quantizer,
    QuantSpec,
    check_axis,
    check_choice,
    check_int,
    compute_dtype,
)
from qseg.quantizers.fused import lsq_fake_quant, ste_fake_quant
from qseg.quantizers.registry import register_kind

__all__ = ["Uniform"]

Mode = Literal["symmetric", "unsigned", "asymmetric"]
#: The smallest step a learned (LSQ) scale keeps: an optimizer step that would take it to 0
#: or below leaves it here.
MIN_LEARNED_SCALE = 1e-8


class Uniform(Quantizer):
    """``bits``-bit integer codes on a uniform grid whose scale comes from the data.

    Args:
        bits: stored bits per value, 2..16.
        mode: ``"symmetric"`` (codes ``-(2^(b-1) - 1) .. 2^(b-1) - 1``, zero point 0:
            weights, and activations of either sign), ``"unsigned"`` (codes
            ``0 .. 2^b - 1``: activations after a ReLU) or ``"asymmetric"`` (codes
            ``0 .. 2^b - 1`` around an integer zero point: activations with a small
            negative part, such as LeakyReLU's or GELU's; per tensor only).
        channel_axis: ``None`` for one scale per tensor, or the axis that gets one
            scale per slice (0: a conv's output channels).
        learn_scale: the scale is a parameter trained with LSQ's gradient and
            gradient scale ``1 / sqrt(numel per scale * qmax)``; otherwise a buffer.
        power_of_two_scale: round every scale set from data up to a power of two
            (dynamic fixed point); not with ``learn_scale``.

    The scale starts unset. :meth:`observe_range` sets it from a range (what
    calibration does); a forward with the scale unset sets it from that tensor's own
    min/max first, so that a quantizer never runs on a made-up grid. Set it before
    building the optimizer: a per-channel scale only gets its shape ``[C]`` then.

    Example:
        >>> import torch
        >>> q = Uniform(8, channel_axis=0)                # int8 per output channel
        >>> w = torch.tensor([[0.5, -1.0], [0.02, 0.01]])
        >>> q(w)                                           # first call: scale max|row| / 127
        tensor([[ 0.5039, -1.0000],
                [ 0.0200,  0.0099]])
        >>> q.spec(w).scale * 127
        tensor([1.0000, 0.0200])
        >>> a = Uniform(4, mode="unsigned")
        >>> a.observe_range(torch.tensor(0.0), torch.tensor(3.0))
        >>> a(torch.tensor([-1.0, 0.15, 1.0, 5.0]))        # step 3/15 = 0.2
        tensor([0.0000, 0.2000, 1.0000, 3.0000])
    """

    calibrated = True
    can_absorb_relu = True

    def __init__(
        self,
        bits: int,
        mode: Mode = "symmetric",
        channel_axis: int | None = None,
        learn_scale: bool = False,
        power_of_two_scale: bool = False,
    ) -> None:
        super().__init__()
        self.num_bits = check_int("bits", bits, 2, MAX_BITS)
        self.mode = check_choice("mode", mode, ("symmetric", "unsigned", "asymmetric"))
        self.channel_axis = check_axis("channel_axis", channel_axis)
        if mode == "asymmetric" and channel_axis is not None:
            raise QuantizerError("mode 'asymmetric' is per tensor: channel_axis must be None")
        for name, value in (("learn_scale", learn_scale), ("power_of_two_scale", power_of_two_scale)):
            if not isinstance(value, bool):
                raise QuantizerError(f"{name} must be True or False, got {value!r}")
        if learn_scale and power_of_two_scale:
            raise QuantizerError(
                "learn_scale and power_of_two_scale exclude each other: a learned scale moves "
                "continuously, a power of two does not"
            )
        self.learn_scale = learn_scale
        self.power_of_two_scale = power_of_two_scale
        if mode == "symmetric":
            self.qmin, self.qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
        else:
            self.qmin, self.qmax = 0, 2**bits - 1
        # unset until observed; shape [] per tensor, [C] per channel once the data shows C
        scale = torch.ones(())
        if learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def label(self) -> str:
        """A short name for tables: ``int8``, ``uint8``, ``int8 asym``, ``int8/ch``, ``int4 LSQ``...

        Example:
            >>> Uniform(8, channel_axis=0).label, Uniform(4, mode="unsigned", learn_scale=True).label
            ('int8/ch', 'uint4 LSQ')
        """
        text = ("uint" if self.mode == "unsigned" else "int") + str(self.num_bits)
        text += " asym" if self.mode == "asymmetric" else ""
        text += "/ch" if self.channel_axis is not None else ""
        text += " LSQ" if self.learn_scale else ""
        return text + (" pow2" if self.power_of_two_scale else "")

    @property
    def bits(self) -> int:
        """Stored bits per value (``bits``; the sign is one of them)."""
        return self.num_bits

    @property
    def signed(self) -> bool:
        """False in ``unsigned`` mode; the asymmetric grid reaches below 0 through its zero point."""
        return self.mode != "unsigned"

    @property
    def activation_grid(self) -> bool:
        """Per tensor only: the scale is set by calibration, one per activation quantizer."""
        return self.channel_axis is None

    @property
    def range_set(self) -> bool:
        """Whether the scale is set (by :meth:`observe_range`, or a first forward)."""
        return bool(self.initialized)

    def learned_range(self) -> list[nn.Parameter]:
        """``[scale]`` when it is learned (``learn_scale``), else ``[]``.

        Example:
            >>> Uniform(8, learn_scale=True).learned_range()[0].requires_grad, Uniform(8).learned_range()
            (True, [])
        """
        return [self.scale] if self.learn_scale else []

    # ---- setting the scale ----------------------------------------------------------------

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-slice (or whole-tensor) min and max of ``x``."""
        x = x.detach()
        if self.channel_axis is None:
            return x.min(), x.max()
        flat = x.transpose(0, self.channel_axis).reshape(x.shape[self.channel_axis], -1)
        return flat.min(dim=1).values, flat.max(dim=1).values

    def observe_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set the grid so that it covers ``[lo, hi]`` (0-d tensors, or one entry per
        channel): the scale, and the zero point in asymmetric mode.

        Symmetric grids cover ``max(|lo|, |hi|)``; unsigned ones ``[0, hi]``;
        asymmetric ones ``[min(lo, 0), max(hi, 0)]`` with the integer zero point that
        puts 0 exactly on the grid. An empty or all-zero range gives scale 1.

        Example:
            >>> import torch
            >>> q = Uniform(8, mode="asymmetric")
            >>> q.observe_range(torch.tensor(-0.3), torch.tensor(2.25))
            >>> round(float(q.scale), 6), int(q.zero_point)            # 2.55 / 255, -0.3 at code 0
            (0.01, 30)
        """
        lo = lo.detach().to(torch.float64)
        hi = hi.detach().to(torch.float64)
        zero_point = torch.zeros((), dtype=torch.int32)
        if self.mode == "symmetric":
            scale = torch.maximum(lo.abs(), hi.abs()) / self.qmax
        elif self.mode == "unsigned":
            scale = hi.clamp(min=0) / self.qmax
        else:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            scale = (hi - lo) / (self.qmax - self.qmin)
        # an empty or all-zero range gets scale 1; a NaN range keeps its NaN (NaN in, NaN out)
        scale = torch.where((scale > 0) | scale.isnan(), scale, torch.ones_like(scale))
        if self.power_of_two_scale:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        if self.mode == "asymmetric":
            zero_point = torch.round(-lo / scale).clamp(self.qmin, self.qmax).to(torch.int32)
        with torch.no_grad():
            value = scale.to(torch.float32).to(self.scale.device)
            if value.shape == self.scale.shape:
                # in place: an optimizer that already holds a learned scale keeps training it
                self.scale.copy_(value)
            elif self.learn_scale:
                self.scale = nn.Parameter(value, requires_grad=self.scale.requires_grad)
            else:
                self.scale = value
            self.zero_point = zero_point.to(self.zero_point.device)
            self.initialized.fill_(True)

    def init_from(self, x: torch.Tensor, reset: bool = False) -> None:
        """Set the grid from ``x``'s min and max (per channel) unless it is set already
        (always, with ``reset``).

        Example:
            >>> import torch
            >>> q = Uniform(8, mode="unsigned")
            >>> q.init_from(torch.tensor([0.0, 2.55]))
            >>> q.init_from(torch.tensor([0.0, 100.0]))           # set already: kept
            >>> round(float(q.scale), 6)
            0.01
        """
        if (reset or not bool(self.initialized)) and x.numel() > 0:
            self.observe_range(*self._reduce(x))

    def _keep_learned_scale_positive(self) -> None:
        # an optimizer step can carry a small learned step size through 0 (Adam moves every
        # parameter by about its learning rate); a grid needs a positive step, and LSQ's
        # gradient lifts it again from the floor
        # (in place only when needed: a module called twice in one forward pass has saved the
        # scale for its backward, and an in-place op, even one that changes nothing, breaks it)
        if self.learn_scale and bool((self.scale.detach() < MIN_LEARNED_SCALE).any()):
            with torch.no_grad():
                self.scale.clamp_(min=MIN_LEARNED_SCALE)

    def _scale_for(self, x: torch.Tensor) -> torch.Tensor:
        self.init_from(x)
        self._keep_learned_scale_positive()
        if self.channel_axis is None:
            return self.scale
        if x.dim() <= self.channel_axis or x.shape[self.channel_axis] != self.scale.numel():
            raise QuantizerError(
                f"this quantizer holds {self.scale.numel()} scales along axis {self.channel_axis}, "
                f"set from another tensor; got a tensor of shape {tuple(x.shape)}"
            )
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return self.scale.reshape(shape)

    # ---- quantizing -------------------------------------------------------------------------

    def spec(self, x: torch.Tensor | None = None) -> QuantSpec:
        """The grid: ``(code - zero_point) * scale`` with codes in ``[qmin, qmax]``.
        ``x`` sets the scale when it is still unset (weights are quantized that way).

        Example:
            >>> import torch
            >>> q = Uniform(4)
            >>> q.spec(torch.tensor([0.7, -0.35]))           # symmetric: codes -7..7, scale 0.7/7
            QuantSpec(scale=tensor(0.1000), zero_point=0, qmin=-7, qmax=7, axis=None)
        """
        if not bool(self.initialized):
            if x is None:
                raise QuantizerError(
                    "this Uniform quantizer has no scale yet: set it with observe_range, "
                    "or run a forward pass first"
                )
            self.init_from(x)
        self._keep_learned_scale_positive()
        return QuantSpec(
            scale=self.scale.detach().clone(),
            zero_point=int(self.zero_point),
            qmin=self.qmin,
            qmax=self.qmax,
            axis=self.channel_axis,
        )

    def frozen_spec(self) -> QuantSpec:
        """The grid set so far (``clamp(round(x / s) + z)`` is this quantizer's forward).

        Raises:
            QuantizerError: the scale is not set yet.

        Example:
            >>> import torch
            >>> q = Uniform(8, mode="unsigned")
            >>> q.observe_range(torch.tensor(0.0), torch.tensor(2.55))
            >>> q.frozen_spec().qmax, round(float(q.frozen_spec().scale), 6)
            (255, 0.01)
        """
        return self.spec()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        scale = self._scale_for(x)
        zero = float(self.zero_point)
        lo, hi = self.qmin - zero, self.qmax - zero
        if self.learn_scale and self.training and scale.requires_grad:
            # LSQ: the gradient reaches the scale through clamp, the straight-through
            # round and the final multiply; g balances it against the weights' gradients
            per_scale = x.numel() // max(self.scale.numel(), 1)
            g = 1.0 / math.sqrt(per_scale * self.qmax)
            return lsq_fake_quant(
                x, scale, lo, hi, g, overwrite=self.overwrites_input, relu=self.absorbs_relu
            )
        if torch.is_grad_enabled() and x.requires_grad:
            # ONNX QuantizeLinear's order, round(x / s) + zero point then saturate, with the
            # gradient passing where nothing was clamped; one fused autograd function
            return ste_fake_quant(x, scale, lo, hi, overwrite=self.overwrites_input, relu=self.absorbs_relu)
        with torch.no_grad():
            # the same values without the mask nobody will use (eval, calibration, export)
            s = scale.detach().to(dtype)
            return torch.div(x.detach().to(dtype), s).round_().clamp_(lo, hi).mul_(s).to(x.dtype)

    def extra_repr(self) -> str:
        parts = [f"bits={self.num_bits}", f"mode={self.mode!r}"]
        if self.channel_axis is not None:
            parts.append(f"channel_axis={self.channel_axis}")
        if self.learn_scale:
            parts.append("learn_scale=True")
        if self.power_of_two_scale:
            parts.append("power_of_two_scale=True")
        return ", ".join(parts)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a per-channel scale is [C], not the [] placeholder: take the saved shape
        key = prefix + "scale"
        if key in state_dict and state_dict[key].shape != self.scale.shape:
            with torch.no_grad():
                value = torch.empty_like(state_dict[key])
                self.scale = nn.Parameter(value) if self.learn_scale else value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


register_kind(
    "int",
    Uniform,
    required=("bits",),
    optional=("mode", "channel_axis", "learn_scale", "power_of_two_scale"),
    # an unsigned grid with room below 0: a zero point
    as_signed=lambda params: {**params, "mode": "asymmetric"},
)
