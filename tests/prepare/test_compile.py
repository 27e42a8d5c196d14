"""A prepared model under ``torch.compile``: one graph, the eager values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qseg
from qseg.models import PaperUNet

# aot_eager runs dynamo + AOTAutograd (the parts that see qseg's autograd.Function)
# without inductor's C++ code generation: on a 2-core CPU a cold inductor compile
# of this small model took 21 s for the eval forward and 47 s more for training.
BACKEND = "aot_eager"
WIDTHS = (4, 8, 8, 8)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def prepared() -> nn.Module:
    torch.manual_seed(0)
    return qseg.prepare(PaperUNet(widths=WIDTHS), example_inputs=example())


def example() -> torch.Tensor:
    return torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_quantizers_cause_no_graph_break(training):
    # train mode covers the straight-through autograd.Function with gradients recorded
    qmodel = prepared().train(training)
    explanation = torch._dynamo.explain(qmodel)(example())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_eval_forward_matches_eager():
    qmodel = prepared().eval()
    compiled = torch.compile(copy.deepcopy(qmodel), backend=BACKEND, fullgraph=True)
    x = example()
    with torch.no_grad():
        expected, actual = qmodel(x), compiled(x)
    # Measured: bitwise equal (aot_eager runs the same ATen kernels; inductor was too
    # on this model). A tolerance buys little here: a last-bit difference before an
    # activation quantizer that flips one rounding moves that activation a whole step
    # (1.0 for Q6.0), far beyond any small tolerance, so only near-exact agreement is
    # a meaningful assertion.
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_compiled_training_step_matches_eager():
    eager = prepared().train()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend=BACKEND, fullgraph=True)
    x = example()
    target = (torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.5).float()

    loss_eager = nn.functional.binary_cross_entropy_with_logits(eager(x), target)
    loss_compiled = nn.functional.binary_cross_entropy_with_logits(compiled(x), target)
    assert torch.isfinite(loss_compiled)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=0)
    loss_eager.backward()
    loss_compiled.backward()

    # AOTAutograd's backward graph sums in another order than eager autograd: measured
    # relative differences up to ~1e-6 (aot_eager; ~5e-6 with inductor). The biases of
    # convs followed by BatchNorm have a true gradient of 0 (BN removes the mean); their
    # computed ~1e-9 is rounding noise that the absolute tolerance covers.
    for (name, p), (_, p_c) in zip(eager.named_parameters(), twin.named_parameters(), strict=True):
        assert p_c.grad is not None and torch.isfinite(p_c.grad).all(), name
        torch.testing.assert_close(p_c.grad, p.grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    for (name, b), (_, b_c) in zip(eager.named_buffers(), twin.named_buffers(), strict=True):
        torch.testing.assert_close(b_c, b, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")

    # the step itself, and a second forward through the compiled model
    before = {n: p.detach().clone() for n, p in twin.named_parameters()}
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    opt.step()
    assert not torch.equal(before["enc2.conv1.weight"], twin.get_submodule("enc2.conv1").weight)
    with torch.no_grad():
        again = nn.functional.binary_cross_entropy_with_logits(compiled(x), target)
    assert torch.isfinite(again)
