"""``qseg.prepare``: capture a model, run the passes a recipe asks for, attach the report."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import fx, nn

from qseg import graph as g
from qseg.accumulator import AccumulatorLink
from qseg.convert.apply_fx import read_fx
from qseg.convert.apply_swap import swap_model_graph
from qseg.convert.plan import ModelGraph, link_layers
from qseg.errors import TraceError
from qseg.nn import allow_float_checkpoints, fold_norm_into
from qseg.passes import (
    absorb_relus,
    dropout_names,
    insert_act_quant,
    mark_overwritable_inputs,
    plan_rescale,
    quantize_weights,
    rescale,
    strip_dropout,
)
from qseg.policy import Plan, plan
from qseg.recipes import DEFAULT, Recipe, RecipeLike, load
from qseg.report import ActRow, LayerRow, QsegReport
from qseg.swap import apply_plan, strip_dropout_modules

__all__ = ["prepare"]


def _as_tuple(example_inputs: object) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TraceError(
        f"example_inputs must be a tensor or a tuple of the model's positional inputs, "
        f"got {type(example_inputs).__name__}"
    )


def prepare(
    model: nn.Module,
    recipe: RecipeLike = DEFAULT,
    *,
    example_inputs: torch.Tensor | tuple | None = None,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
) -> nn.Module:
    """A quantization-aware copy of ``model``, as ``recipe`` says.

    The model is captured as a ``torch.fx`` graph, and the capture is checked on
    ``example_inputs`` against the eager model (a trace can succeed and still
    compute something else). Then dropout is stripped, weights of conv /
    transposed conv / linear layers get their quantizers (first and last layers
    stay float by default), activation quantizers are placed after each
    BatchNorm, and ``qseg_report`` is attached: print it before training. With
    the recipe's ``rescale`` (on in the fixed-point U-Net recipes), channels are
    then rescaled so that a pretrained float model starts on the grids, without
    changing its float function (:func:`qseg.passes.rescale`).

    ``model`` is never changed. Parameters keep their names, so a float
    checkpoint loads into the result (``load_state_dict``, strict) and the
    result's own ``state_dict`` round-trips.

    Args:
        model: any ``nn.Module``.
        recipe: a built-in name (``qseg.recipes.list()``), a YAML path, a mapping
            or a :class:`qseg.Recipe`; default paper A's Qa6.0/Qw0.4.
        example_inputs: a tensor, or a tuple of the model's positional inputs.
        leaf_modules: module types or dotted names that FX should not trace into.

    Raises:
        RecipeError: the recipe is invalid (the message names the key).
        TraceError: the model fails on the example inputs, or cannot be captured.

    Example:
        >>> import torch, qseg
        >>> from qseg.models import PaperUNet
        >>> x = torch.randn(1, 1, 64, 64)
        >>> qmodel = qseg.prepare(PaperUNet(widths=(8, 16, 32, 32)), example_inputs=x)
        >>> qmodel.qseg_report.quantized_layers[:2]
        ['enc1.conv2', 'enc2.conv1']
    """
    if example_inputs is None:
        raise TraceError(
            "prepare needs example_inputs (e.g. example_inputs=torch.randn(1, 1, 200, 200)) "
            "to verify that the captured graph reproduces the model"
        )
    recipe = load(recipe)
    inputs = _as_tuple(example_inputs)
    captured = g.capture(model, inputs, leaf_modules)
    if captured.graph_module is not None:
        return _prepare_fx(captured.graph_module, recipe)
    return _prepare_fallback(model, inputs, recipe, captured.reason)


def _prepare_fx(gm: fx.GraphModule, recipe: Recipe) -> fx.GraphModule:
    # gm is capture's private copy: the passes may rewrite it in place
    removed = dropout_names(gm) if recipe.strip_dropout else []
    if removed:
        gm = strip_dropout(gm, inplace=True)
    decisions = plan(gm, recipe)
    gm = quantize_weights(gm, decisions.layers, inplace=True)
    gm = insert_act_quant(gm, decisions.activations, inplace=True)
    rescaled = ""
    if recipe.rescale:
        rescaled = plan_rescale(gm).summary()
        gm = rescale(gm, inplace=True)
    _link_accumulators(read_fx(gm))
    mark_overwritable_inputs(gm)
    absorb_relus(gm)
    how = "torch.fx (verified on the example inputs)"
    gm.qseg_report = _report(gm, recipe.name, how, decisions, removed, rescaled)
    allow_float_checkpoints(gm)
    return gm


def _prepare_fallback(model: nn.Module, inputs: tuple, recipe: Recipe, fx_failure: str) -> nn.Module:
    """Decide on a module-level graph from torch.export, apply by module swap."""
    model = copy.deepcopy(model)
    removed = strip_dropout_modules(model) if recipe.strip_dropout else []
    try:
        module_graph = g.export_module_graph(model, inputs)
    except Exception as exc:
        where = g.user_frame(exc)
        raise TraceError(
            f"{type(model).__name__} could not be captured.\n"
            f"  torch.fx: {fx_failure}\n"
            f"  torch.export: {type(exc).__name__}{' at ' + where if where else ''}: {g.first_line(exc)}\n"
            "What to do: look at the lines named above. Data-dependent Python control flow (an `if` on "
            "a tensor's value) cannot be captured: make it a tensor op (torch.where) or move it out of "
            "forward. Or pass the module holding the line as leaf_modules=[...]: it is then kept whole "
            "and stays float."
        ) from exc
    decisions = apply_plan(model, module_graph, plan(module_graph, recipe))
    _link_accumulators(swap_model_graph(model, module_graph))
    how = f"torch.export + module swap (torch.fx failed: {fx_failure})"
    # the scale analysis needs the quantizers as graph nodes, which the module swap does not give
    rescaled = (
        "not applied: needs the torch.fx capture (this model used the fallback)" if recipe.rescale else ""
    )
    model.qseg_report = _report(module_graph, recipe.name, how, decisions, removed, rescaled)
    # convert reads the graph again with torch.export: it needs inputs, and these were verified
    model.qseg_example_inputs = tuple(
        t.detach().clone() if isinstance(t, torch.Tensor) else t for t in inputs
    )
    allow_float_checkpoints(model)
    return model


def _link_accumulators(model: ModelGraph) -> None:
    """Give each quantized layer whose input lies on activation grids, or whose BatchNorm
    ``convert`` folds, its :class:`~qseg.accumulator.AccumulatorLink`, by the conversion
    plan's rules, so that in eval mode it adds its bias, and computes its fold, as
    ``convert`` freezes it; such a BatchNorm becomes a :class:`~qseg.nn.FoldedNorm`."""
    for link in link_layers(model):
        norm = model.module_of(link.norm) if link.norm is not None else None
        if norm is not None:
            # False for a subclass of a BatchNorm: convert folds it, the prepared model computes it
            fold_norm_into(norm, link.module)
        if link.inputs or norm is not None:
            link.module.qseg_accumulator = AccumulatorLink(link.inputs or (), norm)


def _layer_row(gm: fx.GraphModule, decision, inputs: dict[str, str], outputs: dict[str, str]) -> LayerRow:
    layer = decision.layer
    weight = g.get_attr(gm, layer.param)
    bias = g.get_attr(gm, layer.name + ".bias") if not layer.functional else None
    bias_numel = bias.numel() if isinstance(bias, torch.Tensor) else 0
    params = weight.numel() + bias_numel
    if decision.weights is None:
        text, bits, size = f"float: {decision.reason}", 32, 4.0 * params
    else:
        quantizer = decision.weights.build()
        axis = getattr(quantizer, "channel_axis", None)
        scales = weight.shape[axis] if axis is not None else 1
        bits = quantizer.bits
        size = weight.numel() * bits / 8 + 4 * (scales + bias_numel)
        text = decision.weights.label + ("" if decision.reason == "recipe" else f" ({decision.reason})")
    name = layer.name
    return LayerRow(
        name, layer.type_name, text, inputs.get(name, "-"), outputs.get(name, "-"), params, bits, size
    )


def _report(
    gm: fx.GraphModule, recipe_name: str, how: str, decisions: Plan, removed: list[str], rescaled: str
) -> QsegReport:
    # people read module names (enc1.bn1), not FX node names (enc1_bn1)
    names = {n.name: str(n.target) if n.op == "call_module" else n.name for n in gm.graph.nodes}
    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    acts = []
    by_node = {d.layer.node: d.layer.name for d in decisions.layers}
    for a in decisions.activations:
        after = names.get(a.after, a.after)
        if a.before:
            for consumer in a.before:
                inputs[by_node[consumer]] = f"{a.config.label} from {after}"
        elif a.owner is not None:
            outputs[a.owner] = f"{a.config.label} after {after}"
        acts.append(ActRow(after, a.config.label, a.rule, a.owner, a.note))
    rows = [_layer_row(gm, d, inputs, outputs) for d in decisions.layers]
    return QsegReport(recipe_name, how, rows, acts, removed, list(decisions.skipped), rescaled)
