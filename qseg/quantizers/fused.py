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
  (``retain_graph`` / ``create_graph``: the saved tensor may be read again);
- in blocks: with a per-tensor scale, the forward's passes (and LSQ's backward's) run over
  one block of ``_BLOCK`` elements after another, so that all but the first pass over a
  block find it in cache instead of streaming the whole tensor from memory again.

The forward is exactly the eager formula ``clamp(round(x / s), lo, hi) * s``: a true
division, round half to even, so training sees the values the converted model and
ONNX Runtime compute (torch's own ``fake_quantize_*`` kernels multiply by ``1 / s``,
which rounds differently near ties, and turn a NaN into a code).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

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


@functools.lru_cache(maxsize=64)
def _next_float(value: float, toward: float, dtype: torch.dtype) -> float:
    """The ``dtype`` float next to ``value`` in the direction of ``toward``."""
    return torch.nextafter(torch.tensor(value, dtype=dtype), torch.tensor(toward, dtype=dtype)).item()


# Elements per block: 1 MB of float32, so that a block of each tensor a pass touches stays in
# a core's L2 (2 MB per core on the AVX-512 machine, 512 KB on Zen3, whose L3 then serves).
# Measured in docs/quantizers.md ("Single-pass kernels and cache blocks").
_BLOCK = 1 << 18


def _blocks(*tensors: torch.Tensor, scale: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Matching blocks of ``_BLOCK`` elements (views) of same-shaped contiguous tensors;
    the tensors whole when one is not contiguous, when they are small, or when ``scale``
    has one value per channel (it would need cutting too)."""
    if scale.numel() != 1 or tensors[0].numel() <= 2 * _BLOCK or not all(t.is_contiguous() for t in tensors):
        return [tensors]
    return list(zip(*(t.view(-1).split(_BLOCK) for t in tensors), strict=True))


def _quotients(
    x: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
    saved: torch.Tensor,
    overwrite: bool,
    scale: torch.Tensor,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Blocks of ``v`` holding ``x / s`` (``v`` is ``x`` itself when ``overwrite``), each
    with the matching block of the tensor a forward saves for its backward."""
    for v_at, saved_at, x_at in _blocks(v, saved, x.detach(), scale=scale):
        if overwrite:
            yield v_at.div_(s), saved_at
        elif x_at.dtype == v_at.dtype:
            yield torch.div(x_at, s, out=v_at), saved_at
        else:  # a half input, divided in the compute dtype
            yield v_at.copy_(x_at).div_(s), saved_at


def _below_zero(dtype: torch.dtype) -> float:
    """The ``dtype`` float closest to 0 that comparisons see as below 0: the negative
    denormal next to 0, or, with denormals flushed (``torch.set_flush_denormal(True)``: that
    one then reads as -0), the negative normal next to 0, the denormals between reading as
    0 for the eager clamp too."""
    denormal = _next_float(0.0, -1.0, dtype)
    if bool(torch.tensor(denormal, dtype=dtype) < 0):
        return denormal
    return -torch.finfo(dtype).tiny


def _saved_from_zero(v: torch.Tensor, w: torch.Tensor, low: float, high: float, hi: float) -> None:
    """LSQ's saved tensor on a grid from 0 (``lo == 0 < hi``), written into ``w`` from the
    quotient ``v``, which becomes the codes ``round(clamp(v, 0, hi))``: ``v + 1 - round(v)``
    (``1 - e``, within [0.5, 1.5]) where ``low < v < high`` (the gradient passes to ``x``),
    ``-e`` elsewhere: ``-hi`` above the range, 0 below it.

    Each step is one pass of one kernel: ``hardtanh_backward(w, v, low, high)`` keeps ``w``
    where ``low < v < high`` and writes 0 elsewhere. ``_LsqFakeQuant`` passes the floats
    next to 0 and ``hi`` on the outside, which makes it ``0 <= v <= hi``, or, with a ReLU
    absorbed, ``low`` 0.5: the codes from 1 (0.5 rounds to 0), as the ReLU passes no
    gradient where the code is 0.
    """
    torch.add(v, 1.0, out=w)
    torch.ops.aten.hardtanh_backward.grad_input(w, v, low, high, grad_input=w)
    # (v + 1) - round(v) is exact for v >= 0 (the two are within a factor 2 of each other, or
    # round(v) is 0); only v + 1 rounds, as the other encoding's c - offset does
    w.sub_(v.clamp_(0.0, hi).round_())


def _saved_two_sided(v: torch.Tensor, w: torch.Tensor, lo: float, hi: float, offset: float) -> None:
    """LSQ's saved tensor on any grid but one from 0, written into ``w`` from the quotient
    ``v``, which becomes the codes: ``e + offset`` inside, the bound outside."""
    torch.clamp(v, lo, hi, out=w)
    # 1.0 where lo <= x / s <= hi (NaN equals nothing): inclusive, as torch.clamp's own
    # derivative, so the gradient to x passes inside
    v.eq_(w)
    # v becomes m * (c - offset), m the inside mask and c the clamped quotient
    if offset == 0.0:
        v.mul_(w)
    else:
        torch.addcmul(v.neg_(), v, w, value=-1.0, out=v)
    # inside: round(c) - (c - offset), exact (a float minus its rounding is, and c - 1
    # lies beyond 1 in magnitude, as c <= 0); outside: the bound. Then v + w is the code
    v.add_(w.round_().sub_(v))


def _grad_two_sided(grad: torch.Tensor, w: torch.Tensor, out: torch.Tensor, offset: float) -> None:
    """``grad`` where ``w`` (``_saved_two_sided``) says inside, 0 elsewhere, into ``out``
    (which may be ``w``)."""
    if out is not w:
        out.copy_(w)
    if offset == 0.0:
        out.abs_().le_(0.5)
    else:  # inside within [0.5, 1.5], the bounds lo < 0 and 0
        out.gt_(0.25)
    out.mul_(grad)


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
        v = x if overwrite else torch.empty_like(x, dtype=dtype)
        mask = torch.empty_like(v)
        for v_at, mask_at in _quotients(x, s, v, mask, overwrite, scale):
            codes = v_at.round_()
            # the gradient passes where round(x / s) needed no clamping (NaN: no); with the
            # ReLU's gradient, only where the code is 1 or more (the ReLU's output not 0)
            torch.clamp(codes, 1.0 if relu else lo, hi, out=mask_at).eq_(codes)
            codes.clamp_(lo, hi).mul_(s)
        ctx.save_for_backward(mask)
        ctx.x_dtype, ctx.relu_applied = x.dtype, relu
        if overwrite:
            ctx.mark_dirty(x)
            return x
        return v.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        grad_x = _masked_grad(grad, mask, ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None, None


class _LsqFakeQuant(torch.autograd.Function):
    """LSQ's backward needs two numbers per element: whether ``lo <= x / s <= hi`` (the
    gradient to ``x`` passes) and ``e``, what the element adds to the scale's gradient:
    ``round(v) - v`` inside the range (within [-0.5, 0.5]), the bound outside. Both live
    in one saved tensor ``w``, so one full-size buffer is saved, and the output is written
    over the quotient (or over ``x`` itself, ``overwrite``). Two encodings:

    - a grid from 0 (``lo == 0``: ``unsigned`` activations, the hot path of ``w4a8``):
      ``1 - e`` inside (within [0.5, 1.5]), ``-e`` outside (``-hi`` above, 0 below), so that
      inside is exactly ``w > 0`` (NaN: no) and ``sum(grad * e)`` is the sum of the gradient
      passed to ``x`` less ``sum(grad * w)``. Forward and backward are built from single-pass
      kernels (``_saved_from_zero``; the backward's mask and product are one
      ``leaky_relu_backward`` with slope 0): seven passes forward and three backward;
    - a grid with a negative code: ``e + offset`` inside, the bound outside, with
      ``offset`` chosen so that no bound lies within 0.5 of it (1 when the upper bound is
      0, else 0); inside is ``|w - offset| <= 0.5``, and ``sum(grad * e)`` is
      ``sum(grad * w)`` less ``offset`` times the sum of the gradient passed to ``x``.

    A per-tensor scale's passes run block by block (``_blocks``), so that all but the first
    find the block in cache.

    With ``relu`` (a grid from 0, read by a ReLU alone) the elements whose code is 0 are
    stored as the bound 0 is: the ReLU passes them no gradient, so they give none to ``x``
    and add nothing to the scale's.
    """

    @staticmethod
    def forward(
        ctx, x, scale, lo: float, hi: float, g: float, dtype: torch.dtype, overwrite: bool, relu: bool
    ):
        s = scale.detach().to(dtype)
        from_zero = lo == 0.0 and hi > 0.0
        offset = 1.0 if hi == 0.0 else 0.0
        v = x if overwrite else torch.empty_like(x, dtype=dtype)
        w = torch.empty_like(v)
        if from_zero:
            low = 0.5 if relu else _below_zero(dtype)
            high = _next_float(hi, math.inf, dtype)
        for v_at, w_at in _quotients(x, s, v, w, overwrite, scale):
            # both leave the codes round(clamp(v, lo, hi)) in v
            if from_zero:
                _saved_from_zero(v_at, w_at, low, high, hi)
            else:
                _saved_two_sided(v_at, w_at, lo, hi, offset)
            v_at.mul_(s)
        ctx.save_for_backward(w, scale)
        ctx.g, ctx.offset, ctx.from_zero = g, offset, from_zero
        ctx.x_dtype, ctx.relu_applied = x.dtype, relu
        if overwrite:
            ctx.mark_dirty(x)
            return x
        return v.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, scale = ctx.saved_tensors
        grad = grad.to(w.dtype)
        need_s = ctx.needs_input_grad[1]
        from_zero, offset = ctx.from_zero, ctx.offset
        if torch.is_grad_enabled():  # create_graph: out-of-place ops that record a graph
            w_dot = _dot_to(grad, w, scale) if need_s else None
            if from_zero:
                grad_x = torch.ops.aten.leaky_relu_backward(grad, w, 0.0, False)
            else:
                mask = (w.abs() <= 0.5) if offset == 0.0 else (w > 0.25)
                grad_x = grad * mask.to(w.dtype)
            x_sum = _sum_to(grad_x, scale) if need_s and (from_zero or offset != 0.0) else None
        else:
            # w becomes the gradient to x after its dot product, unless the graph is kept
            # (retain_graph: a second backward reads w again)
            grad_x = torch.empty_like(w) if _keep_graph is None or _keep_graph() else w
            w_dots, x_sums = [], []
            for grad_at, w_at, x_at in _blocks(grad, w, grad_x, scale=scale):
                if need_s:
                    w_dots.append(_dot_to(grad_at, w_at, scale))
                if from_zero:
                    torch.ops.aten.leaky_relu_backward.grad_input(grad_at, w_at, 0.0, False, grad_input=x_at)
                else:
                    _grad_two_sided(grad_at, w_at, x_at, offset)
                if need_s and (from_zero or offset != 0.0):
                    x_sums.append(_sum_to(x_at, scale))
            w_dot = torch.stack(w_dots).sum(0) if need_s else None
            x_sum = torch.stack(x_sums).sum(0) if x_sums else None
        grad_s = None
        if need_s:
            # sum(grad * e): x_sum - w_dot from 0, w_dot - offset * x_sum otherwise
            e_dot = x_sum - w_dot if from_zero else w_dot if x_sum is None else w_dot - offset * x_sum
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
