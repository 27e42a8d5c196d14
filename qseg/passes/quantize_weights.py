"""Put a quantizer on the weight of every layer the policy quantizes."""

from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import fx

from qseg.errors import RecipeError
from qseg.graph import free_attr_name
from qseg.nn import quantize_module
from qseg.policy import LayerDecision

__all__ = ["quantize_weights"]


def quantize_weights(
    gm: fx.GraphModule, decisions: Iterable[LayerDecision], inplace: bool = False
) -> fx.GraphModule:
    """A copy of ``gm`` in which each layer with a weight quantizer computes with
    its quantized weight.

    A torch.nn layer (a ``call_module`` node) becomes its ``qseg.nn`` subclass in
    place, keeping its parameter names. For a functional conv/linear whose weight
    is a parameter, a quantizer module (named after the parameter, e.g.
    ``head_weight_quant``) is inserted between the ``get_attr`` and the call.
    """
    if not inplace:
        gm = copy.deepcopy(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    decisions = list(decisions)
    # a module called more than once (weight sharing) has one weight: every call must agree
    per_module: dict[str, object] = {}
    for d in decisions:
        if d.layer.functional:
            continue
        if d.layer.name in per_module and per_module[d.layer.name] != d.weights:
            raise RecipeError(
                f"layer {d.layer.name!r} is called more than once and the policy quantizes its "
                f"weight differently per call ({per_module[d.layer.name]} vs {d.weights}), e.g. "
                "because one call is the first or last layer; add an override for it"
            )
        per_module[d.layer.name] = d.weights
    done: set[str] = set()
    for d in decisions:
        if d.weights is None:
            continue
        layer = d.layer
        if not layer.functional:
            if layer.name not in done:
                quantize_module(gm.get_submodule(layer.name), d.weights.build())
                done.add(layer.name)
            continue
        call = nodes[layer.node]
        weight = call.args[1] if len(call.args) > 1 else call.kwargs["weight"]
        name = free_attr_name(gm, layer.param.replace(".", "_") + "_quant")
        gm.add_submodule(name, d.weights.build())
        with gm.graph.inserting_after(weight):
            quantized = gm.graph.call_module(name, (weight,))
        call.replace_input_with(weight, quantized)
    gm.graph.lint()
    gm.recompile()
    return gm
