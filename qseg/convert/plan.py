"""Every decision ``convert`` takes, computed once from a graph of the prepared model.

Both conversion paths read their model as a graph (the FX GraphModule itself, or
the ``torch.export`` module graph of the fallback's float twin) and describe it
as a :class:`ModelGraph`; :func:`plan_conversion` turns that into a
:class:`ConversionPlan`: which activation quantizers freeze, which BatchNorm folds
into which quantized layer and on which grid each layer's input lies, and which
ReLUs go. The appliers (``apply_fx.py``, ``apply_swap.py``) carry the plan out,
as ``qseg.policy.plan`` and its appliers do for ``prepare``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from qseg import graph as g
from qseg.convert.frozen import FrozenActQuant, Grid, freeze_act, freeze_weight, input_grid, layer_kind
from qseg.nn import QUANTIZED, ActQuant

__all__ = [
    "Call",
    "ConversionPlan",
    "LayerFreeze",
    "LayerLink",
    "ModelGraph",
    "link_layers",
    "plan_conversion",
]


@dataclass(frozen=True)
class ModelGraph:
    """A prepared model as the plan reads it.

    ``graph`` holds the nodes; its own modules answer the type questions
    (BatchNorm, ReLU, grid-keeping ops), so on the fallback it may be a float twin.
    ``module_of`` gives the prepared module a node calls (``None`` for anything but
    a module call). ``quantizers`` lists every activation quantizer to freeze,
    by name, in the order they freeze (the first without a range names the error).
    ``output_quantizer`` gives the quantizer that a node's output passes through.
    ``weight_quantizers`` lists, by name, the weight quantizers of functional layers
    (a module of their own, FX path only) with the weight each one reads.
    ``calls`` counts the calls of each module. A frozen layer replaces its module,
    so a quantized layer called more than once freezes with a float input and no
    fold, on both paths. ``per_call`` says whether the applier removes a BatchNorm
    or ReLU call by call (FX erases nodes) or module by module (a module swap
    changes every call at once, so those must be called once too).
    """

    graph: fx.GraphModule
    module_of: Callable[[fx.Node], nn.Module | None]
    quantizers: list[tuple[str, ActQuant]]
    output_quantizer: Callable[[fx.Node], nn.Module | None]
    calls: Counter[str]
    per_call: bool
    weight_quantizers: list[tuple[str, nn.Module, torch.Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class Call:
    """One call in the graph: the node's name and the module it calls
    (``None`` for a function call)."""

    node: str
    module: str | None


@dataclass(frozen=True)
class LayerFreeze:
    """How one quantized layer freezes: ``norm`` is the BatchNorm folded into it
    (``None``: none), ``in_grid`` the grid its input lies on (``None``: a float
    input; an integer conv needs one), ``in_scale`` the step of the grids its input
    lies on (one grid or several of one step; ``None``: a float input), on which
    its bias goes onto the accumulator grid (``qseg/accumulator.py``)."""

    layer: Call
    norm: Call | None
    in_grid: Grid | None
    in_scale: float | None = None


@dataclass
class ConversionPlan:
    """Every decision ``convert`` takes for one model, in graph order.

    ``activations`` maps the name of each activation quantizer that freezes to its
    frozen form (a quantizer whose grid no ``FrozenActQuant`` reproduces is absent
    and stays as it is); ``layers`` holds one decision per quantized layer;
    ``relus`` the ReLUs removed because their input lies on a grid starting at 0;
    ``weights`` maps the name of each functional layer's weight quantizer to the
    frozen weight that replaces it.
    """

    activations: dict[str, FrozenActQuant] = field(default_factory=dict)
    layers: list[LayerFreeze] = field(default_factory=list)
    relus: list[Call] = field(default_factory=list)
    weights: dict[str, nn.Module] = field(default_factory=dict)


def _call(node: fx.Node) -> Call:
    return Call(node.name, str(node.target) if node.op == "call_module" else None)


def _called_once(model: ModelGraph, node: fx.Node) -> bool:
    return node.op == "call_module" and model.calls[str(node.target)] == 1


def _removable_once(model: ModelGraph, node: fx.Node) -> bool:
    # a module swap changes every call of the module: each one must agree with the decision
    return model.per_call or _called_once(model, node)


def _fold_target(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The BatchNorm node that alone reads ``node``'s output and can fold into it."""
    users = list(node.users)
    if len(users) != 1:
        return None
    bn = g.module_of(gm, users[0])
    if isinstance(bn, g.BATCH_NORMS) and bn.track_running_stats and bn.running_mean is not None:
        return users[0]
    return None


def _freeze_activations(model: ModelGraph, plan: ConversionPlan) -> dict[int, FrozenActQuant]:
    """Freeze the activation quantizers into ``plan``; returns each frozen form by the
    identity of its quantizer (a module may be held under two names)."""
    frozen: dict[int, FrozenActQuant] = {}
    for name, quantizer in model.quantizers:
        act = freeze_act(quantizer, name)
        if act is not None:
            plan.activations[name] = act
            frozen[id(quantizer)] = act
    return frozen


@dataclass(frozen=True, eq=False)
class LayerLink:
    """What a quantized layer is joined to in the graph, at its first call ``node``:
    ``norm`` the BatchNorm call that folds into it (``None``: none) and ``inputs`` the
    activation quantizers whose outputs its input holds (``None``: some of it comes
    from elsewhere, or the layer is called more than once and may read other grids)."""

    node: fx.Node
    module: nn.Module
    norm: fx.Node | None
    inputs: tuple[ActQuant, ...] | None


def _link_layer(
    model: ModelGraph, node: fx.Node, module: nn.Module, quantized: dict[str, ActQuant]
) -> LayerLink:
    once = _called_once(model, node)
    norm = _fold_target(model.graph, node) if once and layer_kind(module) != "linear" else None
    # a BatchNorm called elsewhere too, or a layer whose output is quantized before its
    # BatchNorm, keeps the BatchNorm apart
    if norm is not None and (not _removable_once(model, norm) or "act_quant" in module._modules):
        norm = None
    # the layer's own input quantizer (the fallback's conv_input placement) sets its input grid
    own = module._modules.get("input_quant")
    if isinstance(own, ActQuant):
        return LayerLink(node, module, norm, (own,))
    # a layer called more than once may read another grid at each call
    if not once or not node.args or not isinstance(node.args[0], fx.Node):
        return LayerLink(node, module, norm, None)
    sources = g.grid_sources(model.graph, node.args[0], set(quantized))
    inputs = (
        None
        if sources is None
        else tuple({id(q): q for q in (quantized[s] for s in sorted(sources))}.values())
    )
    return LayerLink(node, module, norm, inputs)


def link_layers(model: ModelGraph) -> list[LayerLink]:
    """One link per quantized layer of ``model``, in graph order (a module called more
    than once at its first call). ``convert`` freezes each layer by its link, and
    ``prepare`` gives each layer its link (``qseg/accumulator.py``): both read the
    same facts."""
    quantized: dict[str, ActQuant] = {}
    for node in model.graph.graph.nodes:
        quantizer = model.output_quantizer(node)
        if isinstance(quantizer, ActQuant):
            quantized[node.name] = quantizer
    links: list[LayerLink] = []
    seen: set[int] = set()
    for node in model.graph.graph.nodes:
        module = model.module_of(node)
        if type(module) in QUANTIZED.values() and id(module) not in seen:
            seen.add(id(module))
            links.append(_link_layer(model, node, module, quantized))
    return links


def _removable_relu(model: ModelGraph, node: fx.Node, grids: dict[str, Grid]) -> bool:
    """A ReLU whose input lies on a grid starting at 0 is the identity there."""
    if not g.is_relu(model.graph, node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if not _removable_once(model, node):
        return False  # a module swap removes modules, each for all of its calls
    module = model.module_of(node)
    if module is not None and "act_quant" in module._modules:
        return False  # its own quantizer feeds the next layer already: nothing to gain
    grid = grids.get(node.args[0].name)
    return grid is not None and grid[1] >= 0


def plan_conversion(model: ModelGraph) -> ConversionPlan:
    """Every decision for converting ``model`` (the graph is only read).

    Raises:
        ExportError: an activation quantizer has no range yet, or a functional
            layer's weight is not finite.
    """
    plan = ConversionPlan()
    frozen = _freeze_activations(model, plan)
    grids: dict[str, Grid] = {}  # nodes whose output a frozen quantizer puts on its grid
    for node in model.graph.graph.nodes:
        quantizer = model.output_quantizer(node)
        if quantizer is not None and id(quantizer) in frozen:
            grids[node.name] = frozen[id(quantizer)].grid
    for link in link_layers(model):
        norm = _call(link.norm) if link.norm is not None else None
        in_grid, in_scale = input_grid([frozen.get(id(q)) for q in link.inputs or ()])
        plan.layers.append(LayerFreeze(_call(link.node), norm, in_grid, in_scale))
    plan.relus = [_call(node) for node in model.graph.graph.nodes if _removable_relu(model, node, grids)]
    plan.weights = {name: freeze_weight(name, q, w) for name, q, w in model.weight_quantizers}
    return plan
