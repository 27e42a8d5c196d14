"""The rescale pass: the float function is kept, quantized weights and BatchNorm outputs
span their grids, and activations are left alone (with the reason) where a scaled tensor
would reach something that cannot compensate."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import quantizers_bypassed
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qseg
from qseg.errors import RecipeError
from qseg.models import PaperUNet, TwoHeadFCN
from qseg.nn import QUANTIZED
from qseg.passes import plan_rescale, rescale
from qseg.recipes import Recipe, builtin_names, load

# Q8.8 resolves a float model without rescaling, and would be scaled by ~10^3 (its recipe says why)
FIXED_POINT_UNETS = ["unet-qa6.0-qw0.4", "unet-qa6.0-qw0.4-exact", "unet-qa8.0-qw0.8", "unet-qa4.0-qw0.2"]


def recipe(name: str = "unet-qa6.0-qw0.4", on: bool = True) -> Recipe:
    return load(name).replace(rescale=on)


def randomize(model: nn.Module, weight_scale: float = 0.3, gamma: tuple = (0.5, 2.0)) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, and weights far from any
    grid's top, as in a trained float model."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.05, 2.0)
                m.weight.uniform_(*gamma)
                m.bias.uniform_(-1.0, 1.0)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.weight.mul_(weight_scale)
    return model


def unet() -> nn.Module:
    return randomize(PaperUNet(widths=(4, 8, 8, 8))).eval()


def relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    return float((expected - got).abs().max() / expected.abs().max())


def float_outputs(model: nn.Module, qmodel: nn.Module, x: torch.Tensor, mode: str) -> tuple:
    model, qmodel = copy.deepcopy(model).train(mode == "train"), copy.deepcopy(qmodel).train(mode == "train")
    with torch.no_grad(), quantizers_bypassed(qmodel):
        return model(x), qmodel(x), model, qmodel


def test_the_float_function_is_kept_in_eval_mode():
    model, x = unet(), torch.randn(2, 1, 16, 16)
    q = qseg.prepare(model, recipe(), example_inputs=x)
    expected, got, _, _ = float_outputs(model, q, x, "eval")
    assert relative_error(expected, got) < 1e-5
    assert not torch.equal(q.enc2.conv1.weight, model.enc2.conv1.weight)


def test_the_quantized_model_starts_closer_to_the_float_one():
    # running statistics measured on data, as in a trained model (random ones would make
    # every BatchNorm output nearly constant)
    model, x = randomize(PaperUNet(widths=(4, 8, 8, 8))), torch.randn(4, 1, 16, 16)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the batches below
    with torch.no_grad():
        model.train()
        for _ in range(4):
            model(torch.randn(4, 1, 16, 16))
    model.eval()

    def error(q: nn.Module) -> float:
        with torch.no_grad():
            expected = model(x)
            return float((q.eval()(x) - expected).abs().mean() / expected.abs().mean())

    on = error(qseg.prepare(model, recipe(), example_inputs=x))
    off = error(qseg.prepare(model, recipe(on=False), example_inputs=x))
    assert on < 0.5 * off, (on, off)


def test_the_float_function_is_kept_in_train_mode_with_consistent_running_stats():
    # BatchNorm's eps does not scale with its input: with eps -> 0 train mode is exact too
    model = unet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-12
    x = torch.randn(2, 1, 16, 16)
    q = qseg.prepare(model, recipe(), example_inputs=x)
    plan = plan_rescale(qseg.prepare(model, recipe(on=False), example_inputs=x))
    expected, got, model_after, q_after = float_outputs(model, q, x, "train")
    assert relative_error(expected, got) < 1e-5
    # the running statistics moved as the float model's, times the plan's factors
    assert plan.stats_scale
    for name, f in plan.stats_scale.items():
        float_bn, bn = model_after.get_submodule(name), q_after.get_submodule(name)
        torch.testing.assert_close(
            bn.running_mean.double(), float_bn.running_mean.double() * f, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            bn.running_var.double(), float_bn.running_var.double() * f * f, rtol=1e-5, atol=0
        )


@pytest.mark.parametrize(("name", "top"), [("unet-qa6.0-qw0.4", 15 / 16), ("unet-qa4.0-qw0.2", 3 / 4)])
def test_quantized_weights_reach_the_grid_top_per_output_channel(name, top):
    model, x = unet(), torch.randn(1, 1, 16, 16)
    q = qseg.prepare(model, recipe(name), example_inputs=x)
    fitted = plan_rescale(qseg.prepare(model, recipe(name, on=False), example_inputs=x)).fitted
    quantized = [n for n, m in q.named_modules() if type(m) in QUANTIZED.values()]
    assert sorted(fitted) == sorted(quantized) and len(quantized) == 13
    for n in quantized:
        layer = q.get_submodule(n)
        peaks = layer.weight.detach().abs().amax(dim=(1, 2, 3))
        torch.testing.assert_close(peaks, torch.full_like(peaks, top))
        # on the grid, each filter's largest weight is the top code itself
        assert torch.equal(
            layer.quantized_weight().detach().abs().amax(dim=(1, 2, 3)), torch.full_like(peaks, top)
        )
    # float layers keep their weights (the head's is divided by B, see below)
    assert torch.equal(q.enc1.conv1.weight, model.enc1.conv1.weight)


def test_activation_factor_is_three_quarters_of_the_grid_over_the_peak_estimate():
    model, x = unet(), torch.randn(1, 1, 16, 16)
    q = qseg.prepare(model, recipe(), example_inputs=x)
    # dec1.bn2 feeds only the float logits conv: it stays unscaled, so the head keeps its weights
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and n != "dec1.bn2"}
    peak = max(float((m.bias + 3.1 * m.weight.abs()).max().detach()) for m in bns.values())
    b = 47 / peak  # Q6.0 unsigned: 3/4 of 63, rounded down to the grid
    assert b > 1
    plan = plan_rescale(qseg.prepare(model, recipe(on=False), example_inputs=x))
    assert plan.factor == pytest.approx(b, rel=1e-12)
    assert set(plan.affine_scale) == set(bns) and plan.unscaled == ("dec1.bn2",) and plan.divided == ()
    for name, bn in bns.items():
        torch.testing.assert_close(q.get_submodule(name).bias, bn.bias * b)
    assert torch.equal(q.dec1.bn2.bias, model.dec1.bn2.bias)
    assert torch.equal(q.head.weight, model.head.weight) and torch.equal(q.head.bias, model.head.bias)
    text = str(q.qseg_report)
    assert f"B = {b:.4g}" in text and "rescale: weights of 13 layers" in text and "dec1.bn2" in text


class SharedSkip(nn.Module):
    """``u`` meets ``v`` at a concatenation and also feeds a float side head: b2 cannot stay
    unscaled, so the side head divides its weight; b4 feeds only the float head and can."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c3, self.b3 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c4, self.b4 = nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head, self.side = nn.Conv2d(4, 1, 1), nn.Conv2d(4, 1, 1)

    def forward(self, x):
        u = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        v = torch.relu(self.b3(self.c3(u)))
        w = torch.relu(self.b4(self.c4(torch.cat([u, v], dim=1))))
        return self.head(w), self.side(u)


def test_a_float_layer_divides_its_weight_when_its_input_must_stay_scaled():
    model, x = randomize(SharedSkip()).eval(), torch.randn(2, 1, 8, 8)
    q = qseg.prepare(model, recipe(), example_inputs=x)
    plan = plan_rescale(qseg.prepare(model, recipe(on=False), example_inputs=x))
    assert plan.divided == ("side",) and plan.unscaled == ("b4",)
    assert set(plan.affine_scale) == {"b1", "b2", "b3"}
    torch.testing.assert_close(q.side.weight, model.side.weight / plan.factor)
    assert torch.equal(q.side.bias, model.side.bias) and torch.equal(q.head.weight, model.head.weight)
    assert "weights of side divided by B" in q.qseg_report.rescale
    expected, got, _, _ = float_outputs(model, q, x, "eval")
    for e, g in zip(expected, got, strict=True):
        assert relative_error(e, g) < 1e-5


class ResidualBlock(nn.Module):
    """A ResNet block: b2 only feeds the addition, so prepare quantizes the sum, not b2."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c3, self.b3 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        x = torch.relu(self.b0(self.c0(x)))
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return self.head(torch.relu(self.b3(self.c3(torch.relu(x + y)))))


def test_a_batchnorm_that_only_feeds_an_addition_carries_the_factor_like_the_skip():
    model, x = randomize(ResidualBlock()).eval(), torch.randn(2, 1, 8, 8)
    q = qseg.prepare(model, recipe(), example_inputs=x)
    assert "b2" not in {a.after for a in q.qseg_report.activations}
    plan = plan_rescale(qseg.prepare(model, recipe(on=False), example_inputs=x))
    # without b2 the addition would join x * B and an unscaled y: nothing could be rescaled
    assert plan.factor is not None and set(plan.affine_scale) == {"b0", "b1", "b2"}
    assert plan.unscaled == ("b3",)  # it only feeds the float head
    expected, got, _, _ = float_outputs(model, q, x, "eval")
    assert relative_error(expected, got) < 1e-5


def test_activations_are_never_shrunk():
    model = randomize(PaperUNet(widths=(4, 8, 8, 8)), gamma=(20.0, 21.0)).eval()  # peaks above 62
    x = torch.randn(1, 1, 16, 16)
    q = qseg.prepare(model, recipe(), example_inputs=x)
    assert "never shrunk" in q.qseg_report.rescale
    assert torch.equal(q.enc2.bn1.bias, model.enc2.bn1.bias) and torch.equal(q.head.weight, model.head.weight)
    assert float(q.enc2.conv1.weight.detach().abs().max()) == pytest.approx(
        15 / 16
    )  # weights are fitted anyway


class SideOutput(nn.Module):
    """A quantized BatchNorm's output reaches a sigmoid (or the graph output) without a conv."""

    def __init__(self, tail: str) -> None:
        super().__init__()
        self.tail = tail
        self.c1, self.b1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c3, self.b3 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 1, 1)
        self.register_buffer("offset", torch.full((1, 4, 1, 1), 0.5))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        z = torch.relu(self.b2(self.c2(y)))
        if self.tail == "buffer":
            return self.head(torch.relu(self.b3(self.c3(z + self.offset))))  # a tensor, but not scaled
        if self.tail == "add":
            return self.head(torch.relu(self.b3(self.c3(z + x))))  # an add of B and 1
        if self.tail == "constant":
            return self.head(torch.relu(self.b3(self.c3(z + 0.5))))  # the constant is not scaled
        out = self.head(torch.relu(self.b3(self.c3(z))))
        return out, torch.sigmoid(z) if self.tail == "sigmoid" else z


@pytest.mark.parametrize(
    ("tail", "why"),
    [
        ("sigmoid", "sigmoid (sigmoid) cannot take"),
        ("output", "the graph output cannot take"),
        ("add", "joins tensors with different scales"),
        ("constant", "add (add) cannot take"),
        ("buffer", "add (add) cannot take"),
    ],
)
def test_activation_rescale_is_skipped_with_the_reason(tail, why):
    model, x = randomize(SideOutput(tail)).eval(), torch.randn(2, 1, 8, 8)
    q = qseg.prepare(model, recipe(), example_inputs=x)
    text = q.qseg_report.rescale
    assert "activations not rescaled" in text and why in text, text
    # all or nothing: no BatchNorm affine was scaled, but the weights were fitted
    assert torch.equal(q.b2.bias, model.b2.bias) and torch.equal(q.head.weight, model.head.weight)
    assert q.c2.weight.abs().amax(dim=(1, 2, 3)).tolist() == pytest.approx([15 / 16] * 4)
    expected, got, _, _ = float_outputs(model, q, x, "eval")
    for e, g in zip(
        expected if isinstance(expected, tuple) else (expected,),
        got if isinstance(got, tuple) else (got,),
        strict=True,
    ):
        assert relative_error(e, g) < 1e-5


def test_transposed_convs_fit_along_their_output_axis_and_two_heads_keep_their_function():
    model, x = randomize(TwoHeadFCN(widths=(4, 8, 8))).eval(), torch.randn(2, 3, 16, 16)
    q = qseg.prepare(model, recipe(), example_inputs=x)
    up = q.object_head.up  # ConvTranspose2d: weight (in, out, kh, kw)
    assert type(up) in QUANTIZED.values()
    peaks = up.weight.detach().abs().amax(dim=(0, 2, 3))
    torch.testing.assert_close(peaks, torch.full_like(peaks, 15 / 16))
    assert "B = " in q.qseg_report.rescale
    plan = plan_rescale(qseg.prepare(model, recipe(on=False), example_inputs=x))
    assert set(plan.unscaled) == {"object_head.bn", "contour_head.bn"} and plan.divided == ()
    expected, got, _, _ = float_outputs(model, q, x, "eval")
    for e, g in zip(expected, got, strict=True):
        assert relative_error(e, g) < 1e-5


@pytest.mark.parametrize("name", ["unet-bnn", "unet-ternarynet"])
def test_grids_that_follow_the_weights_are_left_alone(name):
    model, x = unet(), torch.randn(1, 1, 16, 16)
    q = qseg.prepare(model, recipe(name), example_inputs=x)
    text = q.qseg_report.rescale
    assert text.startswith("weights of 0 layers fitted") and "not fixed point" in text, text
    for key, value in model.state_dict().items():
        assert torch.equal(q.state_dict()[key], value), key


def test_the_pass_is_pure_and_in_place_on_request():
    model, x = unet(), torch.randn(1, 1, 16, 16)
    gm = qseg.prepare(model, recipe(on=False), example_inputs=x)
    before = copy.deepcopy(gm.state_dict())
    out = rescale(gm)
    assert out is not gm and all(torch.equal(v, gm.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(out.enc2.conv1.weight, gm.enc2.conv1.weight)
    assert str(out.graph) == str(gm.graph)  # parameters change, the graph does not
    assert rescale(gm, inplace=True) is gm
    torch.testing.assert_close(gm.state_dict(), out.state_dict(), rtol=0, atol=0)


def test_recipes_enable_it_only_for_fixed_point_unets_and_off_changes_nothing():
    assert {n for n in builtin_names() if load(n).rescale} == set(FIXED_POINT_UNETS)
    assert qseg.recipes.load(qseg.recipes.DEFAULT).rescale
    model, x = unet(), torch.randn(1, 1, 16, 16)
    q = qseg.prepare(model, recipe(on=False), example_inputs=x)
    assert q.qseg_report.rescale == "" and "rescale:" not in str(q.qseg_report)
    for key, value in model.state_dict().items():
        assert torch.equal(q.state_dict()[key], value), key


def test_recipe_key_is_validated_and_round_trips():
    r = Recipe.from_dict({"name": "r", "rescale": True})
    assert r.rescale and r.to_dict()["rescale"] is True and Recipe.from_dict(r.to_dict()) == r
    assert not Recipe.from_dict({"name": "r"}).rescale
    with pytest.raises(RecipeError, match="rescale"):
        Recipe.from_dict({"name": "r", "rescale": "yes"})


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        if torch.jit.isinstance(y, torch.Tensor):  # False on an FX proxy: a mis-trace
            y = y + 1
        return self.head(torch.relu(self.b2(self.c2(y))))


def test_the_fallback_path_reports_that_it_did_not_rescale():
    model = Untraceable().eval()
    q = qseg.prepare(model, recipe(), example_inputs=torch.randn(1, 1, 8, 8))
    assert "module swap" in q.qseg_report.capture
    assert q.qseg_report.rescale.startswith("not applied")
    assert torch.equal(q.c2.weight, model.c2.weight)


@settings(max_examples=15)
@given(
    st.floats(0.01, 3.0),
    st.floats(0.05, 4.0),
    st.floats(-2.0, 2.0),
    st.sampled_from(["unet-qa6.0-qw0.4", "unet-qa8.0-qw0.8", "unet-qa4.0-qw0.2"]),
    st.integers(0, 2**16),
)
def test_any_scale_of_weights_and_batchnorms_keeps_the_function(w_scale, gamma, beta, name, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 1, 1),
    )
    randomize(model, weight_scale=w_scale, gamma=(gamma, gamma * 1.5))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.add_(beta)
    model.eval()
    x = torch.randn(2, 1, 8, 8)
    q = qseg.prepare(model, recipe(name), example_inputs=x)
    expected, got, _, _ = float_outputs(model, q, x, "eval")
    assert relative_error(expected, got) < 1e-5
    top = q.get_submodule("3").weight_quant
    top = (2 ** (top.int_bits + top.frac_bits) - 1) * top.step
    for layer in ("3", "7"):
        peaks = q.get_submodule(layer).weight.detach().abs().amax(dim=(1, 2, 3))
        torch.testing.assert_close(peaks, torch.full_like(peaks, top))


def test_linear_layers_with_batchnorm1d_are_fitted_too():
    model = nn.Sequential(
        nn.Linear(4, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 2),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.05, 2.0)
                m.bias.uniform_(-1.0, 1.0)
    model.eval()
    x = torch.randn(5, 4)
    q = qseg.prepare(model, recipe(), example_inputs=x)
    peaks = q.get_submodule("3").weight.detach().abs().amax(dim=1)
    torch.testing.assert_close(peaks, torch.full_like(peaks, 15 / 16))
    expected, got, _, _ = float_outputs(model, q, x, "eval")
    assert relative_error(expected, got) < 1e-5
