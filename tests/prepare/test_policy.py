"""Per-layer policy: first/last by reachability, overrides, placements and the
signed grid where an activation can be negative."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import qseg
from qseg import graph as g
from qseg.nn import ActQuant, QuantConv2d, QuantLinear
from qseg.recipes import load

QA6_QW4 = load("unet-qa6.0-qw0.4").to_dict()


def recipe(**changes) -> dict:
    out = {**QA6_QW4, **changes}
    out["name"] = "test"
    return out


def act_sites(q: fx.GraphModule) -> dict[str, str]:
    """ActQuant node -> the node it reads."""
    return {
        n.name: n.args[0].name
        for n in q.graph.nodes
        if n.op == "call_module" and isinstance(q.get_submodule(n.target), ActQuant)
    }


class Residual(nn.Module):
    """conv-BN-ReLU, then conv-BN added to the skip before the ReLU (a ResNet block)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.c1(x)))
        y = self.bn2(self.c2(y))
        return self.head(F.relu(x + y))


class NoNorm(nn.Module):
    """No normalization; a LeakyReLU and a GroupNorm + ReLU, then a functional conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.act1 = nn.LeakyReLU(0.1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(2, 8, 1, 1) * 0.1)

    def forward(self, x):
        x = self.act1(self.c1(x))
        x = torch.relu(self.gn(self.c2(x)))
        x = torch.relu(self.c3(x))
        return F.conv2d(x, self.w)


def test_a_batchnorm_that_only_feeds_an_addition_gets_no_quantizer():
    q = qseg.prepare(Residual(), recipe(), example_inputs=torch.randn(1, 1, 8, 8))
    by_site = {a.after: a for a in q.qseg_report.activations}
    assert by_site["bn1"].quantizer == "Q6.0 unsigned" and not by_site["bn1"].note
    # the sum leaves the grid anyway: a quantizer on bn2 would only round twice
    assert "bn2" not in by_site and not hasattr(q, "bn2_act_quant")
    assert "c2: no quantizer after bn2: it only feeds the addition add" in "\n".join(q.qseg_report.notes)


def test_signed_grid_where_batchnorm_feeds_more_than_a_relu():
    class Joined(Residual):
        def forward(self, x):
            x = F.relu(self.bn0(self.stem(x)))
            y = self.bn2(self.c2(F.relu(self.bn1(self.c1(x)))))
            return self.head(F.relu(torch.cat([x, y], 1)[:, :8]))

    q = qseg.prepare(Joined(), recipe(), example_inputs=torch.randn(1, 1, 8, 8))
    by_site = {a.after: a for a in q.qseg_report.activations}
    # bn2's output meets the skip before any ReLU: clamping negatives would change the model
    assert by_site["bn2"].quantizer == "Q6.0" and "not only a ReLU" in by_site["bn2"].note
    assert q.get_submodule("bn2_act_quant").signed


def test_without_batchnorm_quantizers_go_after_the_activation():
    q = qseg.prepare(NoNorm(), recipe(), example_inputs=torch.randn(1, 1, 8, 8))
    report = q.qseg_report
    rules = {a.owner: (a.after, a.rule, a.quantizer) for a in report.activations}
    assert rules["c1"] == ("act1", "after activation (no BatchNorm)", "Q6.0")  # LeakyReLU: negative values
    assert rules["c2"][0] == "relu" and rules["c2"][2] == "Q6.0 unsigned"  # through GroupNorm to the ReLU
    assert rules["c3"][2] == "Q6.0 unsigned"
    rows = {r.name: r for r in report.layers}
    # the functional conv on a parameter is a weighted layer too: here the last one
    assert rows["w"].op == "conv2d" and rows["w"].weights == "float: last layer"


def test_functional_conv_weight_gets_its_quantizer_when_not_last():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Conv2d(1, 4, 3, padding=1)
            self.w = nn.Parameter(torch.randn(4, 4, 3, 3))
            self.last = nn.Conv2d(4, 1, 1)

        def forward(self, x):
            return self.last(torch.relu(F.conv2d(torch.relu(self.first(x)), self.w, padding=1)))

    q = qseg.prepare(M(), recipe(), example_inputs=torch.randn(1, 1, 8, 8))
    assert {r.name: r.weights for r in q.qseg_report.layers}["w"] == "Q0.4"
    assert "w_quant" in dict(q.named_modules())
    consumer = next(n for n in q.graph.nodes if n.op == "call_function" and n.target is F.conv2d)
    assert consumer.args[1].target == "w_quant"


def test_overrides_by_name_regex_and_type_and_their_order():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 10 * 10, 3), nn.ReLU(), nn.Linear(3, 2),
    )  # fmt: skip
    r = recipe(
        keep_float={"first": True, "last": True},
        overrides=[
            {"name": "0", "weights": {"kind": "fixed_point", "int_bits": 0, "frac_bits": 7}},  # beats "first"
            {"type": "Linear", "weights": {"kind": "ternary"}},
            {"regex": "1[02]", "weights": None},  # later wins: layer 10 float again, 12 stays float
            {"name": "3", "activations": None},
        ],
    )
    q = qseg.prepare(model, r, example_inputs=torch.randn(1, 1, 16, 16))
    rows = {row.name: row for row in q.qseg_report.layers}
    assert rows["0"].weights.startswith("Q0.7 (override 0 (name=0))")
    assert rows["3"].weights == "Q0.4" and rows["6"].weights == "Q0.4"
    assert rows["10"].weights.startswith("float: override 2")
    assert rows["12"].weights.startswith("float: override 2")
    assert rows["3"].activation == "-" and rows["6"].activation.startswith("Q6.0 unsigned after 7")
    assert type(q.get_submodule("0")) is QuantConv2d and type(q.get_submodule("10")) is nn.Linear
    r2 = recipe(overrides=[{"type": "Linear", "weights": {"kind": "ternary", "channel_axis": 0}}])
    q2 = qseg.prepare(model, r2, example_inputs=torch.randn(1, 1, 16, 16))
    assert type(q2.get_submodule("10")) is QuantLinear
    # an override beats the first/last rule: the last Linear is ternary too
    assert {row.name: row for row in q2.qseg_report.layers}["12"].weights.startswith("ternary/axis 0")


def test_keep_float_off_quantizes_first_and_last():
    q = qseg.prepare(
        Residual(), recipe(keep_float={"first": False, "last": False}), example_inputs=torch.randn(1, 1, 8, 8)
    )
    assert all(not r.weights.startswith("float") for r in q.qseg_report.layers)


def test_conv_input_placement_quantizes_inputs_of_quantized_layers_once():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Conv2d(8, 1, 1)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            return self.head(torch.cat([self.a(x), self.b(x)], 1))

    q = qseg.prepare(
        Fork(), recipe(activation_placement="conv_input"), example_inputs=torch.randn(1, 1, 8, 8)
    )
    acts = q.qseg_report.activations
    assert len(acts) == 1  # a and b share their input: one quantizer serves both
    assert acts[0].after == "relu" and acts[0].quantizer == "Q6.0 unsigned"
    assert acts[0].rule == "on the input of a quantized layer"
    sites = act_sites(q)
    users = {u.name for u in next(n for n in q.graph.nodes if n.name in sites).users}
    assert users == {"a", "b"}


def test_first_and_last_by_reachability_in_a_multi_head_graph():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Conv2d(1, 4, 3)
            self.mid = nn.Conv2d(4, 4, 3)
            self.h1, self.h2 = nn.Conv2d(4, 1, 1), nn.Conv2d(4, 1, 1)
            self.side = nn.Conv2d(1, 1, 3)  # also reads the input: a second first layer

        def forward(self, x):
            y = self.mid(torch.relu(self.enc(x)))
            return self.h1(y), self.h2(y) + self.side(x)[:, :, 2:-2, 2:-2]

    gm = fx.symbolic_trace(TwoHeads())
    first, last = g.first_and_last(gm, [layer.node for layer in g.weighted_layers(gm)])
    assert first == {"enc", "side"} and last == {"h1", "h2", "side"}


class _SharedConv(torch.nn.Module):
    """A conv called twice (weight sharing across two depths)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.shared = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(4)
        self.bn3 = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Conv2d(4, 1, 1)

    def forward(self, x):
        x = self.bn(self.a(x)).relu()
        x = self.bn2(self.shared(x)).relu()
        x = self.bn3(self.shared(x)).relu()
        return self.head(x)


def test_a_layer_called_twice_is_quantized_once_and_trains():
    model = _SharedConv()
    q = qseg.prepare(model, "unet-qa6.0-qw0.4", example_inputs=torch.rand(1, 1, 8, 8))
    assert type(q.shared).__name__ == "QuantConv2d"
    assert type(q.shared.weight_quant).__name__ == "FixedPoint"
    q(torch.rand(2, 1, 8, 8)).sum().backward()
    assert q.shared.weight.grad is not None


def test_a_layer_called_twice_with_conflicting_decisions_is_an_error():
    recipe = qseg.recipes.load("unet-qa6.0-qw0.4")

    # the shared conv's first call is the first layer (kept float), its second is not
    class FirstShared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = torch.nn.Conv2d(1, 1, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(1)
            self.head = torch.nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.head(self.shared(self.bn(self.shared(x)).relu()))

    with pytest.raises(qseg.RecipeError, match="'shared' is called more than once"):
        qseg.prepare(FirstShared(), recipe, example_inputs=torch.rand(1, 1, 8, 8))


class NormStack(nn.Module):
    """Convs before an InstanceNorm, a GroupNorm, an InstanceNorm with running statistics,
    a BatchNorm, and one whose output feeds a norm and a skip."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(1, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True)
        self.c2, self.n2 = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.c3, self.n3 = nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8, track_running_stats=True)
        self.c4, self.n4 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c5, self.n5 = nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.leaky_relu(self.n1(self.c1(x)))
        x = F.leaky_relu(self.n2(self.c2(x)))
        x = F.leaky_relu(self.n3(self.c3(x)))
        x = F.relu(self.n4(self.c4(x)))
        y = self.c5(x)
        return self.head(F.leaky_relu(self.n5(y)) + y)


@pytest.mark.parametrize("recipe_name", ["int8", "w4a8"])
def test_quantize_norm_inputs_puts_a_quantizer_before_each_per_sample_norm(recipe_name):
    x = torch.randn(2, 1, 8, 8)
    on = load(recipe_name).replace(quantize_norm_inputs=True)
    q = qseg.prepare(NormStack(), on, example_inputs=x)
    before_norm = {a.owner: a for a in q.qseg_report.activations if a.after.startswith("c")}
    # InstanceNorm and GroupNorm normalize each sample by its own statistics: their input
    # can be codes. Running statistics, BatchNorm (folded) and a second reader keep float.
    assert set(before_norm) == {"c1", "c2"}
    for layer, norm in (("c1", "n1"), ("c2", "n2")):
        site = before_norm[layer]
        assert site.after == layer and f"{norm} reads integer codes" in site.rule
        assert site.quantizer.startswith("int8 asym")  # a conv output can be negative
    assert act_sites(q)["c1_act_quant"] == "c1"
    off = qseg.prepare(NormStack(), load(recipe_name), example_inputs=x)
    assert not any(a.after.startswith("c") for a in off.qseg_report.activations)
    assert load(recipe_name).quantize_norm_inputs is False


def test_quantize_norm_inputs_follows_the_layers_activation_override():
    spec = load("int8").replace(quantize_norm_inputs=True).to_dict()
    spec["overrides"] = [{"name": "c1", "activations": None}]
    q = qseg.prepare(NormStack(), spec, example_inputs=torch.randn(2, 1, 8, 8))
    assert "c1" not in {a.owner for a in q.qseg_report.activations if a.after.startswith("c")}
    assert "c1: input of n1 kept float: activations kept float by the recipe" in "\n".join(
        q.qseg_report.notes
    )
