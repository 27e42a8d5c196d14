"""Invariants of PowerOfTwo (INQ's grid, paper B)."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import scaled_tensors

from qseg.errors import QuantizerError
from qseg.quantizers import PowerOfTwo

bit_widths = st.integers(2, 8)


def grid(n1: int, n2: int) -> torch.Tensor:
    powers = torch.tensor([2.0**p for p in range(n2, n1 + 1)], dtype=torch.float64)
    return torch.cat([-powers.flip(0), torch.zeros(1, dtype=torch.float64), powers])


def nonzero(x: torch.Tensor) -> bool:
    return bool((x != 0).any())


@given(bit_widths, scaled_tensors().filter(nonzero))
def test_output_is_the_nearest_grid_value_ties_to_larger(bits, x):
    q = PowerOfTwo(bits)
    n1, n2 = q.bounds(x)
    assert n1 - n2 + 1 == 2 ** (bits - 2)
    g = grid(n1, n2)
    y, xd = q(x).double(), x.double()
    assert torch.isin(y, g).all()
    dist = (xd[:, None] - g[None, :]).abs()
    best = dist.min(dim=1).values
    assert torch.equal((y - xd).abs(), best)
    # where two grid values are equally near, the larger magnitude wins
    tied = (dist == best[:, None]).sum(dim=1) > 1
    assert (y[tied].abs() == (g[None, :].abs() * (dist == best[:, None])).max(dim=1).values[tied]).all()


@given(bit_widths, scaled_tensors().filter(nonzero))
def test_largest_magnitude_maps_to_the_top_of_the_grid(bits, x):
    q = PowerOfTwo(bits)
    n1, _ = q.bounds(x)
    s = x.abs().max()
    assert 3 * 2.0 ** (n1 - 2) <= s < 3 * 2.0 ** (n1 - 1)
    assert q(x).abs().max() == 2.0**n1


@given(bit_widths, scaled_tensors())
def test_idempotent_and_odd(bits, x):
    q = PowerOfTwo(bits)
    y = q(x)
    assert torch.equal(q(y), y)
    assert torch.equal(q(-x), -y)


@given(bit_widths, scaled_tensors(), scaled_tensors())
def test_monotone_with_fixed_bounds(bits, w, x):
    q = PowerOfTwo(bits)
    if not nonzero(w):
        return
    q.fix_bounds(w)
    xs, _ = torch.sort(x)
    y = q(xs)
    assert (y[1:] >= y[:-1]).all()


@given(bit_widths, scaled_tensors().filter(nonzero), st.floats(1.0, 1e6))
def test_fixed_bounds_saturate_at_two_to_n1(bits, w, factor):
    q = PowerOfTwo(bits)
    n1, n2 = q.fix_bounds(w)
    big = w * factor
    y = q(big)
    assert q.bounds() == (n1, n2)
    assert y.abs().max() <= 2.0**n1
    assert (y[big.abs() >= 3 * 2.0 ** (n1 - 1)].abs() == 2.0**n1).all()


@given(st.integers(2, 8), st.integers(-20, 20))
def test_ties_at_bin_midpoints(bits, n1):
    q = PowerOfTwo(bits)
    q.fix_bounds(torch.tensor([2.0**n1]))
    n1_, n2 = q.bounds()
    assert n1_ == n1
    # between 2^(p-1) and 2^p the midpoint is 3 * 2^(p-2): it goes up to 2^p
    mids = torch.tensor([3 * 2.0 ** (p - 2) for p in range(n2 + 1, n1 + 1)])
    assert torch.equal(q(mids), torch.tensor([2.0**p for p in range(n2 + 1, n1 + 1)]))
    # between 0 and 2^n2 the midpoint 2^(n2-1) goes up, just below it goes to 0
    low = torch.tensor([2.0 ** (n2 - 1)])
    assert q(low).item() == 2.0**n2
    assert q(torch.nextafter(low, torch.zeros(1))).item() == 0.0


@given(bit_widths, scaled_tensors().filter(nonzero))
def test_gradient_is_the_identity(bits, x):
    q = PowerOfTwo(bits)
    x = x.clone().requires_grad_(True)
    upstream = torch.randn(x.shape)
    q(x).backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_paper_counts_of_values():
    # INQ 7 bit: 32 exponents, 65 values; 5 bit: 8 exponents, 17 values
    for bits, exps in ((7, 32), (5, 8)):
        q = PowerOfTwo(bits)
        assert q.num_exponents == exps
        mags = 2.0 ** torch.linspace(-40, 0, 4001)
        w = torch.cat([-mags, torch.zeros(1), mags])
        assert q(w).unique().numel() == 2 * exps + 1 <= 2**bits


def test_bounds_travel_in_the_state_dict():
    q = PowerOfTwo(5)
    q.fix_bounds(torch.tensor([0.3, -0.02]))
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    fresh = PowerOfTwo(5)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.bounds() == q.bounds() == (-2, -9)
    x = torch.randn(100)
    assert torch.equal(fresh(x), q(x))
    fresh.release_bounds()
    assert fresh.bounds(x) != (-2, -9)


def test_non_finite_and_zero_inputs():
    q = PowerOfTwo(4)
    assert torch.isnan(q(torch.tensor([0.5, float("nan")]))).all()
    assert torch.isnan(q(torch.tensor([0.5, float("inf")]))).all()
    assert torch.equal(q(torch.zeros(3)), torch.zeros(3))
    q.fix_bounds(torch.tensor([0.5]))
    y = q(torch.tensor([float("inf"), -float("inf"), float("nan"), 0.25]))
    assert y[0] == 0.5 and y[1] == -0.5 and torch.isnan(y[2]) and y[3] == 0.25


def test_bounds_cannot_come_from_a_degenerate_tensor():
    q = PowerOfTwo(4)
    for bad in (torch.zeros(3), torch.tensor([]), torch.tensor([1.0, float("nan")])):
        with pytest.raises(QuantizerError, match="power-of-two bounds"):
            q.fix_bounds(bad)
    with pytest.raises(QuantizerError, match="not fixed"):
        q.bounds()
