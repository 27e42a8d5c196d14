"""Remove every dropout: paper A found that dropout hurts quantization-aware training."""

from __future__ import annotations

import copy

from torch import fx

from qseg import graph as g

__all__ = ["dropout_names", "strip_dropout"]


def _input_of(node: fx.Node) -> fx.Node:
    return node.args[0] if node.args else node.kwargs["input"]


def dropout_names(gm: fx.GraphModule) -> list[str]:
    """Names of the dropout modules and functional dropout calls in ``gm``."""
    return [str(n.target) if n.op == "call_module" else n.name for n in gm.graph.nodes if g.is_dropout(gm, n)]


def strip_dropout(gm: fx.GraphModule, inplace: bool = False) -> fx.GraphModule:
    """A copy of ``gm`` without dropout modules (``nn.Dropout*``, ``AlphaDropout``,
    ``FeatureAlphaDropout``, MONAI's ``Dropout(p=0)`` among them) and functional
    dropout calls; each one's output is replaced by its input."""
    if not inplace:
        gm = copy.deepcopy(gm)
    for node in list(gm.graph.nodes):
        if g.is_dropout(gm, node):
            node.replace_all_uses_with(_input_of(node))
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm
