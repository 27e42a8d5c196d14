"""The FX applier: convert a model prepared through ``torch.fx`` by rewriting its graph.

The plan is read from the GraphModule itself; each frozen module replaces its
submodule (``add_submodule``), and a folded BatchNorm's node and a removed ReLU's
node leave the graph, their uses moved to their input.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import fx, nn

from qseg import graph as g
from qseg.convert.frozen import FrozenLayer, freeze_layer
from qseg.convert.plan import ConversionPlan, ModelGraph, plan_conversion
from qseg.convert.report import ConvertReport
from qseg.nn import ActQuant, ReLUAfterQuant
from qseg.quantizers import Quantizer

__all__ = ["apply_fx", "convert_fx", "read_fx"]


def read_fx(gm: fx.GraphModule) -> ModelGraph:
    """``gm`` as the plan reads it: an activation quantizer is a node of its own."""

    def act_quant(node: fx.Node) -> ActQuant | None:
        module = g.module_of(gm, node)
        return module if isinstance(module, ActQuant) else None

    quantizers: dict[str, ActQuant] = {}
    for node in gm.graph.nodes:
        if (quantizer := act_quant(node)) is not None:
            quantizers.setdefault(str(node.target), quantizer)
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    return ModelGraph(
        gm,
        lambda node: g.module_of(gm, node),
        list(quantizers.items()),
        act_quant,
        calls,
        per_call=True,
        weight_quantizers=_weight_quantizers(gm),
    )


def _weight_quantizers(gm: fx.GraphModule) -> list[tuple[str, Quantizer, torch.Tensor]]:
    """The weight quantizers ``quantize_weights`` put between a parameter and a functional layer."""
    found = []
    for node in gm.graph.nodes:
        module = g.module_of(gm, node)
        if isinstance(module, Quantizer) and len(node.args) == 1 and node.args[0].op == "get_attr":
            found.append((str(node.target), module, g.get_attr(gm, node.args[0].target)))
    return found


def apply_fx(gm: fx.GraphModule, plan: ConversionPlan) -> ConvertReport:
    """Carry out ``plan`` on ``gm`` in place; returns what was done."""
    report = ConvertReport()
    for name, frozen in plan.activations.items():
        gm.add_submodule(name, frozen)
    nodes = {n.name: n for n in gm.graph.nodes}
    for d in plan.layers:
        module = gm.get_submodule(d.layer.module)
        bn = gm.get_submodule(d.norm.module) if d.norm is not None else None
        frozen = freeze_layer(d.layer.module, module, bn, d.in_grid, d.in_scale, report)
        gm.add_submodule(d.layer.module, frozen)
        # a layer kept on float weights (a non-uniform grid) keeps its BatchNorm
        if d.norm is not None and isinstance(frozen, FrozenLayer):
            bn_node = nodes[d.norm.node]
            bn_node.replace_all_uses_with(nodes[d.layer.node])
            gm.graph.erase_node(bn_node)
            report.folded_norms.append(d.norm.module)
    for name, weight in plan.weights.items():
        node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
        param = node.args[0]
        gm.add_submodule(name, weight)
        node.args = ()
        if not param.users:
            gm.graph.erase_node(param)
        report.frozen_weights.append(name)
    for relu in plan.relus:
        node = nodes[relu.node]
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        report.removed_relus.append(node.name)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return report


def convert_fx(qmodel: fx.GraphModule) -> fx.GraphModule:
    """The converted copy of the FX-prepared ``qmodel``, its report attached."""
    gm = copy.deepcopy(qmodel).eval()
    for module in gm.modules():
        if type(module) is ReLUAfterQuant:  # only training skips it: deployment rectifies plainly
            module.__class__ = nn.ReLU
    gm.qseg_convert = apply_fx(gm, plan_conversion(read_fx(gm)))
    return gm
