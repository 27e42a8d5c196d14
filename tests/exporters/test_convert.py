"""qseg.convert: exact BatchNorm folding, integer codes kept, equal outputs, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qseg
from qseg.convert import FrozenActQuant, FrozenLayer, FrozenWeight
from qseg.exporters import check_parity, openvino_from_onnx, runtime_precisions
from qseg.exporters.parity import parity_step
from qseg.models import PaperUNet
from qseg.quantizers import Quantizer

QA6_QW4 = qseg.recipes.load("unet-qa6.0-qw0.4").to_dict()


def trained(
    model: nn.Module, recipe: dict | str = "unet-qa6.0-qw0.4", steps: int = 3, size: int = 32
) -> nn.Module:
    """A prepared model after a few Adam steps, so BatchNorm statistics are not trivial."""
    torch.manual_seed(0)
    q = qseg.prepare(model, recipe, example_inputs=torch.randn(2, model_channels(model), size, size))
    opt = torch.optim.Adam(q.parameters(), 1e-2)
    for _ in range(steps):
        x = torch.randn(4, model_channels(model), size, size)
        out = q(x)
        loss = sum(o.pow(2).mean() for o in (out if isinstance(out, tuple) else (out,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return q.eval()


def model_channels(model: nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


def exact_biases(q: nn.Module) -> None:
    """Identity BatchNorms and zero conv biases: the folded bias is then exactly on the
    int32 accumulator grid, so convert changes no value at all."""
    for m in q.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
            m.running_var.fill_(1 - m.eps)
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            m.bias.data.zero_()


def test_converted_unet_equals_prepared_and_runs_integer_convs():
    q = trained(PaperUNet(widths=(8, 16, 32, 32)))
    exact_biases(q)
    c = qseg.convert(q)
    report = c.qseg_convert
    assert len(report.integer_layers) == 13 and not report.float_input_layers
    assert len(report.folded_norms) == 13 and len(report.removed_relus) == 14
    assert not report.warnings
    x = torch.randn(2, 1, 48, 64)
    torch.testing.assert_close(c(x), q(x), rtol=0, atol=1e-5)
    assert not c.training and q.training is False


def test_bias_rounding_moves_few_activations_by_one_step():
    # the folded bias is rounded to the int32 accumulator grid s_in * s_w (what an
    # integer conv adds); a pre-activation within that rounding of a tie can move by
    # one step: measured on every quantized activation of a trained U-Net
    q = trained(PaperUNet(widths=(8, 16, 32, 32)))
    c = qseg.convert(q)
    x = torch.randn(2, 1, 64, 64)
    taken = {}

    def keep(key):
        def hook(_module, _inputs, output):
            taken[key] = output

        return hook

    for name in ("dec1_bn2_act_quant", "enc2_bn2_act_quant", "bottleneck_bn1_act_quant"):
        q.get_submodule(name).register_forward_hook(keep(("q", name)))
        c.get_submodule(name).register_forward_hook(keep(("c", name)))
    q(x), c(x)
    for name in ("dec1_bn2_act_quant", "enc2_bn2_act_quant", "bottleneck_bn1_act_quant"):
        diff = (taken["q", name] - taken["c", name]).abs()
        assert diff.max() <= 1.0  # at most one step (Q6.0: step 1)
        assert (diff > 0).float().mean() < 0.05, name


def test_batchnorm_folds_into_the_channel_scale_and_codes_stay():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 1, 1),
    )
    q = qseg.prepare(model, QA6_QW4 | {"name": "t"}, example_inputs=torch.randn(2, 2, 9, 9))
    bn = q.get_submodule("4")
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    # beta such that the folded bias (b - mean) * k + beta is k * j / 16, on the int32
    # accumulator grid 1 * 2^-4 * k: convert then rounds nothing and must equal q
    k = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    j = torch.tensor([-7.0, -1.0, 2.0, 5.0])
    bn.bias.data = k * (bn.running_mean - q.get_submodule("3").bias.detach() + j / 16)
    q.eval()
    c = qseg.convert(q)
    layer = c.get_submodule("3")
    assert torch.equal(layer.bias_codes, j.to(torch.int32))
    assert isinstance(layer, FrozenLayer) and layer.integer and layer.codes.dtype == torch.int8
    conv = q.get_submodule("3")
    codes = torch.round(conv.quantized_weight() * 16)
    assert torch.equal(layer.codes.to(torch.float32), codes)  # the 4-bit codes themselves
    expected = (2.0**-4) * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(layer.w_scale, expected.detach())
    assert "4" in c.qseg_convert.folded_norms
    x = torch.randn(3, 2, 9, 9)
    torch.testing.assert_close(c(x), q(x), rtol=0, atol=1e-5)


def test_relu_removed_only_after_an_unsigned_grid():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0, self.b0 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.head = nn.Conv2d(8, 1, 1)

        def forward(self, x):
            x = torch.relu(self.b0(self.c0(x)))
            return self.head(torch.relu(torch.cat([x, self.b1(self.c1(x))], 1)))

    q = qseg.prepare(Res(), example_inputs=torch.randn(2, 1, 8, 8)).eval()
    exact_biases(q)
    c = qseg.convert(q)
    assert c.qseg_convert.removed_relus == ["relu"]  # the one after b0's unsigned quantizer
    acts = [m for m in c.modules() if isinstance(m, FrozenActQuant)]
    assert any(a.qmin < 0 for a in acts)  # b1 feeds the concatenation: signed
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(c(x), q(x), rtol=0, atol=1e-5)


def test_wide_grids_warn_about_the_avx2_int16_pair_bound():
    recipe = QA6_QW4 | {
        "name": "a8w8",
        "weights": {"kind": "fixed_point", "int_bits": 0, "frac_bits": 8},
        "activations": {"kind": "fixed_point", "int_bits": 8, "frac_bits": 0, "signed": False},
    }
    model = PaperUNet(widths=(4, 8, 8, 8))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.uniform_(-0.99, 0.99)  # codes up to +-253
    c = qseg.convert(qseg.prepare(model, recipe, example_inputs=torch.randn(2, 1, 16, 16)).eval())
    assert any("32767" in w for w in c.qseg_convert.warnings)


def test_non_finite_weights_name_the_layer():
    q = trained(PaperUNet(widths=(4, 8, 8, 8)), steps=0)
    with torch.no_grad():
        q.get_submodule("dec2.conv1").weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(qseg.ExportError, match=r"layer dec2\.conv1"):
        qseg.convert(q)


def test_only_prepared_models_convert():
    with pytest.raises(qseg.ExportError, match=r"takes a model returned by qseg\.prepare"):
        qseg.convert(nn.Conv2d(1, 1, 1))


class SkipIfTensor(nn.Module):
    """FX traces it into a wrong graph (``torch.jit.isinstance`` is False on a proxy,
    so the skip is lost): ``prepare`` takes the torch.export + module swap fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c2, self.b2, self.r2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.r1(self.b1(self.c1(x)))
        z = self.r2(self.b2(self.c2(y)))
        if torch.jit.isinstance(y, torch.Tensor):
            z = z + y
        return self.head(self.b3(self.c3(z)))


def test_fallback_model_converts_on_the_inputs_prepare_verified():
    q = trained(SkipIfTensor(), steps=0, size=16)
    assert "torch.export + module swap" in q.qseg_report.capture
    x = torch.randn(3, 1, 20, 20)
    with torch.no_grad():
        expected = qseg.convert(q, example_inputs=torch.randn(2, 1, 16, 16))(x)
        assert torch.equal(qseg.convert(q)(x), expected)  # no inputs: prepare's
    del q.qseg_example_inputs  # a model rebuilt without them
    with pytest.raises(qseg.ExportError, match=r"qseg\.convert\(qmodel, example_inputs=x\)"):
        qseg.convert(q)


def test_fallback_model_converts_like_an_fx_model_and_exports_with_parity(tmp_path):
    q = trained(SkipIfTensor(), size=16)
    x = torch.randn(2, 1, 16, 16)
    c = qseg.convert(q, example_inputs=x)
    report = c.qseg_convert
    # c1 and head stay float (first and last); c2 reads b1's grid through r1, c3 its own input
    # quantizer (the residual sum is off the grid); b2, b3 fold, the ReLUs after unsigned grids go
    assert report.integer_layers == ["c2", "c3"] and not report.float_input_layers
    assert report.folded_norms == ["b2", "b3"] and report.removed_relus == ["r1", "r2"]
    assert isinstance(c.c3, FrozenLayer) and isinstance(c.c3.input_quant, FrozenActQuant)
    assert isinstance(c.b2, nn.Identity) and isinstance(c.b2.act_quant, FrozenActQuant)
    assert type(q.c2).__name__ == "QuantConv2d" and isinstance(q.b2, nn.BatchNorm2d)  # q untouched
    other = torch.randn(3, 1, 24, 32)
    with torch.no_grad():
        # only the folded bias's rounding to the int32 accumulator grid differs (one step at most)
        assert (c(other) - q(other)).abs().max() <= 1.0
        exact_biases(q)
        exact = qseg.convert(q, example_inputs=x)
        assert torch.equal(exact(other), q(other))

    onnx_path = qseg.export_onnx(c, x, tmp_path / "m.onnx")
    ir_path = openvino_from_onnx(onnx_path, tmp_path / "m.xml")
    assert [p.precision for p in runtime_precisions(ir_path)] == ["f32", "u8", "u8", "f32"]
    results = check_parity(c, other, onnx_path, ir_path)
    # the integer layers agree exactly; the float head sums in another order (one ulp)
    assert all(r.max_abs_diff <= 1e-6 for r in results), results


def test_fallback_batchnorm_shared_by_two_convs_is_not_folded():
    class SharedNorm(SkipIfTensor):
        def forward(self, x):
            y = self.r1(self.b1(self.c1(x)))
            z = self.r2(self.b2(self.c2(y)))
            if torch.jit.isinstance(y, torch.Tensor):
                z = self.r2(self.b2(self.c3(z)))  # b2 after c2 and after c3
            return self.head(z)

    q = trained(SharedNorm(), size=16)
    c = qseg.convert(q, example_inputs=torch.randn(2, 1, 16, 16))
    assert c.qseg_convert.integer_layers == ["c2", "c3"] and not c.qseg_convert.folded_norms
    assert isinstance(c.b2, nn.BatchNorm2d) and isinstance(c.b2.act_quant, FrozenActQuant)
    other = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        assert (c(other) - q(other)).abs().max() <= 1.0
        exact_biases(q)
        assert torch.equal(qseg.convert(q, example_inputs=other)(other), q(other))


def test_fx_conv_called_twice_folds_neither_batchnorm():
    # a frozen layer replaces the module for every call: folding the first call's BatchNorm
    # into it would apply that BatchNorm at the second call too (found in the plan refactor)
    class SharedConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1, self.r1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
            self.c2 = nn.Conv2d(8, 8, 3, padding=1)
            self.b2, self.r2 = nn.BatchNorm2d(8), nn.ReLU()
            self.b3, self.r3 = nn.BatchNorm2d(8), nn.ReLU()
            self.head = nn.Conv2d(8, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.r2(self.b2(self.c2(self.r1(self.b1(self.c1(x))))))
            return self.head(self.r3(self.b3(self.c2(y))))  # c2 again, another BatchNorm

    q = trained(SharedConv(), size=16)
    assert isinstance(q, torch.fx.GraphModule)
    c = qseg.convert(q)
    assert "c2" not in c.qseg_convert.integer_layers and "c2" in c.qseg_convert.float_input_layers
    assert "b2" not in c.qseg_convert.folded_norms and "b3" not in c.qseg_convert.folded_norms
    other = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        assert (c(other) - q(other)).abs().max() <= parity_step(c) * 1.001


def test_fx_and_fallback_conversions_of_one_model_take_the_same_decisions():
    class ForcedFallback(nn.Module):
        """FX loses the isinstance branch (False on a proxy): prepare takes the fallback."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x)
            return y if torch.jit.isinstance(x, torch.Tensor) else -y

    torch.manual_seed(0)
    model = PaperUNet(widths=(4, 8, 8, 8)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 1, 16, 16)
    recipe = "unet-qa6.0-qw0.4-exact"  # an input grid too: every conv integer
    via_fx = qseg.convert(qseg.prepare(model, recipe, example_inputs=x))
    q = qseg.prepare(ForcedFallback(model), recipe, example_inputs=x)
    assert "torch.export + module swap" in q.qseg_report.capture
    via_swap = qseg.convert(q)
    fx_report, swap_report = via_fx.qseg_convert, via_swap.qseg_convert
    assert fx_report.integer_layers and fx_report.folded_norms and fx_report.removed_relus
    for field in ("integer_layers", "float_input_layers", "grid_layers", "folded_norms"):
        names = [n.removeprefix("inner.") for n in getattr(swap_report, field)]
        assert names == getattr(fx_report, field), field
    # FX names a removed ReLU by its node (enc1_relu1), the fallback by its module (inner.enc1.relu1)
    relus = [n.removeprefix("inner.").replace(".", "_") for n in swap_report.removed_relus]
    assert relus == fx_report.removed_relus
    with torch.no_grad():
        assert torch.equal(via_swap(x), via_fx(x))


def equals_prepared_and_runs_int8(c: nn.Module, q: nn.Module, x: torch.Tensor, tmp_path) -> None:
    """``c`` (converted from ``q``) computes what ``q`` does on another input, and its files
    store int8 kernels only and run every one of its four convs u8 in OpenVINO, at parity."""
    import onnx

    other = torch.randn(3, 1, 24, 20)
    with torch.no_grad():
        torch.testing.assert_close(c(other), q(other), rtol=0, atol=1e-6)
    onnx_path = qseg.export_onnx(c, x, tmp_path / "m.onnx")
    kernels = [i for i in onnx.load(str(onnx_path)).graph.initializer if len(i.dims) == 4]
    # the float weights stay out of the file
    assert [onnx.TensorProto.DataType.Name(i.data_type) for i in kernels] == ["INT8"] * 4
    ir_path = openvino_from_onnx(onnx_path, tmp_path / "m.xml")
    assert [p.precision for p in runtime_precisions(ir_path)] == ["u8", "u8", "u8", "u8"]
    assert all(r.ok for r in check_parity(c, other, onnx_path, ir_path))


class FunctionalConvs(nn.Module):
    """Convs written as ``F.conv2d`` on parameters (as EfficientNet's same-padding convs
    are traced), between a float first and last layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.w1 = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)
        self.w2 = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)
        self.b2 = nn.Parameter(torch.randn(8) * 0.1)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(torch.nn.functional.conv2d(y, self.w1, padding=1))
        y = torch.relu(torch.nn.functional.conv2d(y, self.w2, self.b2, padding=1))
        return self.head(y)


def test_functional_layers_weights_freeze_to_codes_and_run_int8(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    q = qseg.prepare(FunctionalConvs(), "int8", example_inputs=x)
    qseg.calibrate(q, [torch.randn(2, 1, 16, 16) for _ in range(2)], progress=False)
    c = qseg.convert(q.eval())
    report = c.qseg_convert
    assert report.frozen_weights == ["w1_quant", "w2_quant"]
    assert isinstance(c.w1_quant, FrozenWeight) and c.w1_quant.codes.dtype == torch.int8
    assert c.w1_quant.scale.shape == (8,)  # int8 weights are per output channel
    left = [n for n, m in c.named_modules() if isinstance(m, Quantizer)]
    assert not left, f"weight quantizers left unfrozen: {left}"
    equals_prepared_and_runs_int8(c, q, x, tmp_path)


def test_functional_layers_weights_on_a_non_uniform_grid_freeze_to_their_quantized_values():
    # INQ's power-of-two weights have no QuantSpec: the frozen weight holds the quantized
    # tensor itself (float values on the grid), read by the call as the quantizer's output was
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    q = qseg.prepare(FunctionalConvs(), "fcn-inq7", example_inputs=x).eval()
    assert q.w1_quant.spec(q.w1) is None and not torch.equal(q.w1_quant(q.w1), q.w1)
    c = qseg.convert(q)
    assert c.qseg_convert.frozen_weights == ["w1_quant", "w2_quant"]
    assert not isinstance(c.w1_quant, FrozenWeight)
    with torch.no_grad():
        assert torch.equal(c.w1_quant(), q.w1_quant(q.w1))
        assert torch.equal(c.w2_quant(), q.w2_quant(q.w2))
        torch.testing.assert_close(c(x), q(x), rtol=0, atol=1e-5)
    assert not [n for n, m in c.named_modules() if isinstance(m, Quantizer)]


class SameConv(nn.Conv2d):
    """A conv whose own forward calls ``F.conv2d`` (as EfficientNet's same-padding convs do)."""

    def forward(self, x):
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


class FallbackFunctionalConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.bn1 = SameConv(8, 8, 3), nn.BatchNorm2d(8)
        self.b, self.bn2 = SameConv(8, 8, 3), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        y = torch.relu(self.bn0(self.stem(x)))
        if y.shape[-1] > 2:  # control flow on a shape: torch.fx cannot trace it, torch.export can
            y = torch.relu(self.bn1(self.a(y)))
        y = torch.relu(self.bn2(self.b(y)))
        return self.head(y)


def test_fallback_functional_layers_quantize_through_a_parametrization_and_run_int8(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    q = qseg.prepare(FallbackFunctionalConvs(), "int8", example_inputs=x)
    assert not isinstance(q, torch.fx.GraphModule)  # the fallback path
    assert isinstance(q.a.parametrizations.weight[0], Quantizer)
    rows = {r.name: r.weights for r in q.qseg_report.layers}
    assert rows["a"] == rows["b"] == "int7/ch"
    qseg.calibrate(q, [torch.randn(2, 1, 16, 16) for _ in range(2)], progress=False)
    c = qseg.convert(q.eval())
    assert c.qseg_convert.frozen_weights == ["a.parametrizations.weight.0", "b.parametrizations.weight.0"]
    assert isinstance(c.a.parametrizations.weight[0], FrozenWeight)
    # (the prepared model still computes after convert read its graph from a copy)
    equals_prepared_and_runs_int8(c, q, x, tmp_path)
