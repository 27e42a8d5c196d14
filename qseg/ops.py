"""qseg's own torch operators for converted (inference) models.

Each has an exact PyTorch implementation and a fake (shape) implementation, so
``torch.export`` handles dynamic shapes, and the ONNX exporter translates each
into the QDQ pattern integer runtimes fuse (``qseg/exporters/onnx.py``):

- ``qseg::fake_quant(x, scale, qmin, qmax, zero_point)``:
  ``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``, round half to
  even, exported as QuantizeLinear -> integer Clip -> DequantizeLinear.
- ``qseg::dequantize(codes, scale, axis)``: integer codes times a per-tensor or
  per-channel scale, exported as DequantizeLinear of an integer initializer.
- ``qseg::qconv(x, codes, w_scale, bias_codes, in_scale, in_qmin, in_qmax, stride, padding, dilation, groups)``:
  a convolution whose input lies on the grid ``in_scale`` and whose weights are integer
  codes; computed the way an integer runtime does, accumulate the integer products
  (exact in float32 while ``|accumulator| < 2^24``), add the int32 bias, then one
  multiply by ``in_scale * w_scale`` per output channel. Exported as DQ(codes) and
  DQ(int32 bias) feeding a Conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dequantize", "fake_quant", "qconv"]

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


@torch.library.custom_op("qseg::fake_quant", mutates_args=())
def fake_quant(x: torch.Tensor, scale: float, qmin: int, qmax: int, zero_point: int) -> torch.Tensor:
    """Quantize to codes ``[qmin, qmax]`` around ``zero_point`` with step ``scale`` and
    dequantize (per tensor), in ONNX QuantizeLinear's order: round, then add the zero point."""
    if zero_point == 0:
        return torch.clamp(torch.round(x / scale), qmin, qmax) * scale
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


@fake_quant.register_fake
def _(x: torch.Tensor, scale: float, qmin: int, qmax: int, zero_point: int) -> torch.Tensor:  # noqa: ARG001
    return torch.empty_like(x)


def _channel_view(scale: torch.Tensor, dims: int, axis: int) -> torch.Tensor:
    shape = [1] * dims
    shape[axis] = -1
    return scale.reshape(shape)


@torch.library.custom_op("qseg::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """``codes * scale``, with ``scale`` per slice along ``axis`` when it is 1-d."""
    if scale.dim() == 0:
        return codes.to(scale.dtype) * scale
    return codes.to(scale.dtype) * _channel_view(scale, codes.dim(), axis)


@dequantize.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:  # noqa: ARG001
    return torch.empty(codes.shape, dtype=scale.dtype, device=codes.device)


@torch.library.custom_op("qseg::qconv", mutates_args=())
def qconv(
    x: torch.Tensor,
    codes: torch.Tensor,
    w_scale: torch.Tensor,
    bias_codes: torch.Tensor,
    in_scale: float,
    in_qmin: int,  # noqa: ARG001 - chooses the exported integer type
    in_qmax: int,  # noqa: ARG001
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """Integer convolution of an input on the grid ``in_scale * [in_qmin, in_qmax]``,
    as an integer runtime computes it (the bounds only choose the exported type)."""
    conv = _CONV[codes.dim()]
    acc = conv(x / in_scale, codes.to(x.dtype), None, stride, padding, dilation, groups)
    acc = acc + _channel_view(bias_codes.to(x.dtype), acc.dim(), 1)
    return acc * _channel_view(in_scale * w_scale, acc.dim(), 1)


@qconv.register_fake
def _(x, codes, w_scale, bias_codes, in_scale, in_qmin, in_qmax, stride, padding, dilation, groups):  # noqa: ARG001
    conv = _CONV[codes.dim()]
    weight = torch.empty(codes.shape, dtype=x.dtype, device=x.device)
    return conv(x, weight, None, stride, padding, dilation, groups)
