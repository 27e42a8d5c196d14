"""The training-time forward and backward of :class:`~qseg.quantizers.Uniform`, each as one
autograd function that does its elementwise work in place.

Written as a chain of ordinary tensor ops, fake quantization costs a handful of
full-size passes and fresh buffers in the forward (divide, round, clamp, compare,
multiply) and as many again in the backward that autograd builds from them (LSQ's
divide, clamp and multiply each save inputs and replay their own derivatives). Those
memory-bound passes are what a QAT step pays on top of the float step, and on CPU a
fresh buffer of tens of megabytes costs more than a pass over it: the allocator maps it
from the kernel, and the first write to every page faults (about 30 ms for a
4x64x200x200 float32 tensor on the 2-core Zen3, against 5 ms for an in-place pass). The
two functions here therefore compute the same values with as few fresh buffers as their
results need, and with float kernels only: the mask is kept as 0.0 / 1.0 in the compute
dtype, because comparisons into bool tensors, ``where`` on them and the bool-to-float cast
a ``grad * mask`` does are several times slower per element than a float multiply.

- forward: the codes ``t = round(x / s)``, the clamped copy that becomes the output, and
  ``t == clamp(t)`` written over ``t`` as the mask (two fresh buffers; LSQ adds one for
  its per-element scale derivative);
- backward: the gradient to ``x`` written over the saved mask, which this node owns and
  which autograd frees right after (no fresh buffer), unless the graph is kept
  (``retain_graph`` / ``create_graph``: the mask may be read again, so ``grad * mask``).

The forward is exactly the eager formula ``clamp(round(x / s), lo, hi) * s``: a true
division, round half to even, so training sees the values the converted model and
ONNX Runtime compute (torch's own ``fake_quantize_*`` kernels multiply by ``1 / s``,
which rounds differently near ties, and turn a NaN into a code).
"""

from __future__ import annotations

import torch

__all__ = ["lsq_fake_quant", "ste_fake_quant"]

# torch >= 2.1 tells a backward whether its graph task keeps the graph; without it, assume it does
_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


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


def _masked_grad(grad: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad * mask`` in ``dtype``, written over ``mask`` when nothing will read it again.

    ``mask`` is a node's own saved buffer (0.0 / 1.0). Autograd frees it after this
    backward unless the graph is kept (``retain_graph``, ``create_graph``, or a backward
    that itself records a graph); only then does the product need a buffer of its own.
    """
    if torch.is_grad_enabled() or _keep_graph is None or _keep_graph():
        return (grad * mask).to(dtype)
    return mask.mul_(grad).to(dtype)


class _SteFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, lo: float, hi: float, dtype: torch.dtype):
        s = scale.detach().to(dtype)
        codes = torch.div(x.detach().to(dtype), s).round_()
        out = codes.clamp(lo, hi)
        # the gradient passes where round(x / s) needed no clamping (NaN: no)
        ctx.save_for_backward(codes.eq_(out))
        ctx.x_dtype = x.dtype
        return out.mul_(s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        grad_x = _masked_grad(grad, mask, ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


class _LsqFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, scale: torch.Tensor, lo: float, hi: float, g: float, dtype: torch.dtype
    ):
        s = scale.detach().to(dtype)
        mask = torch.div(x.detach().to(dtype), s)
        v = mask.clamp(lo, hi)
        # 1.0 where lo <= x / s <= hi (NaN equals nothing): inclusive, as torch.clamp's own
        # derivative, so the gradient to x passes inside
        mask.eq_(v)
        q = v.round()
        # d y / d s per element (LSQ): round(v) - v inside the range, the bound outside
        # (there v * mask is 0 and q is the bound); kept instead of x, no recompute later.
        # One pass over v's own buffer; v * mask is exact, so one rounding as q - v * mask
        e = torch.addcmul(q, v, mask, value=-1.0, out=v)
        ctx.save_for_backward(mask, e, scale)
        ctx.g = g
        ctx.x_dtype = x.dtype
        return q.mul_(s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mask, e, scale = ctx.saved_tensors
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = (_dot_to(grad.to(e.dtype), e, scale) * ctx.g).to(scale.dtype)
        # after the dot product: the gradient to x may be written over the mask
        grad_x = _masked_grad(grad, mask, ctx.x_dtype) if ctx.needs_input_grad[0] else None
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
