"""Invariants of Binary (BNN, DoReFa 1-bit) and DoReFa k-bit weights."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import finite32, scaled_tensors, tensors

from qseg.quantizers import Binary, DoReFa

nonzero = scaled_tensors().filter(lambda x: bool((x != 0).any()))


@given(scaled_tensors())
def test_bnn_sign_is_plus_minus_one_with_zero_positive(x):
    y = Binary()(x)
    assert set(y.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(y, torch.where(x >= 0, 1.0, -1.0))
    assert torch.equal(Binary()(y), y)


def test_bnn_maps_both_zeros_to_plus_one():
    assert Binary()(torch.tensor([0.0, -0.0])).tolist() == [1.0, 1.0]


@given(tensors(finite32, min_size=2))
def test_binary_is_monotone(x):
    xs, _ = torch.sort(x)
    for q in (Binary(), Binary(scale="mean")):
        y = q(xs)
        assert (y[1:] >= y[:-1]).all()


@given(scaled_tensors())
def test_bnn_gradient_window(x):
    x = x.clone().requires_grad_(True)
    upstream = torch.randn(x.shape)
    Binary()(x).backward(upstream)
    assert torch.equal(x.grad, torch.where(x.detach().abs() <= 1, upstream, torch.zeros_like(upstream)))


@given(nonzero)
def test_mean_scaled_binary(x):
    q = Binary(scale="mean")
    y = q(x)
    e = x.abs().double().mean().float()  # accumulated in float64, rounded once
    assert torch.equal(y.abs(), e.expand_as(y))
    assert torch.equal(torch.sign(y), torch.where(x >= 0, 1.0, -1.0))
    torch.testing.assert_close(q(y), y, rtol=1e-6, atol=0)  # E|y| = E|x| up to summation order
    xg = x.clone().requires_grad_(True)
    upstream = torch.randn(x.shape)
    q(xg).backward(upstream)
    assert torch.equal(xg.grad, upstream)  # E is held constant, sign is straight-through


@given(st.integers(1, 8), scaled_tensors())
def test_dorefa_levels_are_odd_multiples_of_one_over_n(bits, x):
    q = DoReFa(bits)
    y = q(x)
    if bits == 1:
        assert torch.equal(y, Binary(scale="mean")(x))
        return
    n = 2**bits - 1
    codes = torch.round(y.double() * n)
    assert (codes.abs() % 2 == 1).all()
    assert codes.abs().max() <= n
    assert torch.equal(codes.float() * torch.tensor(1.0 / n), y)
    assert y.unique().numel() <= 2**bits


@given(st.integers(2, 8), nonzero)
def test_dorefa_spans_minus_one_to_one(bits, x):
    y = DoReFa(bits)(x)
    top = torch.tanh(x).abs().max()
    # the entry of largest |tanh| reaches +-1 exactly
    assert y[torch.tanh(x).abs() == top].abs().max() == 1.0


@given(st.integers(2, 8), tensors(finite32, min_size=2))
def test_dorefa_is_monotone(bits, x):
    xs, _ = torch.sort(x)
    y = DoReFa(bits)(xs)
    assert (y[1:] >= y[:-1]).all()


@given(st.integers(2, 8), nonzero)
def test_dorefa_gradient_is_that_of_the_normalized_tanh(bits, x):
    # w_q = 2 round(w' n)/n - 1 with round straight-through: d w_q/dw = d/dw tanh(w)/max|tanh(w)|
    upstream = torch.randn(x.shape)
    a = x.clone().requires_grad_(True)
    DoReFa(bits)(a).backward(upstream)
    b = x.clone().requires_grad_(True)
    t = torch.tanh(b)
    (t / (2 * t.abs().max()) * 2).backward(upstream)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_dorefa_of_zeros_is_finite():
    y = DoReFa(2)(torch.zeros(4))
    assert torch.isfinite(y).all()
