"""A quantized layer's bias on its accumulator grid (``qseg/accumulator.py``): in eval mode
the prepared model adds what an int8 kernel adds, so onnxruntime, which rounds the bias of
every conv it fuses into a ``QLinearConv``, computes the prepared model itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qseg

ort = pytest.importorskip("onnxruntime")


def _calibrated() -> nn.Module:
    """A BatchNorm conv and a plain conv that onnxruntime fuses, with biases and statistics
    far from any grid (random), calibrated with ``int8``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
        nn.Conv2d(8, 1, 1),
    )  # fmt: skip
    qmodel = qseg.prepare(model, "int8", example_inputs=torch.rand(4, 1, 32, 32))
    with torch.no_grad():
        qmodel.get_submodule("1").running_mean.uniform_(-0.3, 0.3)
        qmodel.get_submodule("1").running_var.uniform_(0.5, 2.0)
        qmodel.get_submodule("3").bias.uniform_(-1.0, 1.0)
    qseg.calibrate(qmodel, [torch.rand(4, 1, 32, 32)], progress=False)
    return qmodel.eval()


def test_eval_bias_lies_on_the_accumulator_grid_with_the_batch_norm_folded():
    qmodel = _calibrated()
    conv, norm = qmodel.get_submodule("0"), qmodel.get_submodule("1")
    link = conv.qseg_accumulator
    assert link is not None and link.norm is norm
    (input_quant,) = link.inputs
    factor = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach().double()
    step = (
        input_quant.quantizer.frozen_spec().scale.double()
        * conv.weight_quant.spec(conv.weight).scale.double()
    )
    folded = (conv.layer_bias().double() - norm.running_mean.double()) * factor + norm.bias.detach().double()
    codes = folded / (step * factor)
    assert torch.allclose(codes, codes.round(), atol=1e-3), codes
    assert not torch.allclose(
        codes.round(), (conv.bias.double() - norm.running_mean) * factor / (step * factor)
    )
    # training computes with the bias itself (the BatchNorm uses batch statistics there)
    assert conv.train().layer_bias() is conv.bias


def test_onnxruntime_computes_the_prepared_model_where_it_fuses_convs(tmp_path):
    qmodel = _calibrated()
    converted = qseg.convert(qmodel)
    path = qseg.export_onnx(converted, torch.rand(1, 1, 32, 32), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        prepared = qmodel(x)
        for layer in qmodel.modules():
            if getattr(layer, "qseg_accumulator", None) is not None:
                layer.qseg_accumulator = None
        unlinked = qmodel(x)
    # measured: 1 output of 8192 a step off (a tie the float order rounds the other way);
    # with the float bias, 0.45 % (one seed) move by a step
    assert ((prepared - out).abs() > 1e-5).float().mean() <= 0.0005
    assert ((unlinked - out).abs() > 1e-5).float().mean() >= 0.002
