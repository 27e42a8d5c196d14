"""Invariants of FixedPoint (paper A's Q i.f), saturating and published ('wrap') modes."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import finite32, scaled_tensors, tensors

from qseg.quantizers import FixedPoint

formats = st.tuples(st.integers(0, 8), st.integers(0, 8)).filter(lambda t: 1 <= t[0] + t[1] <= 16)
signs = st.booleans()


def grid(q: FixedPoint) -> torch.Tensor:
    hi = 2 ** (q.int_bits + q.frac_bits) - 1
    lo = -hi if q.signed else 0
    return torch.arange(lo, hi + 1, dtype=torch.float64) * q.step


@given(formats, signs, scaled_tensors())
def test_output_is_the_nearest_grid_value(fmt, signed, x):
    q = FixedPoint(*fmt, signed=signed)
    y = q(x).double()
    g = grid(q)
    dist = (x.double()[:, None] - g[None, :]).abs()
    # on the grid, and no grid value is closer than the one chosen
    assert torch.isin(y, g).all()
    assert ((y - x.double()).abs() <= dist.min(dim=1).values).all()


@given(formats, signs, scaled_tensors())
def test_idempotent(fmt, signed, x):
    q = FixedPoint(*fmt, signed=signed)
    assert torch.equal(q(q(x)), q(x))


@given(formats, signs, scaled_tensors())
def test_saturation_bounds(fmt, signed, x):
    q = FixedPoint(*fmt, signed=signed)
    y = q(x)
    top = 2.0**q.int_bits - q.step
    assert y.max() <= top
    assert y.min() >= (-top if signed else 0.0)
    assert (y[x >= top] == top).all()
    if signed:
        assert (y[x <= -top] == -top).all()
    else:
        assert (y[x <= 0] == 0).all()


@given(formats, signs, tensors(finite32, min_size=2))
def test_monotone(fmt, signed, x):
    q = FixedPoint(*fmt, signed=signed)
    xs, _ = torch.sort(x)
    y = q(xs)
    assert (y[1:] >= y[:-1]).all()


@given(formats, scaled_tensors())
def test_odd_symmetry_of_signed_grid(fmt, x):
    q = FixedPoint(*fmt, signed=True)
    assert torch.equal(q(-x), -q(x))


@given(formats, signs, scaled_tensors())
def test_error_within_half_a_step_inside_the_range(fmt, signed, x):
    q = FixedPoint(*fmt, signed=signed)
    top = 2.0**q.int_bits - q.step
    inside = (x <= top) & (x >= (-top if signed else 0.0))
    err = (q(x) - x)[inside].double().abs()
    assert (err <= q.step / 2).all()


@given(formats, st.integers(-2000, 2000))
def test_ties_round_half_to_even(fmt, k):
    q = FixedPoint(*fmt, signed=True)
    tie = torch.tensor([(k + 0.5) * q.step])
    code = float(q(tie) / q.step)
    limit = 2 ** (q.int_bits + q.frac_bits) - 1
    if abs(k + 0.5) < limit:
        assert code in (k, k + 1)
        assert code % 2 == 0


def test_ties_match_torch_and_known_values():
    q = FixedPoint(0, 4)
    x = torch.tensor([0.03125, 0.09375, -0.03125, -0.09375, 0.96875])
    assert q(x).tolist() == [0.0, 0.125, 0.0, -0.125, 0.9375]
    assert torch.equal(q(x), torch.fake_quantize_per_tensor_affine(x, 1 / 16, 0, -15, 15))


@given(formats, signs, scaled_tensors())
def test_clipped_ste_passes_gradient_exactly_where_not_saturated(fmt, signed, x):
    q = FixedPoint(*fmt, signed=signed)
    x = x.clone().requires_grad_(True)
    upstream = torch.arange(1.0, x.numel() + 1)
    q(x).backward(upstream)
    codes = torch.round(x.detach() / q.step)
    hi = 2 ** (q.int_bits + q.frac_bits) - 1
    inside = (codes <= hi) & (codes >= (-hi if signed else 0))
    assert torch.equal(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))


@given(formats, signs, scaled_tensors())
def test_identity_ste(fmt, signed, x):
    q = FixedPoint(*fmt, signed=signed, ste="identity")
    x = x.clone().requires_grad_(True)
    upstream = torch.randn(x.shape)
    q(x).backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_infinities_saturate_and_nan_stays_nan():
    q = FixedPoint(2, 3)
    y = q(torch.tensor([float("inf"), -float("inf"), float("nan"), 1.0]))
    assert y[0] == 4 - 0.125 and y[1] == -(4 - 0.125)
    assert torch.isnan(y[2]) and y[3] == 1.0


def test_bits_count_the_sign():
    assert FixedPoint(0, 4).bits == 5  # paper A's "Qw0.4" needs five bits
    assert FixedPoint(6, 0, signed=False).bits == 6  # Qa6.0 unsigned: 64 levels
    assert FixedPoint(8, 8, signed=False).bits == 16
    assert FixedPoint(0, 4, overflow="wrap").bits == 6  # 0..16 sixteenths plus the sign


# --- overflow="wrap": the published formula and its documented defects ---


def test_wrap_reproduces_the_published_examples():
    q = FixedPoint(0, 4, overflow="wrap")
    x = torch.tensor([1.3, 0.97, -1.3, 0.3, 2.5])
    assert q(x).tolist() == [0.3125, 1.0, -0.3125, 0.3125, 0.5]


def test_wrap_with_no_fraction_bits_truncates_toward_zero():
    q = FixedPoint(3, 0, overflow="wrap")
    assert q(torch.tensor([2.9, -2.9, 9.5, 0.6])).tolist() == [2.0, -2.0, 7.0, 0.0]


@given(st.integers(0, 6), st.integers(2, 8))
def test_wrap_is_not_monotone_past_the_integer_range(i, f):
    q = FixedPoint(i, f, overflow="wrap")
    step = 2.0**-f
    below, above = q(torch.tensor([2.0**i - step, 2.0**i + step])).tolist()
    # the integer part saturates at 2^i - 1 but the fraction is kept
    assert below == 2.0**i - step
    assert above == 2.0**i - 1 + step < below


@given(formats, scaled_tensors())
def test_wrap_equals_saturate_inside_the_integer_range_away_from_carry(fmt, x):
    i, f = fmt
    wrap, sat = FixedPoint(i, f, overflow="wrap"), FixedPoint(i, f)
    frac = x.abs() - x.abs().floor()
    # the two agree where |x| < 2^i and the fraction does not round up to 1.0
    ok = (x.abs() < 2.0**i) & (frac < 1 - 2.0 ** -(f + 1))
    assert torch.equal(wrap(x)[ok], sat(x)[ok])


def test_wrap_is_not_idempotent_at_the_carry():
    q = FixedPoint(0, 4, overflow="wrap")
    once = q(torch.tensor([0.99]))
    assert once.item() == 1.0 and q(once).item() == 0.0
