"""Uniform's fused training functions (qseg/quantizers/fused.py) against the chain of
eager tensor ops they replaced (kept below as the reference), per tensor, per channel,
with a zero point, with power-of-two scales, and with LSQ.

What is compared, and how exactly:

- forward values, every path: bit-identical (the same ops on the same values, in place);
- the clipped straight-through gradient: bit-identical (``grad * mask``, the same mask);
- LSQ's gradient to ``x``: equal up to one rounding. The eager chain computes
  ``((grad * s) * mask) / s`` (the multiply's, clamp's and division's derivatives in
  turn), the fused one ``grad * mask``, which is the exact value of the formula;
- LSQ's gradient to the scale: equal up to float summation. The eager chain adds two
  sums (``sum(grad * q)`` from the multiply, ``-sum(grad * mask * x / s^2) * s`` from the
  division), the fused one sums ``grad * (q - v * mask)`` once (a dot product per tensor);
  both are checked against a float64 evaluation of the same formula.

Every test runs twice: on whole tensors, and with the per-tensor passes cut into blocks
of 5 elements (``fused._BLOCK``; 2**18 in use, which these small tensors never reach).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import scaled_tensors

from qseg.errors import QuantizerError
from qseg.quantizers import Uniform, fused
from qseg.quantizers.base import compute_dtype, straight_through


class _LsqRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v):  # noqa: ARG004
        return torch.round(v)

    @staticmethod
    def backward(ctx, grad):  # noqa: ARG004
        return grad


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, g):
        ctx.g = g
        return s.view_as(s)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


def eager_forward(q: Uniform, x: torch.Tensor) -> torch.Tensor:
    """``Uniform.forward`` as it was before the fused functions (qseg 4a279db)."""
    dtype = compute_dtype(x)
    scale = q._scale_for(x)
    zero = float(q.zero_point)
    if q.learn_scale and q.training and scale.requires_grad:
        per_scale = x.numel() // max(q.scale.numel(), 1)
        g = 1.0 / math.sqrt(per_scale * q.qmax)
        s = _GradScale.apply(scale, g).to(dtype)
        v = torch.clamp(x.to(dtype) / s, q.qmin - zero, q.qmax - zero)
        return (_LsqRound.apply(v) * s).to(x.dtype)
    with torch.no_grad():
        s = scale.detach().to(dtype)
        codes = torch.round(x.detach().to(dtype) / s)
        out = codes.clamp(q.qmin - zero, q.qmax - zero)
        mask = out == codes
        out = out * s
    return straight_through(x, out.to(x.dtype), mask)


def lsq_scale_grad64(q: Uniform, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """LSQ's gradient to the scale in float64, from the formula (clamp's derivative
    inclusive at the bounds, as torch's)."""
    zero = float(q.zero_point)
    lo, hi = q.qmin - zero, q.qmax - zero
    shape = [1] * x.dim()
    if q.channel_axis is not None:
        shape[q.channel_axis] = -1
    s = q.scale.detach().double().reshape(shape)
    v = x.double() / s
    inside = (v >= lo) & (v <= hi)
    e = torch.where(inside, torch.round(v) - v, v.clamp(lo, hi))
    t = grad.double() * e
    per_scale = x.numel() // q.scale.numel()
    g = 1.0 / math.sqrt(per_scale * q.qmax)
    if q.channel_axis is None:
        return t.sum() * g
    dims = [d for d in range(x.dim()) if d != q.channel_axis]
    return t.sum(dim=dims) * g


@pytest.fixture(autouse=True, params=["whole", "blocks of 5"])
def _block_size(request, monkeypatch):
    if request.param != "whole":
        monkeypatch.setattr(fused, "_BLOCK", 5)


def _activation(mode: str, bits: int = 8, learn: bool = False, pow2: bool = False) -> Uniform:
    q = Uniform(bits, mode=mode, learn_scale=learn, power_of_two_scale=pow2)
    q.observe_range(torch.tensor(-0.7), torch.tensor(2.3))
    return q


def _negative_activation(learn: bool) -> Uniform:
    # codes -255..0: the upper bound is 0 (LSQ's saved tensor then sits on the other side)
    q = Uniform(8, mode="asymmetric", learn_scale=learn)
    q.observe_range(torch.tensor(-2.3), torch.tensor(-0.7))
    return q


def _weight(bits: int, learn: bool, axis: int = 0, pow2: bool = False) -> Uniform:
    return Uniform(bits, channel_axis=axis, learn_scale=learn, power_of_two_scale=pow2)


CASES = {
    "int8 symmetric": lambda: _activation("symmetric"),
    "uint8": lambda: _activation("unsigned"),
    "int8 asym (zero point)": lambda: _activation("asymmetric"),
    "int4 asym pow2": lambda: _activation("asymmetric", 4, pow2=True),
    "int8/ch": lambda: _weight(8, False),
    "int4/ch axis 1": lambda: _weight(4, False, axis=1),
    "int6/ch pow2": lambda: _weight(6, False, pow2=True),
    "uint8 LSQ": lambda: _activation("unsigned", learn=True),
    "int8 asym LSQ": lambda: _activation("asymmetric", learn=True),
    "int8 LSQ": lambda: _activation("symmetric", learn=True),
    "int8 asym LSQ, range below 0": lambda: _negative_activation(learn=True),
    "int4/ch LSQ": lambda: _weight(4, True),
    "int3/ch axis 1 LSQ": lambda: _weight(3, True, axis=1),
}


def _input(seed: int = 0, shape=(4, 6, 5, 5), dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1.5
    flat = x.view(-1)
    # saturation, exact ties, values just off a tie, and the non-finite
    flat[:6] = torch.tensor([40.0, -40.0, float("inf"), float("-inf"), float("nan"), 0.0])
    return x.to(dtype)


def _both(name: str, x: torch.Tensor, train: bool = True):
    """(fused quantizer, eager quantizer) with the same state; per-channel scales set
    from ``x`` once, so that both see the same grid."""
    q = CASES[name]().train(train)
    q.init_from(x.detach().float().nan_to_num(0.0, 0.0, 0.0))
    ref = CASES[name]().train(train)
    ref.load_state_dict(q.state_dict())
    return q, ref


def _ties(q: Uniform, x: torch.Tensor) -> torch.Tensor:
    """``x`` with some entries put exactly on half steps of ``q``'s grid, and next to them."""
    shape = [1] * x.dim()
    if q.channel_axis is not None:
        shape[q.channel_axis] = -1
    s = q.scale.detach().reshape(shape).expand_as(x).to(x.dtype)
    k = torch.arange(x.numel(), dtype=x.dtype).reshape(x.shape) % 9 - 4
    tie = (k + 0.5) * s
    pick = torch.arange(x.numel()).reshape(x.shape) % 3
    out = torch.where(pick == 0, tie, x)
    return torch.where(pick == 1, torch.nextafter(tie, torch.full_like(tie, math.inf)), out)


def _run(q: Uniform, x: torch.Tensor, upstream: torch.Tensor, eager: bool):
    x = x.clone().requires_grad_(True)
    y = (eager_forward if eager else Uniform.forward)(q, x)
    y.backward(upstream)
    return y.detach(), x.grad, None if q.scale.grad is None else q.scale.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_matches_the_eager_chain(name, dtype):
    x = _input(dtype=dtype)
    q, ref = _both(name, x)
    x = _ties(q, x)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y, gx, gs = _run(q, x, upstream, eager=False)
    y0, gx0, gs0 = _run(ref, x, upstream, eager=True)
    assert torch.equal(y.nan_to_num(7.0), y0.nan_to_num(7.0))  # bit-identical, NaN where NaN
    if not q.learn_scale:
        assert torch.equal(gx, gx0) and gs is None and gs0 is None
        return
    # ((g * s) * mask) / s against g * mask: one rounding apart
    eps = torch.finfo(torch.float32 if dtype == torch.bfloat16 else dtype).eps
    torch.testing.assert_close(gx, gx0, rtol=eps if dtype != torch.bfloat16 else 2**-8, atol=0)
    assert torch.equal(gx == 0, gx0 == 0)
    finite = torch.isfinite(x).all()
    if finite:
        exact = lsq_scale_grad64(q, x.float() if dtype == torch.bfloat16 else x, upstream)
        # float32 sums of a few hundred terms of size ~qmax: relative to the terms' size
        size = float(upstream.abs().double().sum()) * q.qmax / math.sqrt(x.numel() * q.qmax)
        for got in (gs, gs0):
            assert (got.double().reshape(exact.shape) - exact).abs().max() <= 1e-5 * size


@pytest.mark.parametrize("name", sorted(CASES))
def test_nan_and_infinity_handled_like_the_eager_chain(name):
    x = _input()
    q, ref = _both(name, x)
    y, gx, _ = _run(q, x, torch.ones_like(x), eager=False)
    y0, gx0, _ = _run(ref, x, torch.ones_like(x), eager=True)
    flat, flat0 = y.view(-1), y0.view(-1)
    assert torch.isnan(flat[4]) and torch.isnan(flat0[4])
    assert torch.equal(flat[2:4], flat0[2:4])  # +-inf saturate to the grid's ends
    assert gx.view(-1)[2:5].tolist() == [0.0, 0.0, 0.0] == gx0.view(-1)[2:5].tolist()
    if q.learn_scale:
        assert q.scale.grad.isnan().any()  # a NaN input poisons the scale's gradient, as before


@pytest.mark.parametrize("name", sorted(CASES))
def test_eval_outputs_bit_identical(name):
    x = _input()
    q, ref = _both(name, x, train=False)
    x = _ties(q, x)
    with torch.no_grad():
        fast, slow = q(x), eager_forward(ref, x)
    assert torch.equal(fast.nan_to_num(7.0), slow.nan_to_num(7.0))
    # with a gradient asked for in eval mode (saliency maps, attacks): the same values again
    assert torch.equal(q(x.clone().requires_grad_(True)).detach().nan_to_num(7.0), slow.nan_to_num(7.0))


def test_output_is_not_a_view_so_inplace_relu_works():
    q = _activation("symmetric")
    x = torch.randn(8, requires_grad=True)
    torch.relu_(q(x)).sum().backward()
    assert x.grad is not None


def test_lsq_scale_gets_no_gradient_when_frozen():
    q = _activation("unsigned", learn=True)
    q.scale.requires_grad_(False)
    x = torch.randn(10, requires_grad=True)
    q(x).sum().backward()
    assert q.scale.grad is None and x.grad is not None


@given(
    x=scaled_tensors(),
    bits=st.integers(2, 10),
    mode=st.sampled_from(["symmetric", "unsigned", "asymmetric"]),
    learn=st.booleans(),
)
def test_property_fused_equals_eager(x, bits, mode, learn):
    # invariant: on any data and grid, the fused path gives the eager values, a gradient
    # to x that is zero exactly where the eager one is, and the same nonzero values up
    # to one rounding
    q = Uniform(bits, mode=mode, learn_scale=learn)
    q.init_from(x)
    ref = Uniform(bits, mode=mode, learn_scale=learn)
    ref.load_state_dict(q.state_dict())
    upstream = torch.linspace(-1.0, 2.0, x.numel())
    y, gx, _ = _run(q, x, upstream, eager=False)
    y0, gx0, _ = _run(ref, x, upstream, eager=True)
    assert torch.equal(y, y0)
    assert torch.equal(gx == 0, gx0 == 0)
    torch.testing.assert_close(gx, gx0, rtol=2**-23, atol=0)


@given(x=scaled_tensors(), bits=st.integers(2, 10))
def test_property_lsq_gradient_to_x_is_the_range_indicator(x, bits):
    # LSQ's straight-through: the gradient to x is exactly 1 where lo <= x / s <= hi
    q = Uniform(bits, learn_scale=True)
    q.init_from(x)
    x = x.clone().requires_grad_(True)
    q(x).sum().backward()
    v = x.detach() / q.scale.detach()
    assert torch.equal(x.grad, ((v >= q.qmin) & (v <= q.qmax)).float())


def test_lsq_per_channel_scale_gradient_keeps_its_shape_with_one_value_per_channel():
    # a 1x1 conv with one input channel: nothing to sum per scale (an empty reduction list
    # must not mean "sum everything"); found on MONAI's UNETR with w4a8
    q = Uniform(4, channel_axis=0, learn_scale=True).train()
    w = torch.randn(16, 1, 1, 1, generator=torch.Generator().manual_seed(0), requires_grad=True)
    q(w).sum().backward()
    ref = Uniform(4, channel_axis=0, learn_scale=True).train()
    ref.load_state_dict(q.state_dict())
    w_ref = w.detach().clone().requires_grad_(True)
    eager_forward(ref, w_ref).sum().backward()
    assert q.scale.grad.shape == (16,)
    torch.testing.assert_close(q.scale.grad, ref.scale.grad)


def test_a_learned_scale_pushed_through_zero_stays_a_positive_step():
    # Adam moves every parameter by about its learning rate: a small step size can cross 0
    q = Uniform(8, mode="unsigned", learn_scale=True).train()
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    q(x)
    with torch.no_grad():
        q.scale.fill_(-0.01)
    y = q(x)
    assert float(q.scale) == pytest.approx(1e-8) and torch.isfinite(y).all()
    y.sum().backward()
    assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all()
    with torch.no_grad():
        q.scale.fill_(-0.01)
    assert float(q.spec().scale) > 0  # convert reads the grid through spec


def test_a_learned_scale_used_twice_in_one_forward_pass_still_backpropagates():
    q = Uniform(8, mode="unsigned", learn_scale=True).train()
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    (q(x) + q(2 * x)).sum().backward()
    assert torch.isfinite(q.scale.grad).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["int8 symmetric", "int8/ch", "uint8 LSQ", "int4/ch LSQ"])
def test_backward_writes_the_gradient_over_its_saved_mask(name):
    # the gradient to x needs no fresh full-size buffer: it is written over the mask the
    # node saved, which autograd frees after this backward anyway
    x = _input()
    q, _ = _both(name, x)
    saved = []

    def pack(t):
        saved.append(t.data_ptr())
        return t

    x = x.clone().requires_grad_(True)
    seen = []
    x.register_hook(lambda g: seen.append(g.data_ptr()))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    y.backward(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))
    assert seen and seen[0] == saved[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_kept_graph_gives_the_same_gradients_twice(name):
    # retain_graph: the mask is read again by the second backward, so the first must not
    # write over it
    x = _input()
    q, _ = _both(name, x)
    x = x.clone().requires_grad_(True)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    y = q(x)
    grads = []
    for retain in (True, False):
        x.grad, q.scale.grad = None, None
        y.backward(upstream, retain_graph=retain)
        grads.append((x.grad.clone(), None if q.scale.grad is None else q.scale.grad.clone()))
    (gx0, gs0), (gx1, gs1) = grads
    assert torch.equal(gx0, gx1)
    if gs0 is None:
        assert gs1 is None
    else:  # NaN where the input has one (test_nan_and_infinity_handled_like_the_eager_chain)
        torch.testing.assert_close(gs0, gs1, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", ["uint8", "int8/ch", "uint8 LSQ", "int4/ch LSQ"])
def test_double_backward_sees_the_mask(name):
    # create_graph (gradient penalties): the gradient to x is grad * mask, whose own
    # derivative with respect to the incoming gradient is the mask
    x = _input()
    q, ref = _both(name, x)
    x = x.clone().requires_grad_(True)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    (gx,) = torch.autograd.grad(q(x), x, upstream, create_graph=True)
    (mask,) = torch.autograd.grad(gx.sum(), upstream)
    x0 = x.detach().clone().requires_grad_(True)
    eager_forward(ref, x0).backward(torch.ones_like(x0))
    assert torch.equal(mask, x0.grad)
    assert torch.equal(gx.detach() == 0, (upstream.detach() * x0.grad) == 0)


@pytest.mark.parametrize("name", ["int8 symmetric", "uint8 LSQ", "int4/ch LSQ"])
def test_activation_checkpointing_gives_the_plain_gradients(name):
    # torch.utils.checkpoint hands the backward a recomputed mask through saved-tensor hooks:
    # writing the gradient over it must not change what reaches x or the scale
    x = _input()
    q, _ = _both(name, x)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointed in (False, True):
        xi = x.clone().requires_grad_(True)
        q.zero_grad()
        y = torch.utils.checkpoint.checkpoint(q, xi, use_reentrant=False) if checkpointed else q(xi)
        (y * 2).backward(upstream)
        grads.append((xi.grad, None if q.scale.grad is None else q.scale.grad.clone()))
    (gx0, gs0), (gx1, gs1) = grads
    assert torch.equal(gx0, gx1)
    if gs0 is not None:
        torch.testing.assert_close(gs0, gs1, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_overwriting_a_dead_input_gives_the_same_values_and_gradients(name, dtype):
    # Quantizer.overwrites_input: the result is computed in the input's own buffer, with the
    # values and gradients of the fresh-buffer path, bit for bit
    x = _ties(_both(name, _input(dtype=dtype))[0], _input(dtype=dtype))
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = []
    for overwrite in (False, True):
        q, _ = _both(name, _input(dtype=dtype))
        q.overwrites_input = overwrite
        leaf = x.clone().requires_grad_(True)
        produced = leaf * 1.0  # an op's output, as in a graph (a leaf is never overwritten)
        y = q(produced)
        assert (y.data_ptr() == produced.data_ptr()) == overwrite
        y.backward(upstream)
        results.append((y.detach(), leaf.grad, None if q.scale.grad is None else q.scale.grad.clone()))
    (y0, gx0, gs0), (y1, gx1, gs1) = results
    assert torch.equal(y0.nan_to_num(7.0), y1.nan_to_num(7.0))
    assert torch.equal(gx0, gx1)
    if gs0 is None:
        assert gs1 is None
    else:
        torch.testing.assert_close(gs0, gs1, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", ["int8 symmetric", "uint8 LSQ"])
def test_a_view_a_leaf_or_a_half_input_is_not_overwritten(name):
    q, _ = _both(name, _input())
    q.overwrites_input = True
    base = _input().requires_grad_(True) * 1.0
    kept = base.detach().clone()
    y = q(base[:, :3])  # a view: its base may be read elsewhere
    y.sum().backward()
    assert torch.equal(base.detach().nan_to_num(7.0), kept.nan_to_num(7.0))
    leaf = _input().requires_grad_(True)
    assert q(leaf).data_ptr() != leaf.data_ptr()
    half = (_input().requires_grad_(True) * 1.0).to(torch.bfloat16)
    assert q(half).data_ptr() != half.data_ptr()


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("name", ["uint8", "uint8 LSQ"])
def test_absorbing_a_relu_gives_the_relus_gradient(name, overwrite):
    # Quantizer.absorbs_relu: the quantizer followed by torch.relu, in one function whose
    # output a ReLUAfterQuant may pass on
    x = _input()
    q, ref = _both(name, x)
    x = _ties(q, x)
    q.absorbs_relu, q.overwrites_input = True, overwrite
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    leaf, leaf0 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = q(leaf * 1.0)
    assert y.grad_fn.relu_applied
    y0 = torch.relu(eager_forward(ref, leaf0))
    y.backward(upstream)
    y0.backward(upstream)
    assert torch.equal(y.detach().nan_to_num(7.0), y0.detach().nan_to_num(7.0))
    assert torch.equal(leaf.grad == 0, leaf0.grad == 0)
    torch.testing.assert_close(leaf.grad, leaf0.grad, rtol=2**-23, atol=0)
    if q.learn_scale:
        finite = torch.isfinite(x)
        q2, ref2 = _both(name, x)
        q2.absorbs_relu = True
        xf = torch.where(finite, x, torch.zeros_like(x))
        q2(xf.clone().requires_grad_(True)).backward(upstream)
        torch.relu(eager_forward(ref2, xf.clone().requires_grad_(True))).backward(upstream)
        size = float(upstream.abs().sum()) * q2.qmax / math.sqrt(x.numel() * q2.qmax)
        assert (q2.scale.grad - ref2.scale.grad).abs().max() <= 1e-5 * size


def test_absorbing_a_relu_needs_a_grid_from_zero():
    q = _activation("symmetric")
    q.absorbs_relu = True
    with pytest.raises(QuantizerError, match="lowest value is 0"):
        q(torch.randn(4, requires_grad=True))


@given(
    x=scaled_tensors(),
    bits=st.integers(2, 10),
    learn=st.booleans(),
    overwrite=st.booleans(),
    relu=st.booleans(),
)
def test_property_overwriting_and_absorbing_a_relu_keep_the_eager_values(x, bits, learn, overwrite, relu):
    # invariant: on any data, an unsigned quantizer computing in its input's buffer and/or
    # giving a following ReLU's gradient gives the eager chain's values (then torch.relu) and
    # a gradient to x that is zero exactly where the eager one is, equal up to one rounding
    q = Uniform(bits, mode="unsigned", learn_scale=learn)
    q.init_from(x)
    ref = Uniform(bits, mode="unsigned", learn_scale=learn)
    ref.load_state_dict(q.state_dict())
    q.overwrites_input, q.absorbs_relu = overwrite, relu
    y, y0, gx, gx0 = _fused_and_eager_then_relu(q, ref, x, relu)
    assert torch.equal(y, y0)
    assert torch.equal(gx == 0, gx0 == 0)
    torch.testing.assert_close(gx, gx0, rtol=2**-23, atol=0)


def _fused_and_eager_then_relu(q: Uniform, ref: Uniform, x: torch.Tensor, relu: bool):
    """(fused output, eager output, their gradients to x): ``q`` on an op's output, ``ref``'s
    eager chain followed by ``torch.relu`` when ``relu``, both backward from one upstream."""
    upstream = torch.linspace(-1.0, 2.0, x.numel()).reshape(x.shape)
    leaf, leaf0 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = q(leaf * 1.0)
    y0 = eager_forward(ref, leaf0)
    y0 = torch.relu(y0) if relu else y0
    y.backward(upstream)
    y0.backward(upstream)
    return y.detach(), y0.detach(), leaf.grad, leaf0.grad


@pytest.mark.parametrize("layout", ["a slice of a concatenation's gradient", "channels_last"])
@pytest.mark.parametrize("name", ["uint8", "uint8 LSQ", "int8 asym LSQ"])
def test_strided_tensors_give_the_contiguous_results(name, layout, monkeypatch):
    # blocks are cut from contiguous tensors only; a gradient that is a view into a
    # concatenation's, or a channels_last activation, takes the whole-tensor path with
    # the values and gradients of the contiguous one
    monkeypatch.setattr(fused, "_BLOCK", 5)
    x = _ties(_both(name, _input())[0], _input())
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for strided in (False, True):
        q, _ = _both(name, _input())
        q.overwrites_input = True
        leaf = x.clone().requires_grad_(True)
        produced = leaf * 1.0
        if strided and layout == "channels_last":
            produced = produced.contiguous(memory_format=torch.channels_last)
        y = q(produced)
        if strided and layout != "channels_last":
            other = torch.zeros_like(y)
            y = torch.cat([other, y], dim=1)[:, x.shape[1] :]  # y's gradient: a strided slice
        y.backward(upstream)
        results.append((y.detach(), leaf.grad, None if q.scale.grad is None else q.scale.grad.clone()))
    (y0, gx0, gs0), (y1, gx1, gs1) = results
    assert torch.equal(y0.nan_to_num(7.0), y1.nan_to_num(7.0))
    assert torch.equal(gx0 == 0, gx1 == 0)
    torch.testing.assert_close(gx0, gx1, rtol=0, atol=0)
    if gs0 is not None:
        torch.testing.assert_close(gs0, gs1, rtol=1e-5, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", ["uint8", "uint8 LSQ", "int8 asym LSQ"])
def test_blocks_and_the_whole_tensor_agree(name, monkeypatch):
    # the same quantizer on the same data, whole and in blocks of 7 (the last one short):
    # identical values and gradients to x, the scale's gradient up to summation order
    x = _ties(_both(name, _input())[0], _input())
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for block in (10**9, 7):
        monkeypatch.setattr(fused, "_BLOCK", block)
        q, _ = _both(name, _input())
        leaf = x.clone().requires_grad_(True)
        y = q(leaf * 1.0)
        y.backward(upstream)
        results.append((y.detach(), leaf.grad, None if q.scale.grad is None else q.scale.grad.clone()))
    (y0, gx0, gs0), (y1, gx1, gs1) = results
    assert torch.equal(y0.nan_to_num(7.0), y1.nan_to_num(7.0))
    assert torch.equal(gx0, gx1)
    if gs0 is not None:
        torch.testing.assert_close(gs0, gs1, rtol=1e-5, atol=0, equal_nan=True)


@pytest.mark.parametrize("relu", [False, True])
def test_flushed_denormals_keep_the_eager_range_test(relu):
    # the grid-from-0 encoding tests 0 <= x / s against the negative float next to 0; with
    # denormals flushed that float reads as -0, and an exact 0 must still count as inside
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        x = torch.tensor([0.0, -1e-40, -1e-30, 0.3, 0.05, 30.0] * 4)
        q, ref = _both("uint8 LSQ", x)
        q.absorbs_relu = relu
        y, y0, gx, gx0 = _fused_and_eager_then_relu(q, ref, x, relu)
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(y, y0)
    assert torch.equal(gx == 0, gx0 == 0)
    assert gx[0] == (0.0 if relu else -1.0)  # the exact 0: inside the range (upstream -1 there)
