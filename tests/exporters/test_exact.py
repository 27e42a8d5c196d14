"""Exact deployment: a model integer from its input grid to its last layer is reproduced
bit for bit by onnxruntime and OpenVINO on every CPU kind, and OpenVINO runs through
compile_openvino, whose exact mode pins the float parts to f32 wherever the CPU would
pick bf16."""

from __future__ import annotations

import warnings
from collections import Counter

import openvino as ov
import pytest
import torch
from nets import Untraceable
from torch import nn

import qseg
from qseg.exporters import check_parity, compile_openvino, export_onnx, openvino_from_onnx, runtime_precisions
from qseg.models import PaperUNet
from qseg.nn import ActQuant
from qseg.runtime import EXACT_CONFIG, cpu_features

EXACT = "unet-qa6.0-qw0.4-exact"


def trained(model: nn.Module, recipe, x: torch.Tensor, steps: int = 2) -> nn.Module:
    torch.manual_seed(0)
    q = qseg.prepare(model, recipe, example_inputs=x)
    opt = torch.optim.Adam(q.parameters(), 1e-2)
    for _ in range(steps):
        loss = q(torch.rand_like(x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return q.eval()


def test_exact_recipe_is_bit_exact_in_both_runtimes_on_the_paper_unet_at_256(tmp_path):
    torch.manual_seed(0)
    q = trained(PaperUNet(), EXACT, torch.rand(2, 1, 64, 64))
    c = qseg.convert(q)
    assert len(c.qseg_convert.integer_layers) == 15 and not c.qseg_convert.float_input_layers
    onnx_path = export_onnx(c, torch.rand(1, 1, 256, 256), tmp_path / "m.onnx")
    ir_path = openvino_from_onnx(onnx_path, tmp_path / "m.xml")
    assert Counter(p.precision for p in runtime_precisions(ir_path)) == {"u8": 15}
    # values beyond the grid's top (1.99) clamp in every runtime alike
    x = torch.rand(1, 1, 256, 256) * 2.5 - 0.2
    results = check_parity(c, x, onnx_path, ir_path)
    assert [r.runtime for r in results] == ["onnxruntime", "openvino"]
    for r in results:
        assert r.exact and str(r) == f"{r.runtime}: bit-exact", r
    # and with a default compile: an all-integer model has no float layer to run in bf16
    (default,) = check_parity(c, x, None, ir_path, exact=False)
    assert default.exact, default


def test_input_grid_puts_the_first_layer_on_integer_codes():
    x = torch.rand(2, 1, 32, 32)
    q = qseg.prepare(PaperUNet(widths=(4, 8, 8, 8)), EXACT, example_inputs=x)
    rows = {row.name: row for row in q.qseg_report.layers}
    assert rows["enc1.conv1"].weights == "Q0.4" and rows["head"].weights == "Q0.4"
    (act,) = [a for a in q.qseg_report.activations if a.after == "x"]
    assert act.quantizer == "Q1.7 unsigned" and "recipe input: 8 bits covering [0, 1]" in act.rule
    seen = []
    handle = q.get_submodule("enc1.conv1").register_forward_pre_hook(lambda _module, a: seen.append(a[0]))
    q(x * 3 - 1)
    handle.remove()
    codes = seen[0] * 128
    assert torch.equal(codes, codes.round()) and codes.min() == 0 and codes.max() == 255


def test_conv_input_placement_does_not_quantize_the_input_twice():
    recipe = qseg.recipes.load(EXACT).replace(activation_placement="conv_input")
    q = qseg.prepare(PaperUNet(widths=(4, 8, 8, 8)), recipe, example_inputs=torch.rand(1, 1, 32, 32))
    on_input = [a for a in q.qseg_report.activations if a.after == "x"]
    assert [a.quantizer for a in on_input] == ["Q1.7 unsigned"], on_input
    assert q.qseg_report.layers[0].input == "-"


def test_input_grid_on_the_fallback_path_is_bit_exact(tmp_path):
    x = torch.rand(2, 1, 16, 16)
    q = trained(Untraceable(), EXACT, x)
    assert "torch.export" in q.qseg_report.capture
    assert isinstance(q.input_quant, ActQuant)  # the model's own input quantizer
    c = qseg.convert(q, example_inputs=x)
    assert "c1" in c.qseg_convert.integer_layers
    other = torch.rand(3, 1, 24, 32)
    onnx_path = export_onnx(c, x, tmp_path / "m.onnx")
    ir_path = openvino_from_onnx(onnx_path, tmp_path / "m.xml")
    for r in check_parity(c, other, onnx_path, ir_path):
        assert r.exact, r


def test_signed_input_grid_warns_about_cpus_without_vnni():
    recipe = qseg.recipes.load(EXACT).to_dict() | {"name": "signed", "input": {"bits": 8, "range": [-1, 1]}}
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    c = qseg.convert(trained(PaperUNet(widths=(4, 8, 8, 8)), recipe, x))
    (warning,) = [w for w in c.qseg_convert.warnings if "signed int8 grid" in w]
    assert warning.startswith("enc1.conv1:") and "VNNI" in warning
    unsigned = qseg.convert(trained(PaperUNet(widths=(4, 8, 8, 8)), EXACT, x.abs()))
    assert not [w for w in unsigned.qseg_convert.warnings if "signed int8 grid" in w]


def small_ir(tmp_path) -> tuple[nn.Module, object]:
    x = torch.rand(1, 1, 16, 16)
    c = qseg.convert(trained(PaperUNet(widths=(4, 8, 8, 8)), "unet-qa6.0-qw0.4", x))
    return c, qseg.export_openvino(c, x, tmp_path / "m.xml")


def test_compile_openvino_exact_pins_f32_and_accuracy_mode_on_every_cpu(tmp_path):
    _, xml = small_ir(tmp_path)
    compiled = compile_openvino(xml, threads=1)
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert str(compiled.get_property("EXECUTION_MODE_HINT")) == "ExecutionMode.ACCURACY"
    assert compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 0
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert set(EXACT_CONFIG) == {
        "INFERENCE_PRECISION_HINT",
        "EXECUTION_MODE_HINT",
        "DYNAMIC_QUANTIZATION_GROUP_SIZE",
        "CPU_DENORMALS_OPTIMIZATION",
    }
    # exact mode changes the float layers only: the quantized convs stay int8
    precisions = Counter(p.precision for p in runtime_precisions(xml))
    assert precisions == {"u8": 13, "f32": 2}
    # a caller's own property wins over the exact defaults
    loose = compile_openvino(xml, config={"EXECUTION_MODE_HINT": "PERFORMANCE"})
    assert str(loose.get_property("EXECUTION_MODE_HINT")) == "ExecutionMode.PERFORMANCE"


def test_compile_openvino_names_a_missing_or_broken_file(tmp_path):
    with pytest.raises(qseg.ExportError, match="no model file at"):
        compile_openvino(tmp_path / "missing.xml")
    broken = tmp_path / "broken.xml"
    broken.write_text("<net>not an IR")
    with pytest.raises(qseg.ExportError, match="cannot read"):
        compile_openvino(broken)


@pytest.mark.skipif(not cpu_features().bf16, reason="needs a CPU with bf16 arithmetic (AVX-512 BF16, AMX)")
def test_default_compile_runs_float_layers_in_bf16_and_exact_compile_does_not(tmp_path):
    c, xml = small_ir(tmp_path)
    assert {p.precision for p in runtime_precisions(xml, exact=False) if p.precision != "u8"} == {"bf16"}
    assert {p.precision for p in runtime_precisions(xml) if p.precision != "u8"} == {"f32"}
    (exact,) = check_parity(c, torch.randn(2, 1, 32, 32), None, xml)
    assert exact.ok, exact


def test_cpu_features_agree_with_openvino_and_the_flags():
    features = cpu_features()
    assert features.name
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    assert features.vnni == any("vnni" in f for f in flags)
    assert features.bf16 == ("BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert features.describe().startswith(features.name)
