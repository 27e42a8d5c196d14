"""The fallback path: apply a :class:`~qseg.policy.Plan` to an eager model by
swapping modules and adding hooks, for models that FX cannot capture faithfully.

Decisions are taken on the module-level graph built from ``torch.export``
(:func:`qseg.graph.export_module_graph`); here they become changes to a copy of
the model: quantized layers change class in place (parameter names stay), a
functional layer's weight gets its quantizer as a parametrization, an
activation quantizer becomes the child ``act_quant`` of the module whose output
it quantizes, called by a forward hook (or ``input_quant``, called by a forward
pre-hook, for the ``conv_input`` placement; the recipe's input grid is the model's own
``input_quant``, applied to every tensor input), and dropout modules, as well as
the ReLUs a binary or ternary-tanh activation replaces, become ``nn.Identity``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from qseg import graph as g
from qseg.nn import ActQuant, quantize_module
from qseg.policy import Plan

__all__ = ["apply_plan", "strip_dropout_modules"]


def _quantize_output(module: nn.Module, args: tuple, output: object) -> object:  # noqa: ARG001
    return module.act_quant(output)


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quant(args[0]), *args[1:])


def _quantize_model_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(module.input_quant(a) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def strip_dropout_modules(model: nn.Module) -> list[str]:
    """Replace every dropout module of ``model`` by ``nn.Identity``, in place;
    returns their names."""
    # remove_duplicate=False: a dropout held under two names (MONAI's MLPBlock sets
    # drop2 = drop1) must be replaced under both
    names = [
        name for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, g.DROPOUT_MODULES)
    ]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())
    return names


def apply_plan(model: nn.Module, graph_module: fx.GraphModule, plan: Plan) -> Plan:
    """Carry out ``plan`` on ``model`` in place; returns the plan as applied.

    A functional layer's weight (``F.conv2d(x, self.weight)`` in a module's own
    ``forward``) gets its quantizer as a parametrization of the parameter
    (``torch.nn.utils.parametrize``): every read of the weight returns it quantized,
    and its state moves to ``<module>.parametrizations.<name>.original``.
    What a module swap cannot express (a quantizer before a functional call's input
    or after a function's output) is moved from the decisions to the plan's
    ``skipped`` notes, so the report says what was not done.
    """
    applied = Plan([], [], list(plan.skipped), plan.default_activations)
    for d in plan.layers:
        if d.weights is not None and d.layer.functional:
            owner_name, _, attr = d.layer.param.rpartition(".")
            owner = model.get_submodule(owner_name)
            # a parameter read by several calls has one weight, quantized once
            if not parametrize.is_parametrized(owner, attr):
                parametrize.register_parametrization(owner, attr, d.weights.build(), unsafe=True)
        elif d.weights is not None:
            module = model.get_submodule(d.layer.name)
            # a module called more than once appears once per call; it has one weight
            if not hasattr(module, "weight_quant"):
                quantize_module(module, d.weights.build())
        applied.layers.append(d)
    nodes = {n.name: n for n in graph_module.graph.nodes}
    quantized = {d.layer.node for d in applied.layers if d.weights is not None}
    for a in plan.activations:
        if a.before:
            # an input quantizer serves quantized layers, through a pre-hook of their module
            consumers = [c for c in a.before if c in quantized and nodes[c].op == "call_module"]
            for functional in (c for c in a.before if c in quantized and nodes[c].op != "call_module"):
                applied.skipped.append(
                    f"{functional}: no input quantizer before a functional layer on the fallback path"
                )
            for consumer in consumers:
                module = model.get_submodule(nodes[consumer].target)
                module.add_module("input_quant", ActQuant(a.config.build(), a.rule))
                module.register_forward_pre_hook(_quantize_input)
            if consumers:
                applied.activations.append(replace(a, before=tuple(consumers)))
            continue
        node = nodes[a.after]
        if node.op == "placeholder":
            # the recipe's input grid: one quantizer on the model itself, for every tensor input
            if not hasattr(model, "input_quant"):
                model.add_module("input_quant", ActQuant(a.config.build(), a.rule))
                model.register_forward_pre_hook(_quantize_model_inputs)
            applied.activations.append(a)
            continue
        if node.op != "call_module":
            applied.skipped.append(
                f"{a.after}: no activation quantizer after a function call on the fallback path"
            )
            continue
        module = model.get_submodule(node.target)
        if not hasattr(module, "act_quant"):
            module.add_module("act_quant", ActQuant(a.config.build(), a.rule))
            module.register_forward_hook(_quantize_output)
        applied.activations.append(replace(a, after=node.target))
    _remove_replaced_relus(model, graph_module, plan, applied)
    return applied


def _remove_replaced_relus(model: nn.Module, graph_module: fx.GraphModule, plan: Plan, applied: Plan) -> None:
    """Swap the ReLU modules a binary / ternary-tanh quantizer replaces for ``nn.Identity``.

    A module swap removes every call of the module, so a ReLU module also called
    where no such quantizer precedes it stays, as does a functional ReLU; the
    report's notes name them.
    """
    nodes = {n.name: n for n in graph_module.graph.nodes}
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    replaced: dict[str, int] = {}
    for a in plan.activations:
        for name in a.replaces:
            node = nodes[name]
            if node.op != "call_module":
                applied.skipped.append(
                    f"{name}: functional ReLU kept on the fallback path (it cannot be swapped "
                    f"out); the {a.config.label} activation before it loses its negative level"
                )
                continue
            replaced[str(node.target)] = replaced.get(str(node.target), 0) + 1
    for target, count in replaced.items():
        if count != calls[target]:
            applied.skipped.append(
                f"{target}: ReLU kept on the fallback path (also called where it replaces no "
                "quantizer); a binary / ternary-tanh activation before it loses its negative level"
            )
            continue
        parent, _, child = target.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())
