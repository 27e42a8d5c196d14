"""Each pass alone: what it rewrites, what it leaves, and that its input is untouched."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from qseg import graph as g
from qseg.nn import ActQuant, QuantConv2d
from qseg.passes import dropout_names, insert_act_quant, quantize_weights, strip_dropout
from qseg.policy import plan
from qseg.recipes import load


class Dropouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.d1 = nn.Dropout(0.5)
        self.d2 = nn.Dropout2d(0.2)
        self.d3 = nn.AlphaDropout(0.1)
        self.d4 = nn.Dropout(p=0.0)  # MONAI's "no dropout" is still a module
        self.c2 = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        y = self.d2(self.d1(torch.relu(self.c1(x))))
        y = F.dropout(self.d4(self.d3(y)), p=0.3, training=self.training)
        return self.c2(F.dropout2d(y, 0.1))


def graph_text(gm: fx.GraphModule) -> str:
    return str(gm.graph)


def test_strip_dropout_removes_every_kind_and_is_pure():
    gm = fx.symbolic_trace(Dropouts())
    before = graph_text(gm)
    assert dropout_names(gm) == ["d1", "d2", "d3", "d4", "dropout", "dropout2d"]
    out = strip_dropout(gm)
    assert graph_text(gm) == before  # the input is untouched
    assert not any(g.is_dropout(out, n) for n in out.graph.nodes)
    assert not any(isinstance(m, g.DROPOUT_MODULES) for m in out.modules())
    x = torch.randn(2, 1, 8, 8)
    # FX bakes `training=self.training` of functional dropout in as True at trace time, so
    # the traced graph dropped even in eval mode; stripped, both modes compute the same
    expected = gm.c2(torch.relu(gm.c1(x)))
    torch.testing.assert_close(out.train()(x), expected)
    torch.testing.assert_close(out.eval()(x), expected)


def test_strip_dropout_in_place_returns_the_same_object():
    gm = fx.symbolic_trace(Dropouts())
    assert strip_dropout(gm, inplace=True) is gm and not dropout_names(gm)


def conv_bn_net() -> fx.GraphModule:
    return fx.symbolic_trace(
        nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 2, 1),
        )
    )


def test_quantize_weights_swaps_only_decided_layers_and_is_pure():
    gm = conv_bn_net()
    decisions = plan(gm, load("unet-qa6.0-qw0.4"))
    out = quantize_weights(gm, decisions.layers)
    assert [type(m).__name__ for m in (out.get_submodule(k) for k in ("0", "3", "6"))] == [
        "Conv2d",
        "QuantConv2d",
        "Conv2d",
    ]
    assert type(gm.get_submodule("3")) is nn.Conv2d
    assert out.get_submodule("3").weight is not gm.get_submodule("3").weight
    w = out.get_submodule("3").weight
    assert torch.equal(
        out.get_submodule("3").quantized_weight(), torch.clamp(torch.round(w * 16), -15, 15) / 16
    )


def test_insert_act_quant_after_batchnorm_reads_every_use():
    gm = conv_bn_net()
    decisions = plan(gm, load("unet-qa6.0-qw0.4"))
    out = insert_act_quant(gm, decisions.activations)
    assert not any(isinstance(m, ActQuant) for m in gm.modules())
    quant_nodes = [
        n
        for n in out.graph.nodes
        if n.op == "call_module" and isinstance(out.get_submodule(n.target), ActQuant)
    ]
    assert [n.args[0].target for n in quant_nodes] == ["1", "4"]
    for n in quant_nodes:
        assert [u.target for u in n.args[0].users] == [n.target]  # BN feeds only its quantizer
        assert len(n.users) == 1
    x = torch.randn(1, 1, 9, 9)
    out.eval()
    gm.eval()
    # quantizers change values but not shapes, and the graph still runs
    assert out(x).shape == gm(x).shape


def test_passes_compose_into_a_quantized_graph():
    gm = conv_bn_net()
    decisions = plan(gm, load("unet-qa6.0-qw0.4"))
    out = insert_act_quant(quantize_weights(strip_dropout(gm), decisions.layers), decisions.activations)
    assert sum(isinstance(m, QuantConv2d) for m in out.modules()) == 1
    assert sum(isinstance(m, ActQuant) for m in out.modules()) == 2
