"""``prepare`` lets an activation quantizer compute in its input's buffer only where the
graph shows nobody else reads that input (qseg/passes/overwrite_inputs.py), and a
training step gives the same values and gradients either way."""

from __future__ import annotations

import copy

import pytest
import torch
from prepare.helpers import assert_same_gradients, step_gradients, without_training_shortcuts
from torch import fx, nn

import qseg
from qseg.graph import QsegTracer
from qseg.models import PaperUNet
from qseg.nn import ActQuant, ReLUAfterQuant
from qseg.passes import mark_overwritable_inputs
from qseg.quantizers import Uniform


def _marked(qmodel: nn.Module) -> set[str]:
    return {n for n, m in qmodel.named_modules() if isinstance(m, ActQuant) and m.quantizer.overwrites_input}


class Branches(nn.Module):
    """A BatchNorm, a sigmoid (which keeps its output for its backward), and a
    concatenation whose inputs also join a residual addition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.bn1(self.conv1(x)))
        b = self.bn2(self.conv2(a))
        c = self.conv3(b) + b
        return self.head(torch.cat([a, c], dim=1))


class OneQuantizer(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = ActQuant(Uniform(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.how == "alone":
            return self.act(y)
        if self.how == "two readers":
            return self.act(y) + y
        if self.how == "after relu":
            return self.act(torch.relu(y))
        return self.act(y.flatten(1))  # a view of y


@pytest.fixture
def example() -> torch.Tensor:
    return torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("how", "marked"), [("alone", True), ("two readers", False), ("after relu", False), ("view", False)]
)
def test_an_input_is_overwritten_only_where_nothing_else_reads_it(how, marked):
    model = OneQuantizer(how)
    gm = fx.GraphModule(model, QsegTracer().trace(model))
    assert mark_overwritable_inputs(gm) == (["act"] if marked else [])
    assert gm.act.quantizer.overwrites_input is marked


def test_prepare_marks_the_quantizers_after_norms_and_concatenations(example):
    qmodel = qseg.prepare(Branches(), "int8", example_inputs=example)
    # the graph input and the sigmoid's output (kept by its backward, read by the
    # concatenation too) are never overwritten
    assert _marked(qmodel) == {"bn1_act_quant", "bn2_act_quant", "cat_act_quant"}
    assert {"x_act_quant", "sigmoid_act_quant"} <= {
        n for n, m in qmodel.named_modules() if isinstance(m, ActQuant)
    }


def test_paper_unet_marks_every_quantizer_after_a_batchnorm(example):
    qmodel = qseg.prepare(PaperUNet(widths=(4, 8, 8, 8)), "w4a8", example_inputs=example)
    after_bn = {n for n, m in qmodel.named_modules() if isinstance(m, ActQuant) and "_bn" in n}
    assert after_bn and after_bn <= _marked(qmodel)


@pytest.mark.parametrize("recipe", ["int8", "w4a8"])
@pytest.mark.parametrize(
    "model", [Branches, lambda: PaperUNet(widths=(4, 8, 8, 8))], ids=["branches", "unet"]
)
def test_a_training_step_is_the_same_with_and_without_overwriting(recipe, model, example):
    torch.manual_seed(0)
    qmodel = qseg.prepare(model(), recipe, example_inputs=example)
    qseg.calibrate(qmodel, [example], progress=False)
    plain = copy.deepcopy(qmodel)
    for m in plain.modules():
        if isinstance(m, ActQuant):
            m.quantizer.overwrites_input = False
    assert _marked(qmodel) and not _marked(plain)
    (y, grads), (y0, grads0) = step_gradients(qmodel, example), step_gradients(plain, example)
    assert torch.equal(y, y0)
    assert_same_gradients(grads, grads0)


def test_a_relu_reading_an_unsigned_quantizer_alone_is_absorbed(example):
    qmodel = qseg.prepare(PaperUNet(widths=(4, 8, 8, 8)), "int8", example_inputs=example)
    absorbed = {n for n, m in qmodel.named_modules() if isinstance(m, ActQuant) and m.quantizer.absorbs_relu}
    relus = [m for m in qmodel.modules() if isinstance(m, nn.ReLU)]
    # after each BatchNorm: quantizer, then its ReLU; the input and concatenations feed convs
    assert len(absorbed) == 14 and {"x_act_quant", "cat_act_quant"}.isdisjoint(absorbed)
    assert len(relus) == 14 and all(isinstance(m, ReLUAfterQuant) for m in relus)
    # the deployed model rectifies as a plain ReLU would
    qseg.calibrate(qmodel, [example], progress=False)
    converted = qseg.convert(qmodel)
    assert not any(isinstance(m, ReLUAfterQuant) for m in converted.modules())


@pytest.mark.parametrize("recipe", ["int8", "w4a8"])
def test_absorbing_the_relu_keeps_the_values_and_gradients(recipe, example):
    torch.manual_seed(0)
    qmodel = qseg.prepare(PaperUNet(widths=(4, 8, 8, 8)), recipe, example_inputs=example)
    qseg.calibrate(qmodel, [example], progress=False)
    plain = without_training_shortcuts(copy.deepcopy(qmodel))
    (y, grads), (y0, grads0) = step_gradients(qmodel, example), step_gradients(plain, example)
    assert torch.equal(y, y0)
    assert_same_gradients(grads, grads0)
