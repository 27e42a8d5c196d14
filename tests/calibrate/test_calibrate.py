"""qseg.calibrate: post-training ranges for int activation grids, on FX and fallback models;
a calibrated model converts, exports and runs int8 with parity, with no training."""

from __future__ import annotations

from collections import Counter
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from nets import Untraceable
from torch import nn

import qseg
from qseg import ranges
from qseg.exporters import check_parity, export_onnx, openvino_from_onnx, runtime_precisions
from qseg.models import PaperUNet
from qseg.nn import ActQuant
from qseg.quantizers import Uniform

W8A8 = {
    "name": "w8a8",
    "weights": {"kind": "int", "bits": 8, "channel_axis": 0},
    "activations": {"kind": "int", "bits": 8, "mode": "unsigned"},
}


def batches(count: int = 4, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 1, size, size, generator=gen) for _ in range(count)]


def unet() -> nn.Module:
    torch.manual_seed(0)
    model = PaperUNet(widths=(4, 8, 8, 8))
    model.train()
    with torch.no_grad():  # BatchNorm statistics of the data, as a trained model has
        for x in batches(8, seed=1):
            model(x)
    return model.eval()


def act_quantizers(model: nn.Module) -> dict[str, Uniform]:
    return {n: m.quantizer for n, m in model.named_modules() if isinstance(m, ActQuant)}


def test_calibrated_int8_unet_exports_and_runs_int8_with_parity(tmp_path):
    q = qseg.prepare(unet(), W8A8, example_inputs=torch.rand(1, 1, 32, 32))
    report = qseg.calibrate(q, batches(), progress=False)
    assert report.batches == 4 and report.samples == 8
    assert {r.name for r in report.ranges} == set(act_quantizers(q))
    assert all(r.quantizer == "uint8" and r.lo == 0.0 and r.zero_point == 0 for r in report.ranges)
    c = qseg.convert(q)
    assert len(c.qseg_convert.float_input_layers) + len(c.qseg_convert.integer_layers) == 13
    x = torch.rand(1, 1, 32, 32)
    onnx_path = export_onnx(c, x, tmp_path / "m.onnx")
    ir_path = openvino_from_onnx(onnx_path, tmp_path / "m.xml")
    assert Counter(p.precision for p in runtime_precisions(ir_path)) == {"u8": 13, "f32": 2}
    for r in check_parity(c, torch.rand(2, 1, 40, 48), onnx_path, ir_path):
        assert r.ok, r


def test_methods_order_their_ranges_and_percentile_ignores_outliers():
    # one 1x1 conv of weight 1 and an identity BatchNorm: the quantizer sees the input itself
    def model() -> nn.Module:
        conv = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            conv.weight.fill_(1.0)
            conv.bias.zero_()
        return nn.Sequential(conv, nn.BatchNorm2d(1), nn.ReLU(), nn.Conv2d(1, 1, 1)).eval()

    data = batches()
    data[0][0, 0, 0, 0] = 50.0  # one outlier pixel among values in [0, 1)
    his = {}
    for method in ("minmax", "percentile", "mse"):
        q = qseg.prepare(model(), W8A8, example_inputs=torch.rand(1, 1, 8, 8))
        (r,) = qseg.calibrate(q, data, method=method, percentile=99.9, progress=False).ranges
        his[method] = r.hi
        assert r.seen_max == pytest.approx(50.0, rel=1e-5)
    assert his["minmax"] == pytest.approx(50.0, rel=1e-5)
    assert 0.9 < his["percentile"] < 1.05  # the 99.9th percentile of 8192 values ignores one
    assert his["mse"] < his["minmax"]


@given(
    size=st.integers(1, 3000),
    row=st.sampled_from([4, 64, 1 << 16]),
    kind=st.sampled_from(["normal", "relu", "few values"]),
    q=st.one_of(st.sampled_from([0.0, 1e-4, 0.5, 0.9999, 1.0]), st.floats(0.0, 1.0)),
    seed=st.integers(0, 2**16),
)
def test_percentile_ranges_equal_torch_quantile_without_sorting(size, row, kind, q, seed):
    # short rows send even small samples through the threshold that skips the sort;
    # "few values" makes ties, "relu" a tail of equal zeros that all pass the threshold
    values = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    if kind == "relu":
        values = values.clamp(min=0)
    elif kind == "few values":
        values = (values * 2).round()
    with mock.patch.object(ranges, "TAIL_ROW", row):
        assert ranges.quantile(values, q) == float(torch.quantile(values.double(), q))


def test_quantile_and_extremes_name_what_is_wrong():
    with pytest.raises(qseg.DataError, match=r"k must be in 1\.\.3"):
        ranges.extremes(torch.zeros(3), 4)
    with pytest.raises(qseg.DataError, match="at least one value"):
        ranges.quantile(torch.zeros(0), 0.5)


def test_calibrate_restores_the_model_and_uses_at_most_the_given_batches():
    q = qseg.prepare(unet(), W8A8, example_inputs=torch.rand(1, 1, 32, 32)).train()
    before = act_quantizers(q)
    report = qseg.calibrate(q, iter(batches(10)), batches=3, progress=False)
    assert report.batches == 3 and q.training
    assert act_quantizers(q) == before  # the same quantizer objects are back in place
    assert all(bool(quant.initialized) for quant in before.values())


def test_fallback_model_calibrates_converts_and_exports(tmp_path):
    x = torch.rand(2, 1, 16, 16)
    q = qseg.prepare(Untraceable().eval(), W8A8, example_inputs=x)
    assert "torch.export" in q.qseg_report.capture
    report = qseg.calibrate(q, batches(3, size=16), progress=False)
    assert len(report.ranges) >= 2
    c = qseg.convert(q, example_inputs=x)
    onnx_path = export_onnx(c, x, tmp_path / "m.onnx")
    for r in check_parity(c, torch.rand(3, 1, 24, 32), onnx_path, None):
        assert r.ok, r


def test_bad_calls_name_what_to_fix():
    q = qseg.prepare(unet(), W8A8, example_inputs=torch.rand(1, 1, 32, 32))
    with pytest.raises(qseg.QuantizerError, match="method must be one of"):
        qseg.calibrate(q, batches(), method="kl", progress=False)
    with pytest.raises(qseg.DataError, match="got no data"):
        qseg.calibrate(q, [], progress=False)
    with pytest.raises(qseg.DataError, match=r"\(x for x, _ in loader\)"):
        qseg.calibrate(q, [{"image": torch.rand(1, 1, 32, 32)}], progress=False)
    bad = batches(1)
    bad[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(qseg.DataError, match="non-finite"):
        qseg.calibrate(q, bad, progress=False)
    fresh = qseg.prepare(unet(), W8A8, example_inputs=torch.rand(1, 1, 32, 32))
    with pytest.raises(qseg.ExportError, match=r"has no range yet: run qseg.calibrate"):
        qseg.convert(fresh)


def test_fixed_point_model_has_nothing_to_calibrate():
    q = qseg.prepare(unet(), "unet-qa6.0-qw0.4", example_inputs=torch.rand(1, 1, 32, 32))
    report = qseg.calibrate(q, batches(1), progress=False)
    assert not report.ranges and "no quantizer of this model takes its range from data" in str(report)


def test_two_calibrated_grids_meeting_at_a_concatenation_get_a_requantizer():
    q = qseg.prepare(unet(), W8A8, example_inputs=torch.rand(1, 1, 32, 32))
    inputs = [a for a in q.qseg_report.activations if a.rule.startswith("on the input of a quantized layer")]
    # each decoder conv reads a concatenation of two differently calibrated grids
    assert {a.owner for a in inputs} >= {"dec3.conv1", "dec2.conv1", "dec1.conv1"}


def test_asymmetric_grids_after_leaky_relu_export_with_their_zero_point(tmp_path):
    # InstanceNorm + LeakyReLU, as nnU-Net builds its stages: no BatchNorm, negative outputs
    def stage(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.InstanceNorm2d(o, affine=True), nn.LeakyReLU(0.01)]

    torch.manual_seed(0)
    model = nn.Sequential(*stage(1, 8), *stage(8, 8), *stage(8, 8), nn.Conv2d(8, 2, 1)).eval()
    # 7-bit weights: 2 x 255 x 63 fits the int16 pair sums of AVX2 int8 kernels without VNNI
    # (8-bit weights saturate there: convert warns, tested below)
    w7a8 = W8A8 | {"weights": {"kind": "int", "bits": 7, "channel_axis": 0}}
    eight = qseg.prepare(model, W8A8, example_inputs=torch.rand(1, 1, 16, 16))
    qseg.calibrate(eight, batches(1, size=16), progress=False)
    warnings = qseg.convert(eight).qseg_convert.warnings
    assert any(w.startswith("3: 2 x ") and "exceeds 32767" in w for w in warnings), warnings
    q = qseg.prepare(model, w7a8, example_inputs=torch.rand(1, 1, 16, 16))
    acts = [a for a in q.qseg_report.activations if a.rule == "after activation (no BatchNorm)"]
    assert len(acts) == 3 and all(a.quantizer == "int8 asym" for a in acts), acts
    report = qseg.calibrate(q, batches(3, size=16), progress=False)
    assert all(r.zero_point > 0 and r.lo < 0 < r.hi for r in report.ranges), report
    c = qseg.convert(q)
    frozen = [m for m in c.modules() if type(m).__name__ == "FrozenActQuant"]
    assert len(frozen) == 3 and all(m.zero_point > 0 for m in frozen)
    assert not c.qseg_convert.warnings, c.qseg_convert.warnings
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():  # the converted model computes what the calibrated one does
        torch.testing.assert_close(c(x), q(x), rtol=0, atol=1e-5)
    onnx_path = export_onnx(c, x, tmp_path / "m.onnx")
    ir_path = openvino_from_onnx(onnx_path, tmp_path / "m.xml")
    for r in check_parity(c, torch.rand(3, 1, 24, 20), onnx_path, ir_path):
        assert r.ok, r
    precisions = Counter(p.precision for p in runtime_precisions(ir_path))
    assert precisions["u8"] == 2, precisions  # the two middle convs read u8 codes with a zero point


def test_transposed_convs_get_one_scale_per_output_channel(tmp_path):
    # a transposed conv's weight is [in, out, k, k]: the recipe's "channel_axis: 0" (per output
    # channel) is axis 1 there, or convert could not give the runtime per-output-channel scales
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 6, 2, stride=2), nn.ReLU(),
        nn.Conv2d(6, 1, 1),
    ).eval()  # fmt: skip
    q = qseg.prepare(model, "int8", example_inputs=torch.rand(1, 1, 8, 8))
    up = q.get_submodule("2").weight_quant
    assert up.channel_axis == 1 and up.scale.shape == (6,)
    assert q.get_submodule("0").weight_quant.channel_axis == 0
    qseg.calibrate(q, batches(2, size=8), progress=False)
    c = qseg.convert(q)
    onnx_path = export_onnx(c, torch.rand(1, 1, 8, 8), tmp_path / "m.onnx")
    for r in check_parity(c, torch.rand(2, 1, 8, 8), onnx_path):
        assert r.ok, r
