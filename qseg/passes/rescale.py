"""Fit a pretrained float model to its quantizers' grids without changing its float function.

A float model trained without quantization rarely matches a fixed grid: paper A's
Qw0.4 has step 1/16, and conv filters with ``max|w|`` around 0.1 then round mostly
to 0; BatchNorm outputs peaking at 3-6 use a handful of the 64 levels of Qa6.0.
Two function-preserving transformations fix both before any fine-tuning:

* **weights**: a quantized layer whose output feeds only a BatchNorm has output
  channel ``c`` (weight and bias) multiplied by ``a_c = top / max|w_c|``, so that
  each filter spans its whole grid; the BatchNorm's running mean and variance take
  ``a_c`` and ``a_c^2``, so it computes the same normalized value.
* **activations**: every BatchNorm followed by a fixed-point activation quantizer
  (or only by a residual addition, whose sum ``prepare`` quantizes instead)
  has ``gamma`` and ``beta`` multiplied by one global ``B > 1``, chosen from the
  BatchNorm parameters alone so that ``beta_c + 3.1 |gamma_c|`` (about the 99.9th
  percentile of a unit-normal pre-activation) reaches 3/4 of the grid's top. A
  scale analysis of the graph checks that every consumer of a scaled tensor
  compensates (positively homogeneous ops pass the factor on, a BatchNorm absorbs
  it in its running statistics, a float layer whose output is not normalized
  divides its weight by it); otherwise nothing of this part is done and the plan
  says why. Dividing a float layer's weight by ``B`` multiplies its effective
  learning rate by ``B^2`` under SGD (``B`` under Adam), so BatchNorms whose
  factor would only force such a division are left unscaled where the rest stays
  consistent (in the paper U-Net, ``dec1.bn2`` before the float logits conv).

BatchNorm's ``eps`` does not scale with its input, so the statistics update alone
would change the output by a relative ``eps / (2 var)``; ``gamma`` absorbs that
difference against the running variance, which makes eval mode exact (up to float
rounding). In train mode, where the batch variance replaces the running one, the
difference that remains is of order ``eps / var`` times the batch's deviation from
the running variance.

Quantizers whose grid follows the weight (INQ powers of two, binary, ternary,
DoReFa) are left alone: their grid already scales with the weights, so rescaling
changes nothing about how well it is used.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from qseg import graph as g
from qseg.nn import QUANTIZED, ActQuant
from qseg.quantizers import FixedPoint

__all__ = ["RescalePlan", "plan_rescale", "rescale"]

#: the standard normal's 99.9th percentile (3.09), rounded: a BatchNorm output's peak is
#: estimated as beta + Z * |gamma| without looking at data
PEAK_Z = 3.1
#: the estimated peak lands at this fraction of the activation grid's top, leaving headroom
TARGET_FRACTION = 0.75

# ops that are positively homogeneous (f(s x) = s f(x) for s > 0) in their first argument,
# channel by channel, so a scale factor passes through them unchanged
_HOMOGENEOUS_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, *g.POOL_AND_RESAMPLE_MODULES)
_HOMOGENEOUS_FUNCTIONS = (
    F.relu,
    torch.relu,
    F.leaky_relu,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.interpolate,
    torch.flatten,
    operator.getitem,
    *g.DROPOUT_FUNCTIONS,
)
_HOMOGENEOUS_METHODS = ("relu", *g.RESHAPE_METHODS, "transpose", "view_as", "reshape_as")
# ops whose tensor inputs must all carry the same factor, which the output then carries
_CONCATENATIONS = (torch.cat, torch.concat, torch.stack)
# ops that read a tensor's shape or type, never its values
_SHAPE_METHODS = ("size", "dim", "numel", "type", "get_device")


@dataclass(frozen=True)
class RescalePlan:
    """What :func:`rescale` changes in a prepared graph, module by module.

    ``weight_scale`` and ``bias_scale`` multiply a layer's weight and bias per
    output channel; ``stats_scale`` multiplies a BatchNorm's running mean per
    channel (its running variance by the square); ``affine_scale`` multiplies a
    BatchNorm's ``gamma`` and ``beta``. ``fitted`` names the layers whose weights
    now span their grid, ``factor`` is the activation factor ``B`` (``None`` when
    activations were not rescaled, ``reason`` then says why) and ``divided`` the
    float layers whose weight was divided by ``B`` so that their output is unscaled;
    ``unscaled`` the BatchNorms left at factor 1 so that no float layer has to divide
    (dividing a weight by ``B`` changes how fast that layer trains).

    Example:
        >>> p = RescalePlan(fitted=("conv",), factor=None, reason="no BatchNorm")
        >>> p.summary()
        'weights of 1 layer fitted to their grid per output channel; activations not rescaled: no BatchNorm'
    """

    fitted: tuple[str, ...] = ()
    factor: float | None = None
    reason: str = ""
    divided: tuple[str, ...] = ()
    unscaled: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    weight_scale: dict[str, torch.Tensor] = field(default_factory=dict)
    bias_scale: dict[str, torch.Tensor] = field(default_factory=dict)
    stats_scale: dict[str, torch.Tensor] = field(default_factory=dict)
    affine_scale: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the prepare report: what was rescaled, or why not."""
        n = len(self.fitted)
        text = f"weights of {n} layer{'' if n == 1 else 's'} fitted to their grid per output channel"
        if self.factor is None:
            text += f"; activations not rescaled: {self.reason}"
        else:
            text += (
                f"; {len(self.affine_scale)} BatchNorm output{'' if len(self.affine_scale) == 1 else 's'}"
                f" scaled by B = {self.factor:.4g}"
                f" (3/4 of the activation grid's top over the largest beta + {PEAK_Z} |gamma|)"
            )
            if self.unscaled:
                text += (
                    f"; left unscaled so that no float layer divides its weights: {', '.join(self.unscaled)}"
                )
            if self.divided:
                text += f"; weights of {', '.join(self.divided)} divided by B"
        if self.skipped:
            text += "; not fitted: " + "; ".join(self.skipped)
        return text


def _grid_top(q: FixedPoint) -> float:
    # the saturating top, also for overflow="wrap": it wraps only at or above 2^int_bits
    return (2 ** (q.int_bits + q.frac_bits) - 1) * q.step


def _activation_target(q: FixedPoint) -> float:
    # on the grid, rounded down: 47 of 63 for Q6.0
    return math.floor(TARGET_FRACTION * _grid_top(q) / q.step) * q.step


def _out_axis(module: nn.Module) -> int | None:
    """The weight axis of output channels, or None when they do not map one to one."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return 0
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        # grouped transposed convs store (in, out / groups, ...): channels interleave
        return 1 if module.groups == 1 else None
    return None


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _exclusive_modules(gm: fx.GraphModule) -> set[str]:
    """Names of the modules called by exactly one node and sharing no parameter or
    buffer with another module: changing their tensors changes one op only."""
    calls = Counter(id(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module")
    owners: dict[int, set[int]] = {}
    for module in gm.modules():
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            owners.setdefault(id(t), set()).add(id(module))
    shared = {m for ids in owners.values() if len(ids) > 1 for m in ids}
    return {
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "call_module" and calls[id(m := gm.get_submodule(n.target))] == 1 and id(m) not in shared
    }


def _norm_after(gm: fx.GraphModule, node: fx.Node, exclusive: set[str]) -> fx.Node | None:
    """The BatchNorm module that is the only consumer of ``node``, else None."""
    users = list(node.users)
    if len(users) != 1:
        return None
    bn = users[0]
    if bn.op != "call_module" or not isinstance(gm.get_submodule(bn.target), g.BATCH_NORMS):
        return None
    if str(bn.target) not in exclusive or not bn.args or bn.args[0] is not node:
        return None
    return bn


def _is_weighted_module(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = g.module_of(gm, node)
    return module is not None and (type(module) in g.WEIGHTED_MODULES or type(module) in QUANTIZED.values())


def _fit_weights(gm: fx.GraphModule, exclusive: set[str], plan: dict) -> None:
    """Part (a): per-channel factors of the quantized layers that feed only a BatchNorm."""
    for node in gm.graph.nodes:
        module = g.module_of(gm, node)
        if module is None or type(module) not in QUANTIZED.values():
            continue
        quantizer = module.weight_quant
        # this pass is fixed point arithmetic (a grid top 2^i - 2^-f fixed by the format),
        # not a property other kinds could declare: the class is the right test here
        if not isinstance(quantizer, FixedPoint):
            continue  # a grid that follows the weights is used in full already
        name = str(node.target)
        axis = _out_axis(module)
        bn = _norm_after(gm, node, exclusive)
        why = None
        if axis is None:
            why = "grouped transposed conv"
        elif bn is None:
            why = "its output does not feed only a BatchNorm"
        elif gm.get_submodule(bn.target).num_features != _out_channels(module):
            why = "its BatchNorm normalizes another axis"
        elif name not in exclusive:
            why = "the layer or its parameters are shared"
        if why is not None:
            plan["skipped"].append(f"{name} ({why})")
            continue
        w = module.weight.detach().double()
        dims = [d for d in range(w.dim()) if d != axis]
        peak = w.abs().amax(dim=dims)
        a = torch.where(peak > 0, _grid_top(quantizer) / peak.clamp(min=1e-300), torch.ones_like(peak))
        plan["weight"][name] = a
        plan["bias"][name] = a.clone()
        plan["stats"][str(bn.target)] = a.clone()
        plan["fitted"].append(name)


def _carriers(gm: fx.GraphModule, exclusive: set[str]) -> tuple[dict[str, FixedPoint | None], str]:
    """BatchNorm nodes followed by an activation quantizer, with their quantizer, and
    those whose only use is an addition (``None``: ``prepare`` quantizes the sum instead,
    so they carry the factor as the other operand does); or the reason why activations
    cannot be rescaled."""
    found: dict[str, FixedPoint | None] = {}
    for node in gm.graph.nodes:
        if not (node.op == "call_module" and isinstance(gm.get_submodule(node.target), g.BATCH_NORMS)):
            continue
        users = list(node.users)
        joins = g.only_addition_user(gm, node) is not None
        if not joins and (len(users) != 1 or not isinstance(g.module_of(gm, users[0]), ActQuant)):
            continue
        quantizer = None if joins else g.module_of(gm, users[0]).quantizer
        bn = gm.get_submodule(node.target)
        if quantizer is not None and not isinstance(quantizer, FixedPoint):  # B is chosen for Q i.f's grid
            return (
                {},
                f"the activation quantizer after {node.target} is {type(quantizer).__name__}, not fixed point",
            )
        if not bn.affine:
            return {}, f"{node.target} has no affine parameters to carry the factor"
        if str(node.target) not in exclusive:
            return {}, f"{node.target} is called more than once or shares its parameters"
        found[node.name] = quantizer
    if all(q is None for q in found.values()):
        return {}, "no BatchNorm is followed by an activation quantizer (after_norm placement)"
    return found, ""


def _choose_factor(gm: fx.GraphModule, carriers: dict[str, FixedPoint | None]) -> tuple[float | None, str]:
    nodes = {n.name: n for n in gm.graph.nodes}
    peak, target = 0.0, math.inf
    for name, quantizer in carriers.items():
        bn = gm.get_submodule(nodes[name].target)
        gamma, beta = bn.weight.detach().double(), bn.bias.detach().double()
        # a signed grid must hold the low tail too; an addition's operand may be negative
        center = beta.abs() if quantizer is None or quantizer.signed else beta
        peak = max(peak, float((center + PEAK_Z * gamma.abs()).max()))
        if quantizer is not None:
            target = min(target, _activation_target(quantizer))
    if not peak > 0:
        return None, f"no BatchNorm channel has a positive estimated peak (beta + {PEAK_Z} |gamma|)"
    factor = target / peak
    if not factor > 1:
        return (
            None,
            f"B = {factor:.3g} <= 1: the BatchNorm outputs already reach 3/4 of the grid (never shrunk)",
        )
    return factor, ""


def _first_only(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, ActQuant):
            # a fixed grid does not move with its input: a scaled input uses more of it, the
            # float function (the quantizer as identity) is homogeneous. Fixed point only:
            # TernaryTanh's grid is fixed too, but its float function (tanh) is not homogeneous
            return isinstance(module.quantizer, FixedPoint)
        return isinstance(module, _HOMOGENEOUS_MODULES)
    if node.op == "call_function":
        if node.target is F.pad:
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
            return not value
        return node.target in _HOMOGENEOUS_FUNCTIONS
    return node.op == "call_method" and node.target in _HOMOGENEOUS_METHODS


def _reads_shape(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return node.op == "call_function" and node.target is getattr


def _joins(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` adds or concatenates tensors only: scaling them all by s scales it by s. A constant
    operand (x + 1, or a buffer) would not be scaled along."""
    if g.is_addition(gm, node):
        return True
    if not (node.op == "call_function" and node.target in _CONCATENATIONS):
        return False
    operands = node.args[0] if node.args else node.kwargs.get("tensors", ())
    return all(isinstance(a, fx.Node) and a.op != "get_attr" for a in operands)


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "output":
        return "the graph output"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})"


@dataclass
class _Scaling:
    """Part (b) for one choice of scaled BatchNorms: scalar factors by module name."""

    factor: float
    stats: dict[str, float] = field(default_factory=dict)
    bias: dict[str, float] = field(default_factory=dict)
    affine: dict[str, float] = field(default_factory=dict)
    divided: dict[str, float] = field(default_factory=dict)
    # for each divided layer, the scaled BatchNorm nodes whose factor reaches its input
    sources: dict[str, frozenset[str]] = field(default_factory=dict)


def _propagate(
    gm: fx.GraphModule, carriers: set[str], factor: float, exclusive: set[str]
) -> tuple[_Scaling | None, str]:
    """The scale each tensor carries when ``carriers`` output ``factor`` times their
    float value, and what compensates it; or None and why it cannot be compensated."""
    plan = _Scaling(factor)
    scale: dict[str, float] = {}
    origin: dict[str, frozenset[str]] = {}
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        scaled = [i for i in inputs if scale.get(i.name, 1.0) != 1.0]
        module = g.module_of(gm, node)
        out, came_from = 1.0, frozenset().union(*(origin[i.name] for i in scaled))
        if isinstance(module, g.BATCH_NORMS):
            name = str(node.target)
            if scaled:
                if name not in exclusive:
                    return None, f"{name} would receive a scaled input but is shared"
                plan.stats[name] = scale[scaled[0].name]
            came_from = frozenset()
            if node.name in carriers:
                plan.affine[name] = factor
                out, came_from = factor, frozenset({node.name})
        elif not scaled:
            pass
        elif node.op == "call_function" and node.target in g.WEIGHTED_FUNCTIONS:
            return None, f"{_describe(gm, node)} is a functional layer reading a tensor scaled by B"
        elif _is_weighted_module(gm, node):
            s = scale[scaled[0].name]
            name = str(node.target)
            if _norm_after(gm, node, exclusive) is not None and name in exclusive:
                # conv(s x) = s conv(x) once the bias is scaled too; the BatchNorm absorbs s
                plan.bias[name] = s
                out = s
            elif hasattr(module, "weight_quant"):
                return None, f"dividing {name}'s quantized weights by B would move them off their grid"
            elif name not in exclusive:
                return None, f"{name} reads a tensor scaled by B but is shared"
            else:
                plan.divided[name] = s
                plan.sources[name] = came_from
                came_from = frozenset()
        elif _reads_shape(node):
            came_from = frozenset()
        elif _first_only(gm, node):
            first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
            if not isinstance(first, fx.Node) or any(i is not first for i in scaled):
                return (
                    None,
                    f"{_describe(gm, node)} mixes a tensor scaled by B into an argument other than its input",
                )
            out = scale[first.name]
        elif _joins(gm, node):
            factors = {scale.get(i.name, 1.0) for i in inputs}
            if len(factors) != 1:
                return None, f"{_describe(gm, node)} joins tensors with different scales"
            out = factors.pop()
        else:
            sources = ", ".join(i.name for i in scaled)
            return None, f"{_describe(gm, node)} cannot take a tensor scaled by B (from {sources})"
        scale[node.name] = out
        origin[node.name] = came_from if out != 1.0 else frozenset()
    return plan, ""


def _scale_activations(
    gm: fx.GraphModule, exclusive: set[str]
) -> tuple[_Scaling | None, str, tuple[str, ...]]:
    """Part (b): the scaling, or None and why not, and the BatchNorms left unscaled."""
    carriers, reason = _carriers(gm, exclusive)
    if not carriers:
        return None, reason, ()

    def attempt(chosen: set[str]) -> tuple[_Scaling | None, str]:
        factor, why = _choose_factor(gm, {k: carriers[k] for k in chosen})
        return (None, why) if factor is None else _propagate(gm, chosen, factor, exclusive)

    chosen = set(carriers)
    best, reason = attempt(chosen)
    if best is None:
        return None, reason, ()
    # a float layer that divides its weight by B trains as if its learning rate were B^2
    # (SGD) or B (Adam) times larger; leaving unscaled the BatchNorms that only it needs
    # avoids that (paper U-Net: dec1.bn2 before the logits conv)
    improved = True
    while improved and best.divided:
        improved = False
        for layer in best.divided:
            trial_set = chosen - best.sources[layer]
            trial, _ = attempt(trial_set) if trial_set else (None, "")
            if trial is not None and set(trial.divided) < set(best.divided):
                chosen, best, improved = trial_set, trial, True
                break
    nodes = {n.name: n for n in gm.graph.nodes}
    return best, "", tuple(str(nodes[k].target) for k in carriers if k not in chosen)


def plan_rescale(gm: fx.GraphModule) -> RescalePlan:
    """Decide what :func:`rescale` would change in a prepared graph (``gm`` is only read).

    Example:
        >>> import torch, qseg
        >>> from qseg.models import PaperUNet
        >>> recipe = qseg.recipes.load("unet-qa6.0-qw0.4").replace(rescale=False)
        >>> qmodel = qseg.prepare(PaperUNet(widths=(4, 8, 8, 8)), recipe, example_inputs=torch.randn(1, 1, 16, 16))
        >>> p = plan_rescale(qmodel)
        >>> len(p.fitted), round(p.factor, 3), p.unscaled, p.divided   # fresh BatchNorms: 47 / 3.1
        (13, 15.161, ('dec1.bn2',), ())
    """
    exclusive = _exclusive_modules(gm)
    parts: dict = {"fitted": [], "skipped": [], "weight": {}, "bias": {}, "stats": {}}
    _fit_weights(gm, exclusive, parts)
    acts, reason, unscaled = _scale_activations(gm, exclusive)
    weight, bias, stats = parts["weight"], parts["bias"], parts["stats"]
    if acts is not None:
        for target, found in ((bias, acts.bias), (stats, acts.stats)):
            for name, s in found.items():
                module = gm.get_submodule(name)
                size = module.num_features if isinstance(module, g.BATCH_NORMS) else _out_channels(module)
                target[name] = target.get(name, torch.ones(size, dtype=torch.float64)) * s
        for name, s in acts.divided.items():
            module = gm.get_submodule(name)
            # a uniform factor: any axis will do where output channels do not map to one
            size = module.weight.shape[_out_axis(module) or 0]
            weight[name] = torch.full((size,), 1.0 / s, dtype=torch.float64)
    return RescalePlan(
        fitted=tuple(parts["fitted"]),
        factor=None if acts is None else acts.factor,
        reason=reason,
        divided=() if acts is None else tuple(acts.divided),
        unscaled=unscaled,
        skipped=tuple(parts["skipped"]),
        weight_scale=weight,
        bias_scale=bias,
        stats_scale=stats,
        affine_scale={} if acts is None else acts.affine,
    )


def _scale_along(t: torch.Tensor, factors: torch.Tensor, axis: int) -> None:
    shape = [1] * t.dim()
    shape[axis] = -1
    t.mul_(factors.to(t.dtype).reshape(shape))


@torch.no_grad()
def _apply(gm: fx.GraphModule, plan: RescalePlan) -> None:
    for name, a in plan.weight_scale.items():
        module = gm.get_submodule(name)
        _scale_along(module.weight, a, _out_axis(module) or 0)
    for name, a in plan.bias_scale.items():
        bias = gm.get_submodule(name).bias
        if bias is not None:
            bias.mul_(a.to(bias.dtype))
    for name in set(plan.stats_scale) | set(plan.affine_scale):
        bn = gm.get_submodule(name)
        f = plan.stats_scale.get(name)
        if f is not None and bn.track_running_stats:
            var = bn.running_var.double()
            if bn.affine:
                # the same normalized value with eps not scaling along: exact in eval mode
                bn.weight.mul_(
                    (torch.sqrt(f * f * var + bn.eps) / (f * torch.sqrt(var + bn.eps))).to(bn.weight.dtype)
                )
            bn.running_mean.mul_(f.to(bn.running_mean.dtype))
            bn.running_var.mul_((f * f).to(bn.running_var.dtype))
        b = plan.affine_scale.get(name)
        if b is not None:
            bn.weight.mul_(b)
            bn.bias.mul_(b)


def rescale(gm: fx.GraphModule, inplace: bool = False) -> fx.GraphModule:
    """A copy of a prepared graph whose quantized weights and BatchNorm outputs span
    their fixed-point grids, computing the same float function.

    Only parameters and buffers change (the graph is not rewritten); see the
    module docstring for the two transformations and :func:`plan_rescale` for
    what they would change. Run it on a model before training it (loading a float
    checkpoint afterwards undoes it, consistently).

    Example:
        >>> import torch, qseg
        >>> from qseg.models import PaperUNet
        >>> recipe = qseg.recipes.load("unet-qa6.0-qw0.4").replace(rescale=False)
        >>> qmodel = qseg.prepare(PaperUNet(widths=(4, 8, 8, 8)), recipe, example_inputs=torch.randn(1, 1, 16, 16))
        >>> fitted = rescale(qmodel)
        >>> w = fitted.enc2.conv1.weight
        >>> bool(torch.allclose(w.abs().amax(dim=(1, 2, 3)), torch.full((8,), 15 / 16)))
        True
    """
    plan = plan_rescale(gm)
    if not inplace:
        gm = copy.deepcopy(gm)
    _apply(gm, plan)
    return gm
