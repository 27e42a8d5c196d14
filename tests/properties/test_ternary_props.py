"""Invariants of Ternary (TWN) and TernaryTanh (TernaryNet's activation)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import finite32, scaled_tensors, tensors

from qseg.errors import QuantizerError
from qseg.quantizers import Ternary, TernaryTanh


@given(scaled_tensors())
def test_twn_values_threshold_and_scale(x):
    y = Ternary()(x)
    mag = x.abs().double()
    delta = 0.7 * mag.mean()
    above = mag > delta
    alpha = mag[above].mean() if above.any() else torch.tensor(0.0, dtype=torch.float64)
    assert torch.equal(y == 0, ~above)
    torch.testing.assert_close(y[above].abs().double(), alpha.expand(int(above.sum())), rtol=1e-6, atol=0)
    assert torch.equal(torch.sign(y[above]), torch.sign(x[above]))
    assert y.unique().numel() <= 3


@given(scaled_tensors())
def test_twn_idempotent_and_odd(x):
    q = Ternary()
    y = q(x)
    torch.testing.assert_close(q(y), y, rtol=1e-6, atol=0)
    assert torch.equal(q(-x), -y)


@given(tensors(finite32, min_size=2))
def test_twn_is_monotone(x):
    xs, _ = torch.sort(x)
    y = Ternary()(xs)
    assert (y[1:] >= y[:-1]).all()


@given(st.integers(1, 6), st.integers(1, 5), st.sampled_from([0, 1]))
def test_twn_per_channel_equals_per_slice(out_ch, in_ch, axis):
    w = torch.randn(out_ch, in_ch, 3, 3)
    y = Ternary(channel_axis=axis)(w)
    for c in range(w.shape[axis]):
        # equal up to the summation order of the statistics
        torch.testing.assert_close(y.select(axis, c), Ternary()(w.select(axis, c)), rtol=1e-6, atol=0)


def test_twn_gradient_is_the_identity_and_axis_is_checked():
    w = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)
    Ternary(channel_axis=0)(w).backward(upstream)
    assert torch.equal(w.grad, upstream)
    with pytest.raises(QuantizerError, match="channel_axis=2"):
        Ternary(channel_axis=2)(torch.randn(4, 3))


def test_twn_non_finite_poisons_only_its_slice():
    w = torch.randn(3, 4)
    w[1, 2] = float("inf")
    y = Ternary(channel_axis=0)(w)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    assert torch.isnan(Ternary()(w)).all()


@given(tensors(st.floats(-3, 3, width=32), min_size=2), st.floats(0.5, 20))
def test_ternary_tanh_train_is_smooth_monotone_and_bounded(x, beta):
    act = TernaryTanh(beta_start=beta)
    xs, _ = torch.sort(x)
    y = act(xs)
    assert (y.abs() <= 1).all() and (y[1:] >= y[:-1] - 1e-7).all()
    torch.testing.assert_close(act(-xs), -y)


@given(tensors(st.floats(-3, 3, width=32)))
def test_ternary_tanh_eval_is_hard_ternary(x):
    y = TernaryTanh().eval()(x)
    expected = torch.sign(x) * (x.abs() > 0.5)
    assert torch.equal(y, expected)


def test_ternary_tanh_approaches_hard_as_beta_grows():
    x = torch.tensor([-1.2, -0.7, -0.3, 0.0, 0.3, 0.7, 1.2])
    act = TernaryTanh(beta_start=3.0, beta_end=200.0)
    hard = act.eval()(x)
    act.train()
    gaps = []
    for progress in (0.0, 0.02, 1.0):
        act.anneal(progress)
        gaps.append((act(x) - hard).abs().max().item())
    assert gaps[0] > gaps[1] > 0.0 and gaps[2] < 1e-6
    assert act.beta.item() == 200.0


@given(tensors(st.floats(-3, 3, width=32)), st.floats(1, 10))
def test_ternary_tanh_eval_gradient_is_the_soft_slope(x, beta):
    act = TernaryTanh(beta_start=beta)
    upstream = torch.randn(x.shape)
    soft_x = x.clone().requires_grad_(True)
    act.train()(soft_x).backward(upstream)
    hard_x = x.clone().requires_grad_(True)
    act.eval()(hard_x).backward(upstream)
    torch.testing.assert_close(hard_x.grad, soft_x.grad, rtol=1e-4, atol=1e-5)


def test_anneal_checks_progress():
    with pytest.raises(QuantizerError, match="progress"):
        TernaryTanh().anneal(1.5)
