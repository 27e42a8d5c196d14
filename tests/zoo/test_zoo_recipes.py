"""The recipes for any model (``int8``, ``w4a8``) on one model of each family and structure
of the zoo (``SAMPLE``; ``benchmarks/zoo_deploy.py`` takes every model the whole way): ``prepare``,
``qseg.calibrate``, for ``w4a8`` a training step that moves its learned scales, and
``convert``, whose model computes what the calibrated prepared model computes; ``int8``
then exports to QDQ ONNX, which onnxruntime runs with parity (within float rounding).

Models whose converted model does not hold yet are marked ``xfail(strict=True)`` with what
was measured: they are the known limits, and one that starts to pass fails the run until its
mark is removed.
"""

from __future__ import annotations

import pytest
import torch
from prepare.helpers import one_training_step
from torch import nn

import qseg
from qseg.exporters.parity import FLOAT_NOISE_FACTOR, check_parity, float_floor, parity_step
from qseg.runtime import runtime_precisions
from zoo.catalog import first_tensor, zoo

# one model per family and structure: BatchNorm and InstanceNorm U-Nets, residual units,
# attention gates, GroupNorm residual blocks, transformers, 3d, pretrained-style encoders
SAMPLE = (
    "qseg.PaperUNet", "qseg.TwoHeadFCN", "monai.UNet2d", "monai.AttentionUnet2d", "monai.SegResNet2d",
    "monai.DynUNet2d", "monai.BasicUNet2d", "monai.UNETR2d", "monai.UNet3d",
    "monai.FlexibleUNet2d[efficientnet-b0]", "smp.Unet[resnet34]", "smp.FPN[mobilenet_v2]",
    "smp.DeepLabV3Plus[efficientnet-b0]", "torchvision.lraspp_mobilenet_v3_large",
)  # fmt: skip
ENTRIES_ALL = zoo()
ENTRIES = {name: entry for name, entry in ENTRIES_ALL.items() if name in SAMPLE}
RECIPES = ("int8", "w4a8")
# "model-recipe" -> what was measured where the converted model does not compute the prepared
# one yet (issue 14's converted-equals-prepared contract; strict xfail). None today: the two that
# missed 99.9% (AttentionUnet2d int8 99.41%, smp.Unet[resnet34] int8 99.54% within one step) lose
# it to the BatchNorm fold's float rounding, not to another computation: the first code that
# moves sits on a tie in the prepared model (x / s = 79.5 exactly at AttentionUnet's
# model.1.submodule.0.conv.1 BatchNorm, 82.5 at smp's encoder.bn1) and 1-2 ulps off it in the
# converted one (79.49999, 82.50004), and each move spreads one layer on (2 codes -> 9 -> 15 ->
# 47). The prepared model itself run in float64 moves as many (99.60%, 99.12%, 2026-11-30), so
# the contract allows FLOAT_NOISE_FACTOR times the misses of the prepared model's own float floor.
KNOWN: dict[str, str] = {}
# ONNX export and onnxruntime parity on every model of SAMPLE (smp.DeepLabV3Plus[efficientnet-b0]
# since its functional convs' weights freeze). DynUNet2d, UNet3d, smp.Unet and BasicUNet2d lose
# parity to float rounding alone: a value within an ulp of a rounding tie of a calibrated grid is
# rounded the other way by the runtime's float order (an InstanceNorm's reduction), and the
# one-step move spreads through the layers after it. The verdict's float floor measures how far
# the model moves under other roundings (float64, and each quantizer's input moved by a few ulps:
# BasicUNet2d 99.63% within one step, onnxruntime 99.68%; qseg.exporters.parity).
# "model" -> what was measured where onnxruntime computes something else (strict xfail). None
# today: AttentionUnet2d (96.88% within one step against a float floor of 98.98%) lost it to
# onnxruntime rounding the float bias of each conv it fuses into a QLinearConv onto the
# accumulator grid; the prepared model now adds its bias there in eval mode (qseg/accumulator.py).
EXPORT_KNOWN: dict[str, str] = {}


def _calibration(x: torch.Tensor) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(x.shape, generator=gen) for _ in range(2)]


def _calibrated(entry, recipe: str) -> tuple[nn.Module, nn.Module, torch.Tensor, qseg.CalibrationReport]:
    """The seeded model, prepared with ``recipe`` and calibrated; its example input and the report."""
    torch.manual_seed(0)
    model, x = entry.factory(), entry.example()
    qmodel = qseg.prepare(model, recipe, example_inputs=x)
    report = qseg.calibrate(qmodel, _calibration(x), progress=False)
    return model, qmodel, x, report


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", list(ENTRIES))
def test_recipe_calibrates_and_converts(name, recipe, zoo_packages, request):
    entry = ENTRIES[name]
    zoo_packages(entry)
    if f"{name}-{recipe}" in KNOWN:
        request.applymarker(pytest.mark.xfail(reason=KNOWN[f"{name}-{recipe}"], strict=True))
    _, qmodel, x, report = _calibrated(entry, recipe)
    assert report.ranges, "no activation range set"
    if recipe == "w4a8":
        scales = {n: p.detach().clone() for n, p in qmodel.named_parameters() if n.endswith("scale")}
        assert scales, "w4a8 has no learned scale"
        one_training_step(qmodel, x)
        moved = [
            n for n, p in qmodel.named_parameters() if n in scales and not torch.equal(scales[n], p.detach())
        ]
        assert moved, "no learned scale moved in a training step"
    qmodel.eval()
    converted = qseg.convert(qmodel, example_inputs=x)
    with torch.no_grad():
        prepared_out, converted_out = first_tensor(qmodel(x)), first_tensor(converted(x))
    step = parity_step(converted)
    within = ((prepared_out - converted_out).abs() <= step * 1.001).float().mean().item()
    if within < 0.999:
        floor = float_floor(qmodel, (x,), step=step)
        assert 1 - within <= FLOAT_NOISE_FACTOR * (1 - floor.within_step), (
            f"converted vs prepared: {100 * within:.2f}% within one step {step:.3g}, the prepared "
            f"model rounded otherwise ({floor.runtime}) {100 * floor.within_step:.2f}%"
        )


@pytest.mark.parametrize("name", SAMPLE)
def test_int8_exports_to_onnx_with_parity(name, zoo_packages, tmp_path, request):
    entry = ENTRIES[name]
    zoo_packages(entry)
    if name in EXPORT_KNOWN:
        request.applymarker(pytest.mark.xfail(reason=EXPORT_KNOWN[name], strict=True))
    _, qmodel, x, _ = _calibrated(entry, "int8")
    converted = qseg.convert(qmodel, example_inputs=x)
    path = qseg.export_onnx(converted, x, tmp_path / "m.onnx")
    (result,) = check_parity(converted, x, onnx_path=path)
    assert result.ok, result


NNUNET = [name for name, entry in ENTRIES_ALL.items() if entry.family == "nnunet"]
# "model" -> what was measured where a runtime does not keep parity yet (strict xfail)
NNUNET_KNOWN: dict[str, str] = {}


@pytest.mark.slow
@pytest.mark.parametrize("name", NNUNET)
def test_nnunet_runs_int8_in_both_runtimes_with_parity(name, zoo_packages, tmp_path, request):
    """nnU-Net's networks the whole way with ``int8``: converted without inputs, both files, and
    every quantized conv int8 in OpenVINO but the one tested limit: a transposed conv whose input
    grid has a zero point (after LeakyReLU) runs f32, as OpenVINO 2026.4 runs a Deconvolution in
    int8 only on a grid through zero (a symmetric grid runs it i8 but lost parity here)."""
    entry = ENTRIES_ALL[name]
    zoo_packages(entry)
    if name in NNUNET_KNOWN:
        request.applymarker(pytest.mark.xfail(reason=NNUNET_KNOWN[name], strict=True))
    model, qmodel, x, _ = _calibrated(entry, "int8")
    converted = qseg.convert(qmodel.eval())
    with torch.no_grad():
        prepared_out, converted_out = first_tensor(qmodel(x)), first_tensor(converted(x))
    # BatchNorm folds round differently: within one step, bit-equal where nothing folds
    step = parity_step(converted)
    assert (prepared_out - converted_out).abs().max() <= step * 1.001
    onnx_path = qseg.export_onnx(converted, x, tmp_path / "m.onnx")
    xml = qseg.export_openvino(converted, x, tmp_path / "m.xml")
    for result in check_parity(converted, x, onnx_path, xml):
        assert result.ok, result
    convs = ("Convolution", "Deconvolution", "GroupConvolution")
    precisions = runtime_precisions(xml, layer_types=convs)
    transposed = sum(isinstance(m, nn.modules.conv._ConvTransposeNd) for m in model.modules())
    leaky = any(isinstance(m, nn.LeakyReLU) for m in model.modules())
    float_convs = [p for p in precisions if p.precision not in ("u8", "i8")]
    assert len(precisions) == len(qmodel.qseg_report.quantized_layers)
    assert [p.layer_type for p in float_convs] == ["Deconvolution"] * (transposed if leaky else 0)
