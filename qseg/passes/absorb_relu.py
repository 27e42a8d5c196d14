"""Let an unsigned activation quantizer give the gradient of the ReLU that alone reads
its output, and that ReLU pass the output on: a grid from 0 leaves the ReLU nothing to
rectify, and skipping it spares a full-size tensor in the forward and another in the
backward of every training step (see ``Quantizer.absorbs_relu``)."""

from __future__ import annotations

from torch import fx, nn

from qseg import graph as g
from qseg.nn import ActQuant, ReLUAfterQuant

__all__ = ["absorb_relus"]


def _reads_alone(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The ReLU module (``nn.ReLU``, in place or not) that is the only reader of ``node``'s
    output, else None. ReLU6 clips at 6 as well, so it is not one."""
    users = list(node.users)
    if len(users) != 1 or users[0].args[:1] != (node,):
        return None
    module = g.module_of(gm, users[0])
    return module if type(module) in (nn.ReLU, ReLUAfterQuant) else None


def absorb_relus(gm: fx.GraphModule) -> list[str]:
    """Set ``absorbs_relu`` on every activation quantizer of ``gm`` that can
    (``can_absorb_relu``), has an unsigned grid and is read by a ``nn.ReLU`` module
    alone, and make that ReLU a :class:`~qseg.nn.ReLUAfterQuant`; return the quantizers'
    names. Values are unchanged everywhere, and so are the gradients; a functional
    ``F.relu`` is left as it is.

    Example:
        >>> import torch, qseg
        >>> from qseg.models import PaperUNet
        >>> qmodel = qseg.prepare(PaperUNet(), "int8", example_inputs=torch.randn(1, 1, 32, 32))
        >>> "enc1_bn1_act_quant" in absorb_relus(qmodel)   # prepare has done it already
        True
        >>> type(qmodel.enc1.relu1).__name__
        'ReLUAfterQuant'
    """
    verdicts: dict[str, nn.Module | None] = {}
    for node in gm.graph.nodes:
        act = g.module_of(gm, node)
        if not isinstance(act, ActQuant):
            continue
        q = act.quantizer
        relu = _reads_alone(gm, node) if q.can_absorb_relu and not q.signed else None
        # a quantizer called at several places must be read by a ReLU alone at each
        seen = verdicts.get(str(node.target), relu)
        verdicts[str(node.target)] = relu if seen is not None else None
    absorbed = []
    for name, relu in verdicts.items():
        if relu is not None:
            relu.__class__ = ReLUAfterQuant
            gm.get_submodule(name).quantizer.absorbs_relu = True
            absorbed.append(name)
    return absorbed
