"""Invariants of Uniform (integer grids with a data-derived scale), against the NumPy
reference where a formula decides."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import scaled_tensors

from qseg.errors import QuantizerError
from qseg.quantizers import Uniform

bits = st.integers(2, 16)
modes = st.sampled_from(["symmetric", "unsigned", "asymmetric"])


@given(bits, modes, scaled_tensors())
def test_first_forward_covers_the_tensor_and_matches_the_reference(b, mode, x):
    q = Uniform(b, mode=mode)
    y = q(x)
    spec = q.spec()
    lo, hi = ref.uniform_range(b, mode)
    assert (spec.qmin, spec.qmax) == (lo, hi)
    expected = ref.uniform(x.numpy(), float(spec.scale), spec.zero_point, lo, hi)
    np.testing.assert_allclose(y.double().numpy(), expected, rtol=1e-6, atol=1e-6 * float(spec.scale))
    # the grid covers the tensor it was set from, up to half a step where the zero point
    # was rounded to an integer
    s = float(spec.scale)
    slack = s / 2 if mode == "asymmetric" else 1e-6 * s
    top = (hi - spec.zero_point) * s
    bottom = (lo - spec.zero_point) * s
    assert top >= float(x.max()) - slack - 1e-6 * abs(float(x.max()))
    if mode != "unsigned":
        assert bottom <= min(float(x.min()), 0.0) + slack + 1e-6 * abs(float(x.min()))
    assert float((y.double() - x.double()).abs().max()) <= s / 2 * (1 + 1e-6) + slack or mode == "unsigned"


@given(bits, modes, scaled_tensors())
def test_output_lies_on_the_grid_and_is_idempotent(b, mode, x):
    q = Uniform(b, mode=mode)
    y = q(x)
    spec = q.spec()
    codes = spec.codes(y)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    torch.testing.assert_close(spec.dequantize(codes).to(y.dtype), y, rtol=1e-6, atol=1e-7)
    assert torch.equal(q(y), y) or torch.allclose(q(y), y, rtol=1e-6, atol=float(spec.scale) * 1e-5)


@given(bits, scaled_tensors())
def test_asymmetric_grid_holds_zero_exactly(b, x):
    q = Uniform(b, mode="asymmetric")
    q(x)
    assert q(torch.zeros(3)).abs().max() == 0


@given(st.integers(2, 8), st.floats(1e-3, 1e3))
def test_power_of_two_scale_is_the_smallest_power_that_covers_the_range(b, top):
    q = Uniform(b, mode="unsigned", power_of_two_scale=True)
    q.observe_range(torch.tensor(0.0), torch.tensor(top))
    s = float(q.scale)
    assert math.log2(s) == round(math.log2(s))  # a power of two
    assert (2**b - 1) * s >= top * (1 - 1e-6)  # covers the range
    assert (2**b - 1) * s / 2 < top * (1 + 1e-6)  # half of it would not


def test_per_channel_scales_follow_each_output_channel():
    w = torch.tensor([[[0.5, -1.0]], [[0.02, 0.01]], [[0.0, 0.0]]])
    q = Uniform(8, channel_axis=0)
    y = q(w)
    torch.testing.assert_close(q.scale, torch.tensor([1.0, 0.02, 1.0 * 127]) / 127)
    assert torch.equal(y[2], torch.zeros(1, 2))  # an all-zero channel keeps scale 1
    assert y[0, 0, 1] == -1.0 and y[1, 0, 0] == 0.02  # each channel's extreme is on its grid
    expected = ref.uniform(w.numpy(), (q.scale.numpy()[:, None, None]), 0, -127, 127)
    np.testing.assert_allclose(y.double().numpy(), expected, rtol=1e-6)
    spec = q.spec(w)
    assert spec.axis == 0 and spec.scale.shape == (3,)


def test_lsq_gradients_match_the_paper():
    torch.manual_seed(0)
    x = torch.randn(64) * 2
    q = Uniform(4, learn_scale=True)
    q.observe_range(torch.tensor(-1.0), torch.tensor(1.0))  # clamps part of x
    x.requires_grad_(True)
    q.train()
    q(x).sum().backward()
    s = q.scale.item()
    g = 1 / math.sqrt(x.numel() * q.qmax)
    expected = ref.uniform_lsq_scale_grad(x.detach().numpy(), s, q.qmin, q.qmax) * g
    assert q.scale.grad.item() == pytest.approx(expected, rel=1e-5)
    inside = ((x / s) > q.qmin) & ((x / s) < q.qmax)
    assert torch.equal(x.grad, inside.float())  # straight-through inside, zero where clamped


def test_learned_scale_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    q = Uniform(4, mode="unsigned", channel_axis=0, learn_scale=True)
    x = torch.rand(3, 50) * torch.tensor([[1.0], [4.0], [0.1]])
    q(x)  # sets the per-channel scale before the optimizer is built
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    before = q.scale.detach().clone()
    for _ in range(3):
        loss = (q(x) - x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(before, q.scale.detach())
    path = tmp_path / "q.pt"
    torch.save(q.state_dict(), path)
    again = Uniform(4, mode="unsigned", channel_axis=0, learn_scale=True)
    again.load_state_dict(torch.load(path, weights_only=True))
    again.eval()
    q.eval()
    assert torch.equal(again(x), q(x))


def test_bad_arguments_name_the_argument():
    with pytest.raises(QuantizerError, match="bits must be in"):
        Uniform(1)
    with pytest.raises(QuantizerError, match="mode must be one of"):
        Uniform(8, mode="signed")
    with pytest.raises(QuantizerError, match="asymmetric' is per tensor"):
        Uniform(8, mode="asymmetric", channel_axis=0)
    with pytest.raises(QuantizerError, match="exclude each other"):
        Uniform(8, learn_scale=True, power_of_two_scale=True)
    with pytest.raises(QuantizerError, match="no scale yet"):
        Uniform(8).spec()
    per_channel = Uniform(8, channel_axis=0)
    per_channel(torch.ones(4, 3))
    with pytest.raises(QuantizerError, match=r"holds 4 scales along axis 0.*shape \(2, 3\)"):
        per_channel(torch.ones(2, 3))


def test_prepare_sets_weight_scales_and_a_float_checkpoint_resets_them():
    import qseg
    from qseg.models import PaperUNet

    torch.manual_seed(0)
    model = PaperUNet(widths=(4, 8, 8, 8))
    weights = {"kind": "int", "bits": 4, "channel_axis": 0, "learn_scale": True}
    recipe = qseg.recipes.load("unet-qa6.0-qw0.4").to_dict() | {"name": "w4", "weights": weights}
    q = qseg.prepare(model, recipe, example_inputs=torch.randn(1, 1, 16, 16))
    layer = q.get_submodule("enc2.conv1")
    per_channel_max = layer.weight.detach().abs().amax(dim=(1, 2, 3))
    torch.testing.assert_close(layer.weight_quant.scale.detach(), per_channel_max / 7)
    assert isinstance(layer.weight_quant.scale, torch.nn.Parameter)
    trained = PaperUNet(widths=(4, 8, 8, 8))
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(3)
    q.load_state_dict(trained.state_dict())  # a float checkpoint: quantizer state missing
    per_channel_max = trained.get_submodule("enc2.conv1").weight.abs().amax(dim=(1, 2, 3))
    torch.testing.assert_close(layer.weight_quant.scale.detach(), per_channel_max / 7)
