"""The prepared model computes the converted model in eval mode without gradients
(``qseg/accumulator.py``): a quantized conv computes its BatchNorm folded in, as ``convert``
freezes it, and the BatchNorm (a ``FoldedNorm``) passes that through. With gradients, and
in training, the two compute apart as before."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import qseg
from qseg.nn import FoldedBatchNorm2d, FoldedNorm


def _stack(depth: int = 6) -> nn.Sequential:
    """Conv-BatchNorm-ReLU blocks behind a float first conv: deep enough that a fold that
    rounds otherwise moves some activation to the other side of a rounding tie."""
    layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
    return nn.Sequential(*layers, nn.Conv2d(16, 2, 1))


class _Skip(nn.Module):
    """FX loses the skip (``torch.jit.isinstance`` is False on a proxy): prepared on the
    torch.export + module swap fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.r1 = nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()
        self.c2, self.b2, self.r2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.c3, self.b3, self.r3 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.c4, self.b4, self.r4 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.r1(self.c1(x))
        z = self.r2(self.b2(self.c2(y)))
        if torch.jit.isinstance(y, torch.Tensor):
            z = z + y
        return self.head(self.r4(self.b4(self.c4(self.r3(self.b3(self.c3(z)))))))


def _calibrated(model: nn.Module, recipe: str = "int8") -> nn.Module:
    """``model`` prepared with ``recipe``, BatchNorm statistics far from the identity, calibrated."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 24, 24)
    qmodel = qseg.prepare(model, recipe, example_inputs=x)
    with torch.no_grad():
        for m in qmodel.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.2, 3.0)
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.3, 0.3)
    qseg.calibrate(qmodel, [torch.randn(4, 1, 24, 24) for _ in range(2)], progress=False)
    return qmodel.eval()


@pytest.mark.parametrize(("model", "path"), [(_stack, "torch.fx"), (_Skip, "torch.export")])
def test_prepared_model_in_eval_without_gradients_is_the_converted_model(model, path):
    qmodel = _calibrated(model())
    assert path in qmodel.qseg_report.capture
    converted = qseg.convert(qmodel)
    assert len(converted.qseg_convert.folded_norms) in (3, 6)
    x = torch.randn(8, 1, 40, 40, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        folded = qmodel(x)
        assert torch.equal(folded, converted(x))
    # with gradients recorded the BatchNorms compute apart, and rounding otherwise moves
    # some outputs (so the equality above is the fold's doing)
    apart = qmodel(x).detach()
    assert not torch.equal(apart, folded)
    assert (apart - folded).abs().max() < 1.0


def test_with_gradients_or_in_training_the_batch_norm_computes_and_learns():
    qmodel = _calibrated(_stack(depth=2))
    norm = qmodel.get_submodule("3")
    assert isinstance(norm, FoldedBatchNorm2d) and norm.qseg_folded_into is qmodel.get_submodule("2")
    x = torch.randn(2, 1, 16, 16)
    qmodel(x).sum().backward()  # eval mode, gradients on: a user's fine-tuning with frozen statistics
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    assert qmodel.get_submodule("2").weight.grad.abs().sum() > 0
    before = norm.running_mean.clone()
    with torch.no_grad():
        qmodel.train()(x)  # training mode: batch statistics, running averages move
    assert not torch.equal(norm.running_mean, before)


def test_a_folded_norm_keeps_its_state_dict_and_its_layer_through_copies():
    float_model = _stack(depth=2)
    qmodel = _calibrated(float_model)
    assert set(qmodel.state_dict()) >= set(float_model.state_dict())
    twin = copy.deepcopy(qmodel)
    assert twin.get_submodule("3").qseg_folded_into is twin.get_submodule("2")
    buffer = io.BytesIO()
    torch.save(qmodel, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.get_submodule("3").qseg_folded_into is loaded.get_submodule("2")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
        assert torch.equal(twin(x), qmodel(x))


def test_a_batch_norm_the_quantized_layer_cannot_fold_computes_as_before():
    # a non-uniform weight grid (INQ's powers of two): convert keeps the BatchNorm apart
    torch.manual_seed(0)
    model = _stack(depth=2)
    x = torch.randn(2, 1, 16, 16)
    qmodel = qseg.prepare(model, "fcn-inq5", example_inputs=x).eval()
    layer, norm = qmodel.get_submodule("2"), qmodel.get_submodule("3")
    assert isinstance(norm, FoldedNorm)
    with torch.no_grad():
        assert not qseg.accumulator.folds_norm(layer)
        out = qmodel(x)
        converted = qseg.convert(qmodel)
        assert torch.equal(out, converted(x))
    assert not converted.qseg_convert.folded_norms


def test_a_transposed_conv_told_its_output_size_keeps_it_with_its_batch_norm():
    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.r1 = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()
            self.up, self.bn, self.r2 = (
                nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
            )
            self.head = nn.Conv2d(8, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.r1(self.c1(x))
            size = [2 * x.shape[-2], 2 * x.shape[-1]]  # one more than the parameters give
            return self.head(self.r2(self.bn(self.up(y, output_size=size))))

    qmodel = _calibrated(Up())
    assert isinstance(qmodel.get_submodule("bn"), FoldedNorm)
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        folded = qmodel(x)
    apart = qmodel(x).detach()  # gradients on: conv and BatchNorm compute apart
    assert folded.shape == (2, 1, 24, 24)
    assert torch.equal(folded, apart)
    # convert freezes the output size the parameters give: another one is a clear error
    with pytest.raises(qseg.ExportError, match=r"asked for output size \[24, 24\]; it computes \[23, 23\]"):
        qseg.convert(qmodel)(x)
