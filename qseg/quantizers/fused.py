"""The training-time forward and backward of :class:`~qseg.quantizers.Uniform`, each as one
autograd function that does its elementwise work in place.

Written as a chain of ordinary tensor ops, fake quantization costs a handful of
full-size passes and fresh buffers in the forward (divide, round, clamp, compare,
multiply) and as many again in the backward that autograd builds from them (LSQ's
divide, clamp and multiply each save inputs and replay their own derivatives). On a
CPU whose convolutions are fast (AVX-512) those memory-bound passes are what a QAT
step pays on top of the float step. The two functions here compute the same values
with one output buffer, in-place steps on it, a saved byte mask, and a backward
that is one multiply (plus one dot product for LSQ's scale).

The forward is exactly the eager formula ``clamp(round(x / s), lo, hi) * s``: a true
division, round half to even, so training sees the values the converted model and
ONNX Runtime compute (torch's own ``fake_quantize_*`` kernels multiply by ``1 / s``,
which rounds differently near ties, and turn a NaN into a code).
"""

from __future__ import annotations

import torch

__all__ = ["lsq_fake_quant", "ste_fake_quant"]


def _codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``round(x / scale)`` in one fresh buffer (the division's own output)."""
    return torch.div(x, scale).round_()


def _sum_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the dimensions that ``like`` broadcasts along (keeping them)."""
    if like.dim() == 0 or like.numel() == 1:
        return t.sum().reshape(like.shape)
    dims = [d for d in range(t.dim()) if like.shape[d] == 1 and t.shape[d] != 1]
    # an empty list would sum over every dimension: one value per scale is already reduced
    return t.sum(dim=dims, keepdim=True) if dims else t


def _dot_to(grad: torch.Tensor, e: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``sum(grad * e)`` reduced to ``like``'s (broadcast) shape; per tensor as one dot
    product, which reads both operands once and writes nothing full-size."""
    if like.numel() == 1 and grad.is_contiguous() and e.is_contiguous() and grad.dtype == e.dtype:
        return torch.dot(grad.reshape(-1), e.reshape(-1)).reshape(like.shape)
    return _sum_to(grad * e, like)


class _SteFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, lo: float, hi: float, dtype: torch.dtype):
        s = scale.detach().to(dtype)
        t = _codes(x.detach().to(dtype), s)
        # the gradient passes where round(x / s) needed no clamping (NaN: no); two
        # compares into bytes beat a clamped copy compared with the codes
        mask = t.ge(lo).logical_and_(t.le(hi))
        ctx.save_for_backward(mask)
        return t.clamp_(lo, hi).mul_(s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


class _LsqFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, scale: torch.Tensor, lo: float, hi: float, g: float, dtype: torch.dtype
    ):
        s = scale.detach().to(dtype)
        v = torch.div(x.detach().to(dtype), s)
        # inclusive, as torch.clamp's own derivative: the gradient to x passes inside
        mask = v.ge(lo).logical_and_(v.le(hi))
        v.clamp_(lo, hi)
        q = v.round()
        # d y / d s per element (LSQ): round(v) - v inside the range, the bound outside
        # (there v * mask is 0 and q is the bound); kept instead of x, no recompute later
        e = torch.sub(q, v.mul_(mask), out=v)
        ctx.save_for_backward(mask, e, scale)
        ctx.g = g
        return q.mul_(s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mask, e, scale = ctx.saved_tensors
        grad_x = grad * mask
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = (_dot_to(grad.to(e.dtype), e, scale) * ctx.g).to(scale.dtype)
        return grad_x, grad_s, None, None, None, None


def ste_fake_quant(x: torch.Tensor, scale: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``clamp(round(x / scale), lo, hi) * scale`` with the clipped straight-through
    gradient: ``x`` gets the incoming gradient where ``round(x / scale)`` lies in
    ``[lo, hi]``, 0 elsewhere; ``scale`` (which broadcasts against ``x``) gets none.

    Half inputs are computed in float32 and the result cast back, like every qseg
    quantizer. NaN gives NaN and no gradient.

    Example:
        >>> import torch
        >>> x = torch.tensor([0.26, -1.0, 0.74, float("nan")], requires_grad=True)
        >>> y = ste_fake_quant(x, torch.tensor(0.1), -7, 7)
        >>> y
        tensor([ 0.3000, -0.7000,  0.7000,     nan], grad_fn=<_SteFakeQuantBackward>)
        >>> y.sum().backward()
        >>> x.grad                                # 7.4 rounds to 7: inside, passes
        tensor([1., 0., 1., 0.])
    """
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return _SteFakeQuant.apply(x, scale, float(lo), float(hi), dtype)


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, lo: int, hi: int, grad_scale: float) -> torch.Tensor:
    """LSQ (Esser et al. 2020): ``round(clamp(x / scale, lo, hi)) * scale`` whose round
    is straight-through, so that

    - ``x`` gets the incoming gradient where ``lo <= x / scale <= hi``, 0 elsewhere;
    - ``scale`` gets ``grad_scale * sum(grad * e)`` with ``e = round(x/s) - x/s``
      inside the range and ``lo`` / ``hi`` below / above it, summed over every
      dimension ``scale`` broadcasts along.

    Example:
        >>> import torch
        >>> x = torch.tensor([0.26, -1.0, 9.0], requires_grad=True)
        >>> s = torch.tensor(0.1, requires_grad=True)
        >>> y = lsq_fake_quant(x, s, -7, 7, grad_scale=1.0)
        >>> y.detach()
        tensor([ 0.3000, -0.7000,  0.7000])
        >>> y.sum().backward()
        >>> x.grad, round(float(s.grad), 4)       # (3 - 2.6) - 7 + 7
        (tensor([1., 0., 0.]), 0.4)
    """
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return _LsqFakeQuant.apply(x, scale, float(lo), float(hi), float(grad_scale), dtype)
