"""Bias correction (``qseg.calibrate(..., bias_correction=True)``): after it, a quantized
layer's output has the float layer's per-channel mean on the calibration data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qseg
from qseg.errors import DataError
from qseg.nn import QuantConv2d

# coarse weights, so that their rounding shifts the output means visibly
W3A8 = {
    "name": "w3a8",
    "weights": {"kind": "int", "bits": 3, "channel_axis": 0},
    "activations": {"kind": "int", "bits": 8, "mode": "unsigned"},
    "keep_float": {"first": False, "last": False},
}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 2, 1, bias=False),
    ).eval()  # fmt: skip


def data(count: int = 4, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 1, 12, 12, generator=gen) + 0.5 for _ in range(count)]


def channel_mean_error(
    qmodel: nn.Module, layer: QuantConv2d, bias: torch.Tensor, inputs: list[torch.Tensor]
) -> torch.Tensor:
    """Mean over ``inputs`` of the float layer's output (float weight, bias ``bias``) minus
    the quantized layer's, per channel, with the input the quantized model gives it."""
    errors = []

    def hook(module, args, output):
        expected = module._conv_forward(args[0], module.weight, bias)
        errors.append((expected - output).mean(dim=(0, 2, 3)))

    handle = layer.register_forward_hook(hook)
    with torch.no_grad():
        for x in inputs:
            qmodel(x)
    handle.remove()
    return torch.stack(errors).mean(dim=0)


def test_corrected_layers_have_the_float_mean_on_the_data():
    qmodel = qseg.prepare(model(), W3A8, example_inputs=data()[0])
    qseg.calibrate(qmodel, data(), progress=False)
    layers = [qmodel.get_submodule("0"), qmodel.get_submodule("2")]
    biases = [layer.bias.detach().clone() for layer in layers]
    before = [channel_mean_error(qmodel, layer, b, data()) for layer, b in zip(layers, biases, strict=True)]
    assert all(e.abs().max() > 1e-3 for e in before)  # 3-bit weights do shift the means
    report = qseg.calibrate(qmodel, data(), progress=False, bias_correction=True)
    after = [channel_mean_error(qmodel, layer, b, data()) for layer, b in zip(layers, biases, strict=True)]
    # the first layer's input does not depend on any correction: its mean error is gone, but
    # for the corrected bias's rounding onto the accumulator grid (input step x weight step)
    first = layers[0]
    (input_quant,) = first.qseg_accumulator.inputs
    step = input_quant.quantizer.frozen_spec().scale * first.weight_quant.spec(first.weight).scale
    assert (after[0].abs() <= step / 2 + 1e-6).all(), (after[0], step)
    assert after[0].abs().max() < 0.02 * before[0].abs().max()
    # the second's input moved with the first layer's correction (all are measured in one
    # pass, before any is applied): smaller, not zero
    assert after[1].abs().max() < 0.5 * before[1].abs().max()
    rows = {b.name: b for b in report.biases}
    # the shift is measured against the bias itself, the error above against its rounded form
    assert rows["0"].shift_max == pytest.approx(
        float(before[0].abs().max()), abs=float(step.max()) / 2 + 1e-6
    )
    assert rows["4"].skipped == "no bias"
    assert "bias correction: 2 layers" in str(report) and "4 (no bias)" in str(report)


def test_correction_reduces_the_output_error_of_the_model():
    float_model = model()
    qmodel = qseg.prepare(float_model, W3A8, example_inputs=data()[0])
    qseg.calibrate(qmodel, data(), progress=False)
    test = data(seed=1)

    def mean_error() -> float:
        with torch.no_grad():
            return float(
                torch.stack([(float_model(x) - qmodel(x)).mean(dim=(0, 2, 3)) for x in test]).abs().mean()
            )

    before = mean_error()
    qseg.calibrate(qmodel, data(), progress=False, bias_correction=True)
    assert mean_error() < before


def test_without_the_flag_no_bias_moves():
    qmodel = qseg.prepare(model(), W3A8, example_inputs=data()[0])
    biases = [m.bias.clone() for m in qmodel.modules() if isinstance(m, QuantConv2d) and m.bias is not None]
    report = qseg.calibrate(qmodel, data(), progress=False)
    after = [m.bias for m in qmodel.modules() if isinstance(m, QuantConv2d) and m.bias is not None]
    assert report.biases == [] and all(torch.equal(a, b) for a, b in zip(biases, after, strict=True))


def test_one_shot_data_is_refused_before_anything_changes():
    qmodel = qseg.prepare(model(), W3A8, example_inputs=data()[0])
    with pytest.raises(DataError, match="list or a DataLoader"):
        qseg.calibrate(qmodel, iter(data()), progress=False, bias_correction=True)


def test_a_dataloader_works():
    qmodel = qseg.prepare(model(), W3A8, example_inputs=data()[0])
    loader = torch.utils.data.DataLoader(torch.cat(data()), batch_size=2)
    report = qseg.calibrate(qmodel, loader, progress=False, bias_correction=True, batches=3)
    assert report.batches == 3 and len([b for b in report.biases if b.skipped is None]) == 2
