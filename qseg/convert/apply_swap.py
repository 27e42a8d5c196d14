"""The module-swap applier: convert a model prepared on the fallback
(``torch.export`` + module swap, ``qseg/swap.py``) by swapping modules in an eager copy.

The plan is read from the ``torch.export`` module graph of a float twin of the
model on example inputs; each frozen module then takes the place of the module
it freezes under every name, with its hooks and quantizers, and a folded
BatchNorm or a removed ReLU becomes ``nn.Identity``.
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
from qseg.errors import ExportError
from qseg.nn import QUANTIZED, ActQuant, unfold_norm
from qseg.quantizers import Quantizer

__all__ = ["apply_swap", "convert_swap", "read_swap", "swap_model_graph"]

_QUANTIZER_CHILDREN = ("act_quant", "input_quant")
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def _float_twin(model: nn.Module) -> nn.Module:
    """A copy of a fallback-prepared model that computes the float model: quantized
    layers and folded BatchNorms back to their torch.nn class, every activation quantizer an identity (its
    hook stays and returns its input), functional layers' weight quantizers identities.
    ``torch.export`` then shows each layer as one call."""
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        # not remove_parametrizations: it deletes the weight property from the parametrized
        # class, which the copy shares with the prepared model
        for chain in getattr(module, "parametrizations", {}).values():
            if isinstance(chain[0], Quantizer):
                chain[0] = nn.Identity()
        if type(module) in QUANTIZED.values():
            module.__class__ = next(c for c in QUANTIZED if QUANTIZED[c] is type(module))
            del module.weight_quant
        unfold_norm(module)
        for child in _QUANTIZER_CHILDREN:
            if isinstance(module._modules.get(child), ActQuant):
                module.add_module(child, nn.Identity())
    return twin


def _swap(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``model`` holds ``old`` (under every name), with ``old``'s
    hooks and activation quantizers, which the fallback attached to the module."""
    for attr in _HOOK_DICTS:
        setattr(new, attr, getattr(old, attr))
    for child in _QUANTIZER_CHILDREN:
        if child in old._modules and child not in new._modules:
            new.add_module(child, old._modules[child])
    names = [name for name, m in model.named_modules(remove_duplicate=False) if m is old]
    for name in names:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)


def read_swap(model: nn.Module, inputs: tuple) -> ModelGraph:
    """``model`` as the plan reads it: the module graph of its float twin on ``inputs``,
    each activation quantizer a child of the module whose output (``act_quant``) or
    input (``input_quant``) it quantizes, the recipe's input grid the model's own
    ``input_quant``.

    Raises:
        ExportError: ``torch.export`` cannot read the model on ``inputs``.
    """
    try:
        graph = g.export_module_graph(_float_twin(model), inputs)
    except Exception as exc:
        raise ExportError(
            f"torch.export could not read {type(model).__name__} on the example inputs again: "
            f"{type(exc).__name__}: {g.first_line(exc)}"
        ) from exc
    return swap_model_graph(model, graph)


def swap_model_graph(model: nn.Module, graph: fx.GraphModule) -> ModelGraph:
    """``model`` (prepared on the fallback) as the plan reads it, ``graph`` a module
    graph of the model or of its float twin (the same module names)."""
    quantizers = []
    for prefix, module in model.named_modules():
        for child in _QUANTIZER_CHILDREN:
            if isinstance(quantizer := module._modules.get(child), ActQuant):
                quantizers.append((f"{prefix}.{child}" if prefix else child, quantizer))

    def module_of(node: fx.Node) -> nn.Module | None:
        return model.get_submodule(node.target) if node.op == "call_module" else None

    def output_quantizer(node: fx.Node) -> nn.Module | None:
        # a module's output is on a grid when its forward hook quantizes it
        if node.op == "placeholder":
            return model._modules.get("input_quant")
        called = module_of(node)
        return called._modules.get("act_quant") if called is not None else None

    calls = Counter(str(n.target) for n in graph.graph.nodes if n.op == "call_module")
    return ModelGraph(
        graph,
        module_of,
        quantizers,
        output_quantizer,
        calls,
        per_call=False,
        weight_quantizers=_weight_quantizers(model),
    )


def _weight_quantizers(model: nn.Module) -> list[tuple[str, Quantizer, torch.Tensor]]:
    """The weight quantizers ``qseg/swap.py`` registered as parametrizations of functional
    layers' weights, with the float weight each one reads."""
    found = []
    for prefix, module in model.named_modules():
        for attr, chain in getattr(module, "parametrizations", {}).items():
            if isinstance(chain[0], Quantizer):
                name = f"{prefix}.parametrizations.{attr}.0" if prefix else f"parametrizations.{attr}.0"
                found.append((name, chain[0], chain.original))
    return found


def apply_swap(model: nn.Module, plan: ConversionPlan) -> ConvertReport:
    """Carry out ``plan`` on ``model`` in place; returns what was done."""
    report = ConvertReport()
    for name, frozen in plan.activations.items():
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).add_module(child, frozen)
    for d in plan.layers:
        module = model.get_submodule(d.layer.module)
        bn = model.get_submodule(d.norm.module) if d.norm is not None else None
        frozen = freeze_layer(d.layer.module, module, bn, d.in_grid, d.in_scale, report)
        _swap(model, module, frozen)
        # a layer kept on float weights (a non-uniform grid) keeps its BatchNorm
        if bn is not None and isinstance(frozen, FrozenLayer):
            _swap(model, bn, nn.Identity())
            report.folded_norms.append(d.norm.module)
    for name, weight in plan.weights.items():
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).add_module(child, weight)
        report.frozen_weights.append(name)
    for relu in plan.relus:
        _swap(model, model.get_submodule(relu.module), nn.Identity())
        report.removed_relus.append(relu.module)
    return report


def convert_swap(qmodel: nn.Module, inputs: tuple) -> nn.Module:
    """The converted copy of the fallback-prepared ``qmodel``, its graph read on
    ``inputs``, its report attached."""
    model = copy.deepcopy(qmodel).eval()
    model.qseg_convert = apply_swap(model, plan_conversion(read_swap(model, inputs)))
    return model
