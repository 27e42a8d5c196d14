"""Let an activation quantizer compute in its input's buffer where the graph proves
that nothing else reads that input: a training step then allocates one full-size
tensor less per quantizer (see ``Quantizer.overwrites_input``)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from qseg import graph as g
from qseg.nn import ActQuant

__all__ = ["mark_overwritable_inputs"]

# Ops that return a tensor of their own (not a view, not an input) which their backward
# does not keep: conv's and linear's keep their input and weight, the norms their input
# and statistics, addition and concatenation nothing full-size. An activation such as
# ReLU or sigmoid keeps its output, so overwriting that would break its backward.
_FRESH_MODULES: tuple[type[nn.Module], ...] = (
    *g.WEIGHTED_MODULES,
    *g.BATCH_NORMS,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
)
_FRESH_FUNCTIONS = (
    *g.WEIGHTED_FUNCTIONS,
    F.batch_norm,
    F.instance_norm,
    F.group_norm,
    F.layer_norm,
    operator.add,
    operator.sub,
    torch.add,
    torch.sub,
    torch.cat,
    torch.concat,
)
_FRESH_METHODS = ("add", "sub")


def _fresh_and_unkept(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        # a user's subclass may return something else than torch's forward does
        return isinstance(module, _FRESH_MODULES) and type(module).__module__.startswith(
            ("torch.nn.", "qseg.")
        )
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    return False


def mark_overwritable_inputs(gm: fx.GraphModule) -> list[str]:
    """Set ``overwrites_input`` on every activation quantizer of ``gm`` whose input is
    read by it alone and made by an op of :data:`_FRESH_MODULES` / ``_FUNCTIONS`` /
    ``_METHODS`` (a convolution, a norm, an addition, a concatenation); return their
    names. A graph input, an activation's output, a view or a tensor with other readers
    is never overwritten. The values and gradients are those of the fresh-buffer path,
    bit for bit; only the allocation differs.

    Example:
        >>> import torch, qseg
        >>> from qseg.models import PaperUNet
        >>> qmodel = qseg.prepare(PaperUNet(), "int8", example_inputs=torch.randn(1, 1, 32, 32))
        >>> names = mark_overwritable_inputs(qmodel)   # prepare has set them already
        >>> "enc1_bn1_act_quant" in names, "x_act_quant" in names   # after a BatchNorm; the input
        (True, False)
    """
    verdicts: dict[str, bool] = {}
    for node in gm.graph.nodes:
        if not isinstance(g.module_of(gm, node), ActQuant):
            continue
        source = node.args[0] if node.args else None
        dead = isinstance(source, fx.Node) and len(source.users) == 1 and _fresh_and_unkept(gm, source)
        # a module called at several places must be safe at each
        verdicts[str(node.target)] = verdicts.get(str(node.target), True) and dead
    marked = [name for name, dead in verdicts.items() if dead]
    for name in marked:
        gm.get_submodule(name).quantizer.overwrites_input = True
    return marked
