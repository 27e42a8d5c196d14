"""Turns a :class:`~qseg.recipes.Recipe` and a captured graph into one decision per
layer and per activation site, each with its reason. The passes carry the
decisions out; the report shows them."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

from qseg import graph as g
from qseg.errors import RecipeError
from qseg.recipes import INHERIT, QuantizerConfig, Recipe

__all__ = ["ActDecision", "LayerDecision", "Plan", "plan"]


@dataclass(frozen=True)
class LayerDecision:
    """What happens to one weighted layer.

    ``weights`` is the quantizer config, or ``None`` when the layer stays float;
    ``reason`` says which rule decided (``"recipe"``, ``"first layer"``,
    ``"override 0 (type=Linear)"``...).
    """

    layer: g.WeightedLayer
    weights: QuantizerConfig | None
    reason: str
    activations: QuantizerConfig | None


@dataclass(frozen=True)
class ActDecision:
    """An activation quantizer to insert.

    It goes after node ``after``; with ``before`` empty it replaces every use of
    that node's output, otherwise only the uses by the nodes named in ``before``
    (the ``conv_input`` placement). ``owner`` is the layer it serves (for
    overrides and the report), ``rule`` why it stands there, ``note`` any
    adjustment (a signed grid where the value can be negative). ``replaces`` names
    the ReLU nodes removed because the quantizer is itself the activation function
    (BNN's sign, TernaryNet's ternary tanh: a ReLU after them would erase their
    negative level, and with it half of what a binary activation can say).
    """

    after: str
    config: QuantizerConfig
    rule: str
    owner: str | None = None
    before: tuple[str, ...] = ()
    note: str = ""
    # ReLU nodes the quantizer replaces (a binary / ternary-tanh quantizer is the activation)
    replaces: tuple[str, ...] = ()


@dataclass
class Plan:
    """Every decision ``prepare`` takes for one model."""

    layers: list[LayerDecision]
    activations: list[ActDecision] = field(default_factory=list)
    # activation sites that got no quantizer, and why
    skipped: list[str] = field(default_factory=list)
    # the quantizer of sites that serve no layer (a BatchNorm after an addition, say)
    default_activations: QuantizerConfig | None = None


def _override_desc(index: int, override) -> str:
    parts = [f"{k}={v}" for k in ("name", "regex", "type") if (v := getattr(override, k)) is not None]
    return f"override {index} ({', '.join(parts)})"


def _decide_layers(gm: fx.GraphModule, recipe: Recipe) -> list[LayerDecision]:
    layers = g.weighted_layers(gm)
    first, last = g.first_and_last(gm, [layer.node for layer in layers])
    decisions = []
    for layer in layers:
        weights, reason = recipe.weights, "recipe"
        if weights is None:
            reason = "recipe quantizes no weights"
        if recipe.keep_float.first and layer.node in first:
            weights, reason = None, "first layer"
        elif recipe.keep_float.last and layer.node in last:
            weights, reason = None, "last layer"
        activations = recipe.activations
        for i, override in enumerate(recipe.overrides):
            if not override.matches(layer.name, layer.type_name):
                continue
            if override.weights is not INHERIT:
                weights, reason = override.weights, _override_desc(i, override)
            if override.activations is not INHERIT:
                activations = override.activations
        if weights is not None and weights.params.get("channel_axis") == 0 and layer.output_channel_axis:
            # a recipe's axis 0 means "per output channel", which a transposed conv holds on axis 1
            weights = QuantizerConfig(
                weights.kind, {**weights.params, "channel_axis": layer.output_channel_axis}
            )
        decisions.append(LayerDecision(layer, weights, reason, activations))
    return decisions


def _signed_if_needed(
    config: QuantizerConfig, can_be_negative: bool, why: str
) -> tuple[QuantizerConfig, str]:
    if config.signed or not can_be_negative:
        return config, ""
    return config.as_signed(), f"signed: {why}"


def _nonnegative(gm: fx.GraphModule, node: fx.Node, removed: frozenset[str]) -> bool:
    # a ReLU that a quantizer replaces no longer clamps: its output is the quantizer's
    return g.is_nonnegative(gm, node, dict.fromkeys(removed, False))


def _display(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _after_norm_sites(gm: fx.GraphModule, decisions: list[LayerDecision], plan_: Plan) -> None:
    by_node = {d.layer.node: d for d in decisions}
    nodes = {n.name: n for n in gm.graph.nodes}
    feeds_weighted = g.weighted_downstream(gm, by_node)
    # (node the quantizer follows, the layer it serves, rule, activation node it may replace)
    sites: list[tuple[fx.Node, LayerDecision | None, str, fx.Node | None]] = []
    for node in gm.graph.nodes:
        if g.is_batch_norm(gm, node):
            source = node.args[0] if node.args else None
            owner = by_node.get(source.name) if isinstance(source, fx.Node) else None
            user = g.only_addition_user(gm, node)
            if user is not None:
                # the sum leaves any grid: it gets its own quantizer where a quantized layer
                # reads it. One here would round twice, and OpenVINO's CPU plugin drops it
                # when it fuses the conv with the addition (docs/export.md)
                plan_.skipped.append(
                    f"{owner.layer.name if owner else node.name}: no quantizer after {node.name}: "
                    f"it only feeds the addition {user.name}; the sum is quantized where a quantized layer reads it"
                )
                continue
            sites.append((node, owner, "after BatchNorm", None))
    for d in decisions:
        current = nodes[d.layer.node]
        site = None
        while len(current.users) == 1:
            user = next(iter(current.users))
            if g.is_batch_norm(gm, user):
                break
            if g.is_other_norm(gm, user) or isinstance(g.module_of(gm, user), nn.Identity):
                current = user
                continue
            if g.is_activation(gm, user):
                site = user
            break
        if site is not None:
            sites.append((site, d, "after activation (no BatchNorm)", current))
        elif feeds_weighted[current.name] and not any(g.is_batch_norm(gm, u) for u in current.users):
            plan_.skipped.append(
                f"{d.layer.name}: no activation quantizer (no BatchNorm or activation follows; "
                f"its output feeds {', '.join(u.name for u in current.users) or 'nothing'})"
            )
    for node, owner, rule, before_activation in sites:
        label = owner.layer.name if owner else node.name
        if not feeds_weighted[node.name]:
            plan_.skipped.append(f"{label}: output reaches the model output without another weighted layer")
            continue
        config = owner.activations if owner else plan_.default_activations
        if config is None:
            plan_.skipped.append(f"{label}: activations kept float by the recipe")
            continue
        replaces: list[fx.Node] = []
        if config.nonlinearity and before_activation is not None and g.is_relu(gm, node):
            # the quantizer takes the ReLU's place instead of following it
            replaces, node, rule = [node], before_activation, "in place of the activation (no BatchNorm)"
        elif config.nonlinearity and rule == "after BatchNorm":
            replaces = [u for u in node.users if g.is_relu(gm, u)]
        if rule == "after BatchNorm":
            users = list(node.users)
            negative = not users or not all(g.is_relu(gm, u) for u in users)
            why = f"{node.name} feeds {', '.join(u.name for u in users)}, not only a ReLU"
        else:
            negative = not g.is_nonnegative(gm, node)
            why = f"{node.name} can output negative values"
        config, note = _signed_if_needed(config, negative, why)
        if replaces:
            removed = ", ".join(_display(r) for r in replaces)
            note = "; ".join(filter(None, (note, f"replaces {removed}: {config.label} is the activation")))
        plan_.activations.append(
            ActDecision(
                node.name,
                config,
                rule,
                owner.layer.name if owner else None,
                (),
                note,
                tuple(r.name for r in replaces),
            )
        )
    _off_grid_inputs(gm, decisions, plan_)


def _grid_tags(plan_: Plan) -> dict[str, object]:
    """What each placed quantizer's output lies on: its config where the grid is fixed
    (two quantizers of one config share the grid), else the quantizer itself (a
    calibrated grid is its own: two int8 quantizers get two scales)."""
    return {
        a.after: a.config if a.config.fixed_grid else ("calibrated", a.after)
        for a in plan_.activations
        if not a.before
    }


def _off_grid_inputs(gm: fx.GraphModule, decisions: list[LayerDecision], plan_: Plan) -> None:
    """Give a quantized layer an input quantizer where its input is not on a grid.

    After BatchNorm placement alone, a U-Net decoder conv reads the concatenation
    of a bilinear upsampling (off the grid) and a skip: an integer runtime could
    not run it without requantizing, which the trained model never saw. Placing
    the quantizer here makes training see what deployment computes.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    grids = _grid_tags(plan_)
    removed = _removed_relus(plan_)
    groups: dict[str, list[LayerDecision]] = {}
    for d in decisions:
        if d.weights is None or d.activations is None:
            continue
        source = nodes[d.layer.node].args[0]
        if g.grid_of(gm, source, grids) is None:
            groups.setdefault(source.name, []).append(d)
    for source, users in groups.items():
        config, note = _signed_if_needed(
            users[0].activations,
            not _nonnegative(gm, nodes[source], removed),
            f"{source} can output negative values",
        )
        rule = f"on the input of a quantized layer ({source} is off the grid)"
        before = tuple(d.layer.node for d in users)
        plan_.activations.append(ActDecision(source, config, rule, users[0].layer.name, before, note))


def _conv_input_sites(gm: fx.GraphModule, decisions: list[LayerDecision], plan_: Plan) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    grids = _grid_tags(plan_)  # the input grid
    groups: dict[str, list[LayerDecision]] = {}
    for d in decisions:
        if d.weights is None:
            continue
        if d.activations is None:
            plan_.skipped.append(f"{d.layer.name}: activations kept float by the recipe")
            continue
        source = nodes[d.layer.node].args[0]
        if g.grid_of(gm, source, grids) is not None:
            continue  # reads the input grid already
        groups.setdefault(source.name, []).append(d)
    for source, users in groups.items():
        config = users[0].activations
        config, note = _signed_if_needed(
            config, not g.is_nonnegative(gm, nodes[source]), f"{source} can output negative values"
        )
        plan_.activations.append(
            ActDecision(
                source,
                config,
                "on the input of a quantized layer",
                users[0].layer.name,
                tuple(d.layer.node for d in users),
                note,
            )
        )


def _norm_input_sites(gm: fx.GraphModule, decisions: list[LayerDecision], plan_: Plan) -> None:
    """A quantizer on a layer's output where it feeds only a per-sample norm
    (``quantize_norm_inputs``): in deployment that norm then reads integer codes, and the
    layer writes them, a quarter of the bytes of a float32 output (docs/export.md, step 5)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    placed = {a.after for a in plan_.activations if not a.before}
    for d in decisions:
        node = nodes[d.layer.node]
        if len(node.users) != 1 or node.name in placed:
            continue
        norm = next(iter(node.users))
        if not g.is_per_sample_norm(gm, norm):
            continue
        if d.activations is None:
            plan_.skipped.append(
                f"{d.layer.name}: input of {_display(norm)} kept float: activations kept float by the recipe"
            )
            continue
        config, note = _signed_if_needed(d.activations, True, f"{node.name} can output negative values")
        rule = (
            f"on the input of a per-sample norm ({_display(norm)} reads integer codes; quantize_norm_inputs)"
        )
        plan_.activations.append(ActDecision(node.name, config, rule, d.layer.name, (), note))


def _removed_relus(plan_: Plan) -> frozenset[str]:
    return frozenset(r for a in plan_.activations for r in a.replaces)


def _check_nonlinearities(gm: fx.GraphModule, plan_: Plan) -> None:
    """A binary or ternary-tanh activation needs an input that can be negative:
    after a ReLU, sign is +1 everywhere and the ternary tanh loses its -1 level."""
    nodes = {n.name: n for n in gm.graph.nodes}
    removed = _removed_relus(plan_)
    for a in plan_.activations:
        if a.config.nonlinearity and _nonnegative(gm, nodes[a.after], removed):
            where = f"the input of {a.owner}" if a.before else f"the output of {_display(nodes[a.after])}"
            raise RecipeError(
                f"activations: a {a.config.label} activation on {where}, which is never negative "
                f"(it follows a ReLU or another non-negative op), would "
                + ("be +1 everywhere" if a.config.kind == "binary" else "lose its -1 level")
                + ". Binary and ternary-tanh activations replace the ReLU: place them after "
                "BatchNorm (activation_placement: after_norm), or keep this layer's activations "
                "float with an override (activations: null)"
            )


def _input_sites(gm: fx.GraphModule, recipe: Recipe, plan_: Plan) -> None:
    """The recipe's input grid on every input of the model: the first layer then reads
    integer codes, as an integer runtime does."""
    grid = recipe.input
    lo, hi = grid.range
    rule = f"input grid (recipe input: {grid.bits} bits covering [{lo:g}, {hi:g}])"
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            plan_.activations.append(ActDecision(node.name, grid.config, rule))


def plan(gm: fx.GraphModule, recipe: Recipe) -> Plan:
    """Every decision for ``gm`` under ``recipe`` (the graph is only read)."""
    decisions = _decide_layers(gm, recipe)
    result = Plan(decisions, default_activations=recipe.activations)
    if recipe.input is not None:
        _input_sites(gm, recipe, result)
    if recipe.activations is not None or any(d.activations is not None for d in decisions):
        if recipe.activation_placement == "after_norm":
            _after_norm_sites(gm, decisions, result)
        else:
            _conv_input_sites(gm, decisions, result)
        if recipe.quantize_norm_inputs:
            _norm_input_sites(gm, decisions, result)
        _check_nonlinearities(gm, result)
    return result
