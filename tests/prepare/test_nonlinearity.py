"""Binary and ternary-tanh activations are the activation function itself (BNN's sign,
TernaryNet's ternary tanh): ``prepare`` removes the ReLU after them, which would
otherwise erase their negative level, and refuses a placement where their input is
never negative."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import fx, nn

import qseg
from qseg import graph as g
from qseg.data import synthetic_nuclei
from qseg.errors import RecipeError
from qseg.metrics import dice_score
from qseg.models import PaperUNet
from qseg.nn import ActQuant
from qseg.recipes import load
from qseg.train import fit, predict


def relu_nodes(q: fx.GraphModule) -> list[str]:
    return [n.name for n in q.graph.nodes if g.is_relu(q, n)]


def inputs_of(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(layer).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("name", ["unet-bnn", "unet-ternarynet"])
def test_the_relu_after_a_binary_or_ternary_activation_is_removed(name):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    q = qseg.prepare(PaperUNet(widths=(4, 8, 8, 8)), name, example_inputs=x)
    assert relu_nodes(q) == []
    notes = {a.after: a.note for a in q.qseg_report.activations if a.rule == "after BatchNorm"}
    assert len(notes) == 14
    assert notes["enc1.bn1"].startswith("replaces enc1.relu1:")
    # the next layer sees both levels, as in BNN / TernaryNet
    q.eval()
    seen = inputs_of(q, "enc1.conv2", x)
    assert seen.min() == -1 and seen.max() == 1


def test_fixed_point_activations_keep_the_relu():
    q = qseg.prepare(PaperUNet(widths=(4, 8, 8, 8)), example_inputs=torch.randn(1, 1, 32, 32))
    assert len(relu_nodes(q)) == 14
    assert not any("replaces" in a.note for a in q.qseg_report.activations)


def bnn(**changes) -> dict:
    out = {**load("unet-bnn").to_dict(), **changes}
    out["name"] = "test"
    return out


def test_without_batchnorm_the_binary_quantizer_takes_the_relus_place():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 1, 1),
    )  # fmt: skip
    x = torch.randn(2, 1, 8, 8)
    q = qseg.prepare(model, bnn(), example_inputs=x)
    acts = {a.owner: a for a in q.qseg_report.activations}
    assert acts["0"].after == "0" and acts["0"].rule == "in place of the activation (no BatchNorm)"
    assert acts["0"].note == "replaces 1: binary is the activation"
    assert relu_nodes(q) == []
    seen = inputs_of(q, "2", x)
    assert set(seen.unique().tolist()) == {-1.0, 1.0}


def test_a_binary_activation_on_a_never_negative_input_is_a_recipe_error():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 1))
    with pytest.raises(RecipeError, match=r"activations: .*input of 2.* never negative.*\+1 everywhere"):
        qseg.prepare(model, bnn(activation_placement="conv_input"), example_inputs=torch.randn(1, 1, 8, 8))


class MisTracedBlocks(nn.Module):
    """FX mis-traces it (the skip vanishes under a proxy), so prepare takes the
    fallback; ``shared`` is one ReLU module called after a BatchNorm and on the output."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.shared = nn.ReLU()
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.r1(self.b1(self.c1(x)))
        z = self.shared(self.b2(self.c2(y)))
        if torch.jit.isinstance(y, torch.Tensor):
            z = z + y
        return self.shared(self.head(self.c3(z)))


def test_the_fallback_swaps_out_replaced_relus_and_names_the_shared_one_it_keeps():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    q = qseg.prepare(MisTracedBlocks(), bnn(), example_inputs=x)
    report = q.qseg_report
    assert "torch.export + module swap" in report.capture
    assert isinstance(q.r1, nn.Identity) and isinstance(q.b1.act_quant, ActQuant)
    assert isinstance(q.shared, nn.ReLU)
    assert any(s.startswith("shared: ReLU kept on the fallback path") for s in report.notes)
    q.eval()
    seen = inputs_of(q, "c2", x)
    assert set(seen.unique().tolist()) == {-1.0, 1.0}


def test_a_bnn_unet_learns_where_a_relu_after_the_sign_stalled_it():
    # With the ReLU kept (activations {0, 1}, gradient only where sign is +1) this
    # setup stayed at loss ~0.73 and dice 0.355 (all foreground) for every seed tried.
    x, y = synthetic_nuclei(48, size=32, seed=0)
    x_test, y_test = synthetic_nuclei(16, size=32, seed=1)
    torch.manual_seed(0)
    q = qseg.prepare(PaperUNet(widths=(8, 16, 16, 16)), "unet-bnn", example_inputs=x[:1])
    training = dataclasses.replace(load("unet-bnn").training, lr=1e-2, batch_size=8)
    losses = fit(q, x, y, training, epochs=15, progress=False)
    assert losses[-1] < 0.5 * losses[0]
    assert dice_score(predict(q, x_test) > 0, y_test) > 0.75


def test_a_ternary_tanh_keeps_its_three_levels_through_the_block():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    q = qseg.prepare(PaperUNet(widths=(4, 8, 8, 8)), "unet-ternarynet", example_inputs=x).eval()
    assert set(inputs_of(q, "enc1.conv2", x).unique().tolist()) == {-1.0, 0.0, 1.0}
