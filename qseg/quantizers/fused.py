"""The training-time forward and backward of :class:`~qseg.quantizers.Uniform`, each as one
autograd function that does its elementwise work in place.

Written as a chain of ordinary tensor ops, fake quantization costs a handful of
full-size passes and fresh buffers in the forward (divide, round, clamp, compare,
multiply) and as many again in the backward that autograd builds from them (LSQ's
divide, clamp and multiply each save inputs and replay their own derivatives). Those
memory-bound passes are what a QAT step pays on top of the float step, and on CPU a
fresh buffer of tens of megabytes costs more than a pass over it: the allocator maps it
from the kernel, and the first write to every page faults (about 30 ms for a
4x64x200x200 float32 tensor on the 2-core Zen3, against 5 ms for an in-place pass; 9 ms
against 1 ms on the 2-core AVX-512 Xeon, where glibc maps every buffer over 32 MB afresh). The
two functions here therefore compute the same values with as few fresh buffers as their
results need, and with float kernels only: the mask is kept as 0.0 / 1.0 in the compute
dtype, because comparisons into bool tensors, ``where`` on them and the bool-to-float cast
a ``grad * mask`` does are several times slower per element than a float multiply.

- forward: the output, written over the quotient ``x / s`` (or over ``x`` itself when
  nothing else reads it: ``Quantizer.overwrites_input``, set by ``prepare`` from the
  graph), and one saved tensor: the mask (straight-through) or LSQ's combined mask and
  scale derivative (``_LsqFakeQuant``); so one fresh buffer per call when ``x`` may be
  overwritten, two otherwise;
- backward: the gradient to ``x`` written over the saved tensor, which this node owns and
  which autograd frees right after (no fresh buffer), unless the graph is kept
  (``retain_graph`` / ``create_graph``: the saved tensor may be read again).

The forward is exactly the eager formula ``clamp(round(x / s), lo, hi) * s``: a true
division, round half to even, so training sees the values the converted model and
ONNX Runtime compute (torch's own ``fake_quantize_*`` kernels multiply by ``1 / s``,
which rounds differently near ties, and turn a NaN into a code).
"""

from __future__ import annotations

import torch

from qseg.errors import QuantizerError

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


def _offset(lo: float, hi: float) -> float:
    """Where LSQ's saved tensor puts the inside elements (see ``_LsqFakeQuant``): 0 when
    neither bound is 0, else 1 away from the zero bound, on the side the range is not."""
    if lo != 0.0 and hi != 0.0:
        return 0.0
    return -1.0 if lo == 0.0 else 1.0


def _overwritable(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """``x``'s buffer may hold the result: the compute dtype, not a view (its base may
    be read elsewhere), not a leaf that asks for a gradient (autograd forbids it)."""
    return x.dtype == dtype and not x._is_view() and not (x.is_leaf and x.requires_grad)


def _check_relu(relu: bool, lo: float) -> None:
    if relu and lo != 0:
        # below 0 a ReLU would change the values too, not only the gradient
        raise QuantizerError(
            f"relu=True needs a grid whose lowest value is 0; this one starts at code {lo:g}"
        )


class _SteFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, lo: float, hi: float, dtype: torch.dtype, overwrite: bool, relu: bool):
        s = scale.detach().to(dtype)
        codes = (x.div_(s) if overwrite else torch.div(x.detach().to(dtype), s)).round_()
        # the gradient passes where round(x / s) needed no clamping (NaN: no); with the
        # ReLU's gradient, only where the code is 1 or more (the ReLU's output not 0)
        ctx.save_for_backward(codes.clamp(1.0 if relu else lo, hi).eq_(codes))
        ctx.x_dtype, ctx.relu_applied = x.dtype, relu
        out = codes.clamp_(lo, hi).mul_(s)
        if overwrite:
            ctx.mark_dirty(x)
            return x
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        grad_x = _masked_grad(grad, mask, ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None, None


class _LsqFakeQuant(torch.autograd.Function):
    """LSQ's backward needs two numbers per element: whether ``lo <= x / s <= hi`` (the
    gradient to ``x`` passes) and ``e``, what the element adds to the scale's gradient:
    ``round(v) - v`` inside the range (within [-0.5, 0.5]), the bound outside. Both live
    in one saved tensor ``w``: ``e + offset`` inside, the bound outside, with ``offset``
    (``_offset``) chosen so that no bound lies within 0.5 of it; inside is then
    ``|w - offset| <= 0.5`` (one comparison when a bound is 0: the inside values then lie
    on the other side of 0 than both bounds), and ``sum(grad * e)`` is ``sum(grad * w)``
    less ``offset`` times the sum of the gradient passed to ``x``. One full-size buffer is
    saved, and the output is written over the quotient (or over ``x`` itself, ``overwrite``).

    With ``relu`` (a grid from 0, read by a ReLU alone) the elements whose code is 0 are
    stored as the bound 0 is: the ReLU passes them no gradient, so they give none to ``x``
    and add nothing to the scale's.
    """

    @staticmethod
    def forward(
        ctx, x, scale, lo: float, hi: float, g: float, dtype: torch.dtype, overwrite: bool, relu: bool
    ):
        s = scale.detach().to(dtype)
        v = x.div_(s) if overwrite else torch.div(x.detach().to(dtype), s)
        w = v.clamp(lo, hi)
        # 1.0 where lo <= x / s <= hi (NaN equals nothing): inclusive, as torch.clamp's own
        # derivative, so the gradient to x passes inside
        v.eq_(w)
        offset = _offset(lo, hi)
        # v becomes m * (c - offset), m the inside mask and c the clamped quotient
        if offset == 0.0:
            v.mul_(w)
        elif relu:
            # m * c kept only where it rounds to 1 or more (c > 0.5, ties to even), then
            # (c + 1) there and 0 elsewhere: c + 1 >= 1.5 is above the threshold 1
            torch.threshold_(torch.threshold_(v.mul_(w), 0.5, 0.0).add_(1.0), 1.0, 0.0)
        elif offset < 0.0:
            torch.addcmul(v, v, w, out=v)
        else:
            torch.addcmul(v.neg_(), v, w, value=-1.0, out=v)
        q = w.round_()
        # inside: round(c) - (c - offset), exact (a float minus its rounding is, and c - offset
        # lies beyond 1 in magnitude when offset is not 0, as c lies on the far side of 0);
        # outside: the bound q. Then v + w is q exactly
        w = q.sub_(v)
        out = v.add_(w).mul_(s)
        ctx.save_for_backward(w, scale)
        ctx.g, ctx.offset = g, offset
        ctx.x_dtype, ctx.relu_applied = x.dtype, relu
        if overwrite:
            ctx.mark_dirty(x)
            return x
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, scale = ctx.saved_tensors
        offset = ctx.offset
        grad = grad.to(w.dtype)
        e_dot = _dot_to(grad, w, scale) if ctx.needs_input_grad[1] else None
        # after the dot product w may become the mask, then the gradient to x (as in
        # _masked_grad: only when nothing will read w again)
        writable = not (torch.is_grad_enabled() or _keep_graph is None or _keep_graph())
        mask = w if writable else w.clone()
        if offset == 0.0:
            mask.abs_().le_(0.5)
        elif offset < 0.0:  # inside within [-1.5, -0.5], the bounds 0 and hi > 0: one compare
            mask.lt_(-0.25)
        else:  # inside within [0.5, 1.5], the bounds lo < 0 and 0
            mask.gt_(0.25)
        grad_x = mask.mul_(grad) if writable else grad * mask
        grad_s = None
        if e_dot is not None:
            if offset != 0.0:
                e_dot = e_dot - offset * _sum_to(grad_x, scale)
            grad_s = (e_dot * ctx.g).to(scale.dtype)
        if not ctx.needs_input_grad[0]:
            return None, grad_s, None, None, None, None, None, None
        return grad_x.to(ctx.x_dtype), grad_s, None, None, None, None, None, None


def ste_fake_quant(
    x: torch.Tensor, scale: torch.Tensor, lo: int, hi: int, overwrite: bool = False, relu: bool = False
) -> torch.Tensor:
    """``clamp(round(x / scale), lo, hi) * scale`` with the clipped straight-through
    gradient: ``x`` gets the incoming gradient where ``round(x / scale)`` lies in
    ``[lo, hi]``, 0 elsewhere; ``scale`` (which broadcasts against ``x``) gets none.

    Half inputs are computed in float32 and the result cast back, like every qseg
    quantizer. NaN gives NaN and no gradient.

    ``overwrite=True`` computes in ``x``'s own buffer and returns ``x``, for an ``x``
    nothing reads afterwards (what ``Quantizer.overwrites_input`` says); when ``x`` is a
    view, a leaf that asks for a gradient or not of the compute dtype, a fresh buffer
    is used all the same.

    ``relu=True`` (``lo`` must be 0) also gives the gradient of a ReLU applied to the
    result: none where the code is 0. The ReLU itself then changes nothing and need not
    run: :class:`~qseg.nn.ReLUAfterQuant` passes on a result whose ``grad_fn`` says
    ``relu_applied``.

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
    overwrite = overwrite and _overwritable(x, dtype)
    _check_relu(relu, lo)
    return _SteFakeQuant.apply(x, scale, float(lo), float(hi), dtype, overwrite, relu)


def lsq_fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    lo: int,
    hi: int,
    grad_scale: float,
    overwrite: bool = False,
    relu: bool = False,
) -> torch.Tensor:
    """LSQ (Esser et al. 2020): ``round(clamp(x / scale, lo, hi)) * scale`` whose round
    is straight-through, so that

    - ``x`` gets the incoming gradient where ``lo <= x / scale <= hi``, 0 elsewhere;
    - ``scale`` gets ``grad_scale * sum(grad * e)`` with ``e = round(x/s) - x/s``
      inside the range and ``lo`` / ``hi`` below / above it, summed over every
      dimension ``scale`` broadcasts along.

    ``overwrite`` and ``relu`` as in :func:`ste_fake_quant`.

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
    overwrite = overwrite and _overwritable(x, dtype)
    _check_relu(relu, lo)
    return _LsqFakeQuant.apply(x, scale, float(lo), float(hi), float(grad_scale), dtype, overwrite, relu)
