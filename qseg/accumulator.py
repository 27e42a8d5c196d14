"""A quantized layer's bias on its accumulator grid, in the prepared model and the converted one.

An int8 kernel sums products of input codes and weight codes in an int32 accumulator
and adds the layer's bias there, as int32 codes of step ``input scale x weight scale``
(per output channel, a folded BatchNorm's factor included). onnxruntime does so for
every conv it fuses into a ``QLinearConv``, rounding a float bias onto that grid (up
to half a code away from it); qseg's integer convs do so by design. So that the model
a user validates is the model deployed, a layer whose input lies on an activation
grid adds, in eval mode, its bias rounded onto its accumulator grid, and ``convert``
freezes that same bias: then every runtime adds the same value, fused or not.

``qseg.prepare`` links each quantized layer to the activation quantizers its input
comes from and to the BatchNorm ``convert`` will fold into it, with the conversion
plan's own rules (``qseg.convert.plan.link_layers``), and stores the link on the
layer as :attr:`qseg_accumulator`. In training mode the layer adds its own bias: a
BatchNorm then normalizes with batch statistics, which the fold does not describe, and
the rounding moves the bias by half an accumulator code at most.

The BatchNorm fold itself: ``convert`` multiplies it into the layer's weight scales and
bias, which rounds otherwise than a conv followed by a BatchNorm, and a value that lands
near a rounding tie of the next quantizer then takes the other code (a deep ResNet encoder
moved 1 % of its outputs by more than a step that way). So in eval mode without gradients
(validation, calibration, inference) a layer whose BatchNorm ``convert`` folds computes
what the frozen form ``convert`` makes of it computes (:func:`eval_forward`), and its BatchNorm, a
:class:`~qseg.nn.FoldedNorm`, passes that through (:func:`folds_norm` decides for both):
the prepared model then computes what the converted one does, operation for operation.
With gradients (training, or a user's eval-mode fine-tuning) the layer and its BatchNorm
compute apart, as the float model does, and gradients reach both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qseg.quantizers import Quantizer, QuantSpec

__all__ = [
    "AccumulatorLink",
    "accumulator_bias",
    "eval_forward",
    "folded",
    "folds_norm",
    "on_accumulator_grid",
]


@dataclass(frozen=True, eq=False)
class AccumulatorLink:
    """What a quantized layer's accumulator grid depends on: the activation quantizers
    whose outputs its input holds (``inputs``; where their steps differ, the link does
    nothing) and the BatchNorm that folds into it (``norm``, or ``None``).

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> qmodel = qseg.prepare(model, "int8", example_inputs=torch.rand(1, 1, 8, 8))
        >>> qmodel.get_submodule("0").qseg_accumulator
        AccumulatorLink(inputs from 1 quantizer, folds FoldedBatchNorm2d)
    """

    inputs: tuple[nn.Module, ...]
    norm: nn.Module | None

    def __repr__(self) -> str:
        norm = f"folds {type(self.norm).__name__}" if self.norm is not None else "no fold"
        return f"AccumulatorLink(inputs from {len(self.inputs)} quantizer{'s' * (len(self.inputs) != 1)}, {norm})"


def input_scale(link: AccumulatorLink) -> torch.Tensor | None:
    """The step of the grids ``link``'s input quantizers put values on, as they stand
    (a 0-d tensor; NaN where their steps differ), or ``None`` where one has no uniform
    grid (no range yet, a binary sign; while ``qseg.calibrate`` observes, an observer
    stands in for it). Tensor ops only, so that ``torch.compile`` sees one graph."""
    scales = []
    for act_quant in link.inputs:
        quantizer = act_quant.quantizer
        if not isinstance(quantizer, Quantizer) or not quantizer.range_set:
            return None
        spec = quantizer.frozen_spec()
        if spec is None:
            return None
        scales.append(spec.scale)
    if not scales:
        return None
    scale = scales[0]
    for other in scales[1:]:
        scale = torch.where(other == scale, scale, torch.nan)
    return scale


def _out_axis(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0


def folds_norm(layer: nn.Module) -> bool:
    """Whether the quantized ``layer`` computes its BatchNorm folded in, in this forward
    pass: both in eval mode, no gradients being recorded, the BatchNorm a
    :class:`~qseg.nn.FoldedNorm` of the layer, and a weight grid ``convert`` folds into
    (uniform, per tensor or per output channel; zero padding).

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))
        >>> qmodel = qseg.prepare(model, "int8", example_inputs=torch.rand(1, 1, 8, 8)).eval()
        >>> layer = qmodel.get_submodule("2")
        >>> folds_norm(layer)                         # gradients are recorded here
        False
        >>> with torch.no_grad():
        ...     folds_norm(layer), folds_norm(layer.train())
        (True, False)
    """
    from qseg.convert.frozen import convertible
    from qseg.nn import FoldedNorm

    link = getattr(layer, "qseg_accumulator", None)
    if link is None or link.norm is None or layer.training or link.norm.training or torch.is_grad_enabled():
        return False
    if not isinstance(link.norm, FoldedNorm) or link.norm.qseg_folded_into is not layer:
        return False
    return convertible(layer) and _weight_spec(layer) is not None


def eval_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the frozen layer ``convert`` makes of the quantized ``layer``, as it stands
    now, computes on ``x``: its BatchNorm folded in, its input grid from the activation
    quantizers it is linked to (none while they have no range), in the layer's dtype.
    What ``layer`` computes where :func:`folds_norm` holds.

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))
        >>> x = torch.rand(2, 1, 8, 8)
        >>> qmodel = qseg.prepare(model, "int8", example_inputs=x)
        >>> _ = qseg.calibrate(qmodel, [x], progress=False)
        >>> layer = qmodel.get_submodule("2")
        >>> (input_quant,) = layer.qseg_accumulator.inputs
        >>> h = input_quant(torch.rand(2, 4, 6, 6))     # on the grid the layer reads
        >>> torch.equal(eval_forward(layer, h), qseg.convert(qmodel).get_submodule("2")(h))
        True
    """
    from qseg.convert.frozen import bias_codes, freeze_act, input_grid, layer_parts, run_layer

    link = layer.qseg_accumulator
    # an input quantizer without a range yet (or an observer, while calibrating) gives no grid
    frozen = [
        freeze_act(a, "") if isinstance(a.quantizer, Quantizer) and a.quantizer.range_set else None
        for a in link.inputs
    ]
    in_grid, in_scale = input_grid(frozen)
    parts = layer_parts(layer, link.norm, in_grid, in_scale)
    # rounded to float32 as FrozenLayer stores them, then to the layer's dtype as a
    # converted model's .to(dtype) does
    w_scale = parts.w_scale.float()
    if parts.in_grid is not None:
        bias = bias_codes(parts.bias.float(), parts.in_grid[0], w_scale)
    else:
        bias = parts.bias.float().to(layer.weight.dtype)
    w_scale = w_scale.to(layer.weight.dtype)
    return run_layer(x, parts.kind, parts.codes, w_scale, bias, parts.params, parts.in_grid, parts.phases)


def _weight_spec(layer: nn.Module) -> QuantSpec | None:
    """The uniform weight grid of ``layer`` a fold can scale (per tensor or per output
    channel), or ``None``."""
    if not isinstance(layer.weight_quant, Quantizer):
        return None  # a quantizer bypassed by hand
    spec = layer.weight_quant.spec(layer.weight.detach())
    if spec is None or spec.axis not in (None, _out_axis(layer)):
        return None
    return spec


def folded(
    layer: nn.Module, norm: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] | None:
    """The per-output-channel weight scale and bias of the quantized ``layer`` with the
    BatchNorm ``norm`` folded in, in float64, and the fold ``(factor, shift, mean)``
    (``None`` without a norm); ``None`` when its weight grid is not uniform per tensor
    or per output channel (nothing to fold exactly) or its quantizer was replaced.

    With ``k = gamma / sqrt(var + eps)``: weight scale ``s_w * k``, bias
    ``(b - mean) * k + beta``.

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> from qseg.nn import quantize_module
        >>> from qseg.quantizers import FixedPoint
        >>> conv = quantize_module(nn.Conv2d(1, 2, 1), FixedPoint(0, 4))
        >>> norm = nn.BatchNorm2d(2, eps=0.0).eval()
        >>> _ = norm.running_var.fill_(4.0)                    # k = 1 / sqrt(4)
        >>> w_scale, bias, fold = folded(conv, norm)
        >>> w_scale.tolist()                                   # 2^-4 / 2
        [0.03125, 0.03125]
    """
    weight = layer.weight.detach()
    spec = _weight_spec(layer)
    if spec is None:
        return None
    out_axis = _out_axis(layer)
    out_channels = weight.shape[out_axis]
    w_scale = spec.scale.to(torch.float64)
    if spec.axis is None:
        w_scale = w_scale.expand(out_channels).clone()
    if out_axis == 1 and layer.groups > 1:
        # a grouped transposed conv's weight holds C_out / groups channels along axis 1, each
        # read by every group: one scale per output channel, group by group
        w_scale = w_scale.repeat(layer.groups)
        out_channels *= layer.groups
    zeros = torch.zeros(out_channels, dtype=torch.float64, device=weight.device)
    bias = layer.bias.detach().double() if layer.bias is not None else zeros
    if norm is None:
        return w_scale, bias, None
    factor = norm.weight.detach().double() if norm.affine else torch.ones_like(zeros)
    factor = factor / torch.sqrt(norm.running_var.double() + norm.eps)
    shift = norm.bias.detach().double() if norm.affine else zeros
    mean = norm.running_mean.double()
    return w_scale * factor, (bias - mean) * factor + shift, (factor, shift, mean)


def on_accumulator_grid(
    bias: torch.Tensor, in_scale: float | torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """``bias`` (float64, one per output channel) rounded to the nearest multiple of
    ``in_scale * w_scale``, the scales as float32 holds them (as the exported file
    does); a channel whose step is 0 or NaN keeps its bias.

    Example:
        >>> import torch
        >>> on_accumulator_grid(torch.tensor([0.30, -0.07], dtype=torch.float64), 0.5, torch.tensor([0.25, 0.125]))
        tensor([ 0.2500, -0.0625], dtype=torch.float64)
    """
    in_scale = torch.as_tensor(in_scale, dtype=torch.float32, device=bias.device)
    step = in_scale.double() * w_scale.float().double()
    off = (step == 0) | torch.isnan(step)
    rounded = torch.round(bias / torch.where(off, 1.0, step)) * step
    return torch.where(off, bias, rounded)


def accumulator_bias(layer: nn.Module) -> torch.Tensor | None:
    """The bias the quantized ``layer`` adds in eval mode: its own, moved so that (with
    its BatchNorm folded in) it lies on its accumulator grid, where the layer's input
    lies on a known grid and its weights on a uniform one; else its own bias.

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> x = torch.rand(1, 1, 12, 12)
        >>> qmodel = qseg.prepare(model, "int8", example_inputs=x)
        >>> _ = qseg.calibrate(qmodel, [x], progress=False)
        >>> layer = qmodel.get_submodule("2").eval()
        >>> (act_quant,) = layer.qseg_accumulator.inputs
        >>> step = act_quant.quantizer.frozen_spec().scale * layer.weight_quant.spec(layer.weight).scale
        >>> codes = accumulator_bias(layer) / step
        >>> bool(torch.allclose(codes, codes.round(), atol=1e-3))
        True
    """
    link = layer.qseg_accumulator
    if link is None or (link.norm is not None and link.norm.training):
        return layer.bias
    scale = input_scale(link)
    parts = folded(layer, link.norm)
    if scale is None or parts is None:
        return layer.bias
    w_scale, bias, fold = parts
    rounded = on_accumulator_grid(bias, scale, w_scale)
    if fold is not None:
        factor, shift, mean = fold
        # back in front of the BatchNorm; a channel the BatchNorm zeroes keeps its bias
        unfolded = (rounded - shift) / torch.where(factor == 0, 1.0, factor) + mean
        own = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(bias)
        rounded = torch.where(factor == 0, own, unfolded)
    return rounded.to(layer.weight.dtype)
