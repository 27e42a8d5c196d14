"""Insert the activation quantizers the policy placed (after BatchNorm by default)."""

from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import fx

from qseg.graph import free_attr_name
from qseg.nn import ActQuant
from qseg.policy import ActDecision

__all__ = ["insert_act_quant"]


def insert_act_quant(
    gm: fx.GraphModule, decisions: Iterable[ActDecision], inplace: bool = False
) -> fx.GraphModule:
    """A copy of ``gm`` with an :class:`~qseg.nn.ActQuant` after each decided node.

    The quantizer module is named after the node it follows
    (``enc1_bn1_act_quant``). With ``decision.before`` empty every use of the
    node's output reads the quantized value (after BatchNorm, the following ReLU
    and the skip connection alike); otherwise only the named consumers do. The
    ReLU nodes named in ``decision.replaces`` are removed, their users reading the
    quantized value (a binary or ternary-tanh quantizer is the activation itself).
    """
    if not inplace:
        gm = copy.deepcopy(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    for d in decisions:
        source = nodes[d.after]
        name = free_attr_name(gm, f"{d.after}_act_quant")
        gm.add_submodule(name, ActQuant(d.config.build(), d.rule))
        # after the last input, so that the graph's inputs stay its first nodes
        anchor = (
            [n for n in gm.graph.nodes if n.op == "placeholder"][-1] if source.op == "placeholder" else source
        )
        with gm.graph.inserting_after(anchor):
            quantized = gm.graph.call_module(name, (source,))
        if d.before:
            for consumer in d.before:
                nodes[consumer].replace_input_with(source, quantized)
        else:
            source.replace_all_uses_with(quantized, delete_user_cb=lambda user, q=quantized: user is not q)
        for replaced in d.replaces:
            # the ReLU's module stays: another call of a shared ReLU may still use it
            nodes[replaced].replace_all_uses_with(quantized)
            gm.graph.erase_node(nodes[replaced])
    gm.graph.lint()
    gm.recompile()
    return gm
