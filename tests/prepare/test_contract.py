"""The contract of a prepared model, on the paper U-Net and a two-head FCN."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import check_invariants, one_training_step, quantizers_bypassed
from torch import nn

import qseg
from qseg.models import PaperUNet, TwoHeadFCN
from qseg.nn import QuantConv2d, QuantConvTranspose2d

SMALL = (8, 16, 32, 32)


def unet(**kw) -> nn.Module:
    torch.manual_seed(0)
    return PaperUNet(widths=SMALL, **kw)


def x_unet(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(1))


def test_paper_unet_invariants_and_report():
    q = qseg.prepare(unet(dropout=0.3), example_inputs=x_unet())
    check_invariants(q, first={"enc1.conv1"}, last={"head"})
    report = q.qseg_report
    assert report.dropout_removed == ["dropout"]
    assert len(report.layers) == 15 and len(report.quantized_layers) == 13
    assert all(type(q.get_submodule(n)) is QuantConv2d for n in report.quantized_layers)
    # an unsigned 6-bit quantizer after each of the 14 BatchNorms (a ReLU follows each),
    # and one on the input of each decoder's first conv: the concatenation of a bilinear
    # upsampling and a skip is off the grid, so the integer conv needs its input quantized
    assert {a.quantizer for a in report.activations} == {"Q6.0 unsigned"}
    after_bn = [a for a in report.activations if a.rule == "after BatchNorm"]
    assert len(after_bn) == 14 and not any(a.note for a in after_bn)
    inputs = {row.name: row.input for row in report.layers if row.input != "-"}
    assert set(inputs) == {"dec3.conv1", "dec2.conv1", "dec1.conv1"}
    assert all(text.startswith("Q6.0 unsigned from cat") for text in inputs.values())
    text = str(report)
    assert "float: first layer" in text and "float: last layer" in text and "dropout removed: dropout" in text
    assert report.quantized_bytes < 0.2 * report.float_bytes


def test_user_model_is_not_mutated():
    model = unet(dropout=0.3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    qseg.prepare(model, example_inputs=x_unet())
    assert model.training
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "qseg_report")


def test_parameter_names_kept_and_float_checkpoint_loads_strictly():
    model = unet()
    q = qseg.prepare(model, example_inputs=x_unet())
    assert [n for n, _ in q.named_parameters()] == [n for n, _ in model.named_parameters()]
    float_state = unet().state_dict()  # same seed: equal values; perturb to see them arrive
    float_state["enc2.conv1.weight"] = float_state["enc2.conv1.weight"] + 1.0
    q.load_state_dict(float_state, strict=True)
    assert torch.equal(q.get_submodule("enc2.conv1").weight, float_state["enc2.conv1.weight"])
    with pytest.raises(RuntimeError, match="Unexpected key"):
        q.load_state_dict({**float_state, "bogus.weight": torch.zeros(1)}, strict=True)


def test_state_dict_round_trips_exactly():
    recipe = qseg.recipes.load("unet-qa6.0-qw0.4").to_dict()
    recipe["weights"] = {"kind": "power_of_two", "bits": 5}  # a quantizer with state
    q = qseg.prepare(unet(), recipe, example_inputs=x_unet())
    q.get_submodule("enc2.conv1").weight_quant.fix_bounds(q.get_submodule("enc2.conv1").weight)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    fresh = qseg.prepare(unet(), recipe, example_inputs=x_unet())
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert (
        fresh.get_submodule("enc2.conv1").weight_quant.bounds()
        == q.get_submodule("enc2.conv1").weight_quant.bounds()
    )
    q.eval()
    fresh.eval()
    x = x_unet()
    assert torch.equal(q(x), fresh(x))


@pytest.mark.parametrize(
    "make_opt", [lambda p: torch.optim.Adam(p, 1e-3), lambda p: torch.optim.SGD(p, 0.1, 0.9)]
)
def test_trains_with_any_optimizer(make_opt):
    q = qseg.prepare(unet(), example_inputs=x_unet())
    opt = make_opt(q.parameters())
    x = x_unet(4)
    target = (x > 0).float()
    losses = []
    for _ in range(8):
        loss = nn.functional.binary_cross_entropy_with_logits(q(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_train_eval_switching_and_determinism():
    q = qseg.prepare(unet(), example_inputs=x_unet())
    x = x_unet()
    q.train()
    assert all(m.training for m in q.modules())
    train_out = q(x)
    q.eval()
    assert not any(m.training for m in q.modules())
    a, b = q(x), q(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, train_out)  # BatchNorm uses running statistics in eval


def test_other_input_sizes_work():
    q = qseg.prepare(unet(), example_inputs=x_unet(size=64)).eval()
    assert q(torch.randn(3, 1, 96, 128)).shape == (3, 1, 96, 128)


def test_prepared_model_matches_float_model_when_quantizers_are_bypassed():
    # replacing every quantizer by the identity must give back the float model:
    # the rewrite adds quantizers and removes dropout, nothing else
    model = unet(dropout=0.3).eval()
    q = qseg.prepare(model, example_inputs=x_unet()).eval()
    x = x_unet()
    with quantizers_bypassed(q):
        torch.testing.assert_close(q(x), model(x))


def test_two_head_fcn_with_transposed_convs():
    torch.manual_seed(0)
    model = TwoHeadFCN()
    x = torch.randn(2, 3, 64, 64)
    q = qseg.prepare(model, example_inputs=x)
    report = q.qseg_report
    # both 1x1 output convs are last layers: several last layers in a multi-head model
    last = {row.name for row in report.layers if row.weights == "float: last layer"}
    assert len(last) == 2
    check_invariants(q, last=last)
    assert any(isinstance(m, QuantConvTranspose2d) for m in q.modules())
    assert report.dropout_removed
    obj, contour = q.eval()(x)
    assert obj.shape == contour.shape == (2, 2, 64, 64)
    one_training_step(q, x)


def test_example_inputs_are_required_and_checked():
    with pytest.raises(qseg.TraceError, match="example_inputs"):
        qseg.prepare(unet())
    with pytest.raises(qseg.TraceError, match="fails on the example inputs"):
        qseg.prepare(unet(), example_inputs=torch.randn(1, 3, 64, 64))


def test_bad_recipe_is_a_recipe_error():
    with pytest.raises(qseg.RecipeError, match=r"weights\.frac_bits"):
        qseg.prepare(
            unet(),
            {"name": "x", "weights": {"kind": "fixed_point", "int_bits": 0, "frac_bits": 40}},
            example_inputs=x_unet(),
        )
    with pytest.raises(qseg.RecipeError, match="unknown recipe 'nope'"):
        qseg.prepare(unet(), "nope", example_inputs=x_unet())


def test_a_module_built_inside_forward_is_traced_through():
    class Shortcut(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.c2 = nn.Conv2d(4, 1, 1)

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = nn.AvgPool2d(kernel_size=1, stride=2)(y)  # not a submodule, as in MONAI's resnet
            return self.c2(y)

    q = qseg.prepare(Shortcut(), example_inputs=torch.randn(2, 1, 8, 8))
    assert q.qseg_report.capture.startswith("torch.fx")
    assert any(n.op == "call_function" and n.target is nn.functional.avg_pool2d for n in q.graph.nodes)


def test_in_place_activation_after_a_quantizer_trains():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 1, 1),
    )
    q = qseg.prepare(model, example_inputs=torch.randn(2, 1, 12, 12))
    one_training_step(q, torch.randn(2, 1, 12, 12))


def test_ordered_dict_outputs_are_captured_by_fx():
    from collections import OrderedDict

    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 1, 1)

        def forward(self, x):
            return OrderedDict(out=self.b(torch.relu(self.a(x))))

    q = qseg.prepare(DictOut(), example_inputs=torch.randn(1, 1, 8, 8))
    assert q.qseg_report.capture.startswith("torch.fx")
