"""Capturing a model as a ``torch.fx`` graph, checked against the eager model, and
the graph queries the passes and the policy share.

Capture never trusts a trace: ``torch.fx.symbolic_trace`` can succeed and return a
graph that computes something else (MONAI's BasicUNet drops its skip connections
because ``torch.jit.isinstance`` is False on a proxy), so the traced module is run
on the example inputs and compared with the eager model.
"""

from __future__ import annotations

import copy
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from qseg.errors import TraceError
from qseg.nn import QUANTIZED
from qseg.quantizers import Quantizer

__all__ = [
    "Capture",
    "QsegTracer",
    "capture",
    "compare_outputs",
    "first_and_last",
    "is_batch_norm",
    "is_nonnegative",
    "weighted_layers",
]

WEIGHTED_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
WEIGHTED_FUNCTIONS: tuple[Callable, ...] = (
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    F.linear,
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    torch.conv_transpose1d,
    torch.conv_transpose2d,
    torch.conv_transpose3d,
)
BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
OTHER_NORMS: tuple[type[nn.Module], ...] = (
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
OTHER_NORM_FUNCTIONS = (F.instance_norm, F.group_norm, F.layer_norm, F.local_response_norm)
DROPOUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
DROPOUT_FUNCTIONS: tuple[Callable, ...] = (
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.dropout,
    torch.alpha_dropout,
    torch.feature_dropout,
    torch.feature_alpha_dropout,
)
# activations whose output is never negative: an unsigned quantizer before them changes nothing
RELU_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
RELU_FUNCTIONS: tuple[Callable, ...] = (F.relu, F.relu_, F.relu6, torch.relu, torch.relu_)
RELU_METHODS = ("relu", "relu_")
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    *RELU_MODULES,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.Tanh,
    nn.Softplus,
)
ACTIVATION_FUNCTIONS: tuple[Callable, ...] = (
    *RELU_FUNCTIONS,
    F.leaky_relu,
    F.leaky_relu_,
    F.prelu,
    F.elu,
    F.celu,
    F.selu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardtanh,
    F.hardsigmoid,
    F.softplus,
    torch.sigmoid,
    torch.tanh,
    F.sigmoid,
    F.tanh,
)
ACTIVATION_METHODS = (*RELU_METHODS, "sigmoid", "tanh", "sigmoid_", "tanh_")
NONNEGATIVE_OUTPUT_MODULES = (*RELU_MODULES, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
NONNEGATIVE_OUTPUT_FUNCTIONS = (*RELU_FUNCTIONS, torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus)
# pooling, resampling and pass-through layers: channel by channel, they commute with a positive
# scale and keep the sign of their input
POOL_AND_RESAMPLE_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
    nn.Identity,
    nn.Flatten,
    *DROPOUT_MODULES,
)
# ops whose output is non-negative when all their tensor inputs are
SIGN_PRESERVING_MODULES = (*POOL_AND_RESAMPLE_MODULES, nn.PixelShuffle)
SIGN_PRESERVING_FUNCTIONS = (
    torch.cat,
    torch.concat,
    torch.stack,
    torch.flatten,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool2d,
    F.interpolate,
    F.pad,
    operator.add,
    operator.getitem,
    torch.add,
)
RESHAPE_METHODS = ("view", "reshape", "flatten", "permute", "contiguous", "squeeze", "unsqueeze")
SIGN_PRESERVING_METHODS = (*RESHAPE_METHODS, "add")


aten = torch.ops.aten
WEIGHTED_FUNCTIONS += (
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv3d.default,
    aten.conv_transpose1d.default,
    aten.conv_transpose2d.input,
    aten.conv_transpose3d.input,
    aten.linear.default,
)
BATCH_NORM_FUNCTIONS = (
    F.batch_norm,
    torch.batch_norm,
    aten.batch_norm.default,
    aten._native_batch_norm_legit_no_training.default,
)
OTHER_NORM_FUNCTIONS += (aten.group_norm.default, aten.layer_norm.default, aten.instance_norm.default)
DROPOUT_FUNCTIONS += (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default)
RELU_FUNCTIONS += (aten.relu.default, aten.relu_.default, aten.relu6.default)
ACTIVATION_FUNCTIONS += (
    aten.relu.default,
    aten.relu_.default,
    aten.relu6.default,
    aten.leaky_relu.default,
    aten.elu.default,
    aten.gelu.default,
    aten.silu.default,
    aten.mish.default,
    aten.hardswish.default,
    aten.hardtanh.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.prelu.default,
)
NONNEGATIVE_OUTPUT_FUNCTIONS += (
    aten.relu.default,
    aten.relu_.default,
    aten.relu6.default,
    aten.sigmoid.default,
)
SIGN_PRESERVING_FUNCTIONS += (
    aten.cat.default,
    aten.max_pool1d.default,
    aten.max_pool2d.default,
    aten.max_pool3d.default,
    aten.avg_pool2d.default,
    aten.adaptive_avg_pool2d.default,
    aten.upsample_bilinear2d.vec,
    aten.upsample_nearest2d.vec,
    aten.upsample_trilinear3d.vec,
    aten.upsample_nearest3d.vec,
    aten.add.Tensor,
    aten.view.default,
    aten.reshape.default,
    aten.permute.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.pad.default,
)
# a tensor plus a tensor: where a residual branch joins the main path
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor)
ADD_METHODS = ("add", "add_")


class QsegTracer(fx.Tracer):
    """``torch.fx`` tracer that keeps torch.nn modules, qseg's modules and the
    user's chosen modules as leaves (single ``call_module`` nodes)."""

    def __init__(self, leaf_modules: Sequence[type[nn.Module] | str] = ()) -> None:
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = frozenset(m for m in leaf_modules if isinstance(m, str))

    def call_module(self, m: nn.Module, forward, args, kwargs):
        try:
            self.path_of_module(m)
        except NameError:
            # a module built inside forward (MONAI's resnet makes its shortcut pooling
            # that way) is not a submodule: record its ops instead of a call to it
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, Quantizer) or type(m).__module__.startswith("qseg."):
            return True
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class Capture:
    """The result of :func:`capture`.

    ``graph_module`` is the verified FX graph, or ``None`` when FX could not
    reproduce the model; ``reason`` then says why (trace error or mismatch).
    """

    graph_module: fx.GraphModule | None
    reason: str = ""


def _plain(output: object) -> object:
    """``output`` with every mapping as a plain dict (FX returns a dict where the eager
    model returned an OrderedDict, as torchvision's segmentation models do)."""
    if isinstance(output, dict):
        return {k: _plain(v) for k, v in output.items()}
    if isinstance(output, (list, tuple)) and not hasattr(output, "_fields"):
        return type(output)(_plain(v) for v in output)
    return output


def compare_outputs(expected: object, got: object) -> str:
    """Empty string when two model outputs are equal in structure and value, else why not."""
    flat_e, spec_e = tree_flatten(_plain(expected))
    flat_g, spec_g = tree_flatten(_plain(got))
    if spec_e != spec_g:
        return f"the output structure differs: eager {spec_e}, traced {spec_g}"
    for i, (e, g) in enumerate(zip(flat_e, flat_g, strict=True)):
        if isinstance(e, torch.Tensor) != isinstance(g, torch.Tensor):
            return f"output {i}: a tensor on one side only"
        if not isinstance(e, torch.Tensor):
            if e != g:
                return f"output {i}: {e!r} != {g!r}"
            continue
        if e.shape != g.shape:
            return f"output {i}: shape {tuple(e.shape)} eager, {tuple(g.shape)} traced"
        if not torch.allclose(e, g, rtol=1e-4, atol=1e-5, equal_nan=True):
            diff = (e.double() - g.double()).abs().max().item()
            return f"output {i}: values differ (max |difference| {diff:.3g})"
    return ""


def _run(model: nn.Module, example_inputs: tuple) -> object:
    with torch.no_grad():
        return model(*example_inputs)


def capture(
    model: nn.Module, example_inputs: tuple, leaf_modules: Sequence[type[nn.Module] | str] = ()
) -> Capture:
    """Trace a copy of ``model`` with FX and verify it on ``example_inputs`` in eval mode.

    The user's model is neither traced in place nor left in another mode. A
    failing eager forward is the user's problem and raises :class:`TraceError`;
    a failing or mismatching trace returns a :class:`Capture` without a graph.
    """
    model = copy.deepcopy(model)
    training = model.training
    model.eval()
    try:
        expected = _run(model, example_inputs)
    except Exception as exc:
        raise TraceError(
            f"the model fails on the example inputs in eval mode ({type(exc).__name__}: {exc}); "
            "pass example_inputs the model accepts"
        ) from exc
    tracer = QsegTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = user_frame(exc)
        at = f" at {where}" if where else ""
        return Capture(
            None, f"torch.fx could not trace the model{at}: {type(exc).__name__}: {first_line(exc)}"
        )
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.eval()
    try:
        got = _run(gm, example_inputs)
    except Exception as exc:
        return Capture(
            None, f"the traced graph fails on the example inputs: {type(exc).__name__}: {first_line(exc)}"
        )
    mismatch = compare_outputs(expected, got)
    if mismatch:
        return Capture(None, f"the traced graph does not reproduce the model ({mismatch})")
    gm.train(training)
    return Capture(gm)


# qseg's and torch's own files, by where they are installed: a user's project may well live
# in a folder named qseg or torch, and its frames must still count as the user's
_LIBRARY_DIRS = tuple(os.path.dirname(os.path.realpath(f)) + os.sep for f in (torch.__file__, __file__))


def _is_user_file(filename: str) -> bool:
    if filename.startswith("<"):  # FX's generated forward (<eval_with_key>), exec'd strings
        return False
    return not os.path.realpath(filename).startswith(_LIBRARY_DIRS)


def user_frame(exc: BaseException) -> str:
    """``file:line in function`` of the deepest frame of ``exc`` in the user's code
    (not in torch or qseg), or an empty string."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _is_user_file(f.filename)]
    cause = exc.__cause__ or exc.__context__
    if not frames and cause is not None and cause is not exc:
        return user_frame(cause)
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# ---- graph queries -------------------------------------------------------------------------


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def _is(
    gm: fx.GraphModule, node: fx.Node, modules: tuple, functions: tuple = (), methods: tuple = ()
) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), modules)
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


def is_batch_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _is(gm, node, BATCH_NORMS, BATCH_NORM_FUNCTIONS)


def is_other_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _is(gm, node, OTHER_NORMS, OTHER_NORM_FUNCTIONS)


def is_per_sample_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An InstanceNorm or GroupNorm that normalizes with each sample's own statistics
    (not an InstanceNorm with ``track_running_stats``, which uses running ones in eval).

    Such a norm's output does not change when its whole input is scaled by a positive
    factor and shifted (up to its epsilon, which scales with the square of the factor):
    it can read integer codes in place of their values (docs/export.md)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.GroupNorm):
            return True
        instance_norms = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
        return isinstance(module, instance_norms) and not module.track_running_stats
    if node.op == "call_function" and node.target in (F.group_norm, aten.group_norm.default):
        return True
    if node.op == "call_function" and node.target in (F.instance_norm, aten.instance_norm.default):
        # F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, ...)
        use_input_stats = node.kwargs.get("use_input_stats", node.args[5] if len(node.args) > 5 else True)
        return use_input_stats is True
    return False


def is_dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _is(gm, node, DROPOUT_MODULES, DROPOUT_FUNCTIONS)


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _is(gm, node, ACTIVATION_MODULES, ACTIVATION_FUNCTIONS, ACTIVATION_METHODS)


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _is(gm, node, RELU_MODULES, RELU_FUNCTIONS, RELU_METHODS)


def is_addition(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` adds two tensors (a residual join), not a tensor and a constant."""
    tensors = [i for i in node.all_input_nodes if i.op != "get_attr"]
    return _is(gm, node, (), ADD_FUNCTIONS, ADD_METHODS) and len(tensors) == 2


def only_addition_user(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The addition that is ``node``'s only use, or None.

    A BatchNorm used this way gets no quantizer of its own (``prepare``'s policy): the sum is
    quantized where a quantized layer reads it, and ``rescale`` counts it as a carrier.
    """
    users = list(node.users)
    return users[0] if len(users) == 1 and is_addition(gm, users[0]) else None


@dataclass(frozen=True)
class WeightedLayer:
    """A conv, transposed conv or linear layer in the graph.

    ``name`` is the module's dotted name, or for a functional call the dotted name
    of its weight parameter; ``param`` names the weight (``enc1.conv1.weight``).
    """

    node: str
    name: str
    type_name: str
    param: str
    functional: bool

    @property
    def output_channel_axis(self) -> int:
        """The weight's axis of output channels: 1 for a transposed conv (its weight is
        ``[in, out / groups, *kernel]``), 0 otherwise.

        Example:
            >>> WeightedLayer("up", "up", "ConvTranspose2d", "up.weight", False).output_channel_axis
            1
        """
        return 1 if "transpose" in self.type_name.lower() else 0


def _weight_node(node: fx.Node) -> fx.Node | None:
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    return weight if isinstance(weight, fx.Node) and weight.op == "get_attr" else None


def weighted_layers(gm: fx.GraphModule) -> list[WeightedLayer]:
    """Every quantizable weighted op, in graph order: ``call_module`` nodes of exact
    torch.nn conv/linear types and functional conv/linear calls whose weight is a
    parameter (``get_attr``)."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            # exact torch.nn types only (a subclass may compute something else), or qseg's wrappers
            if type(module) in WEIGHTED_MODULES or type(module) in QUANTIZED.values():
                base = next(c for c in type(module).__mro__ if c in WEIGHTED_MODULES)
                found.append(
                    WeightedLayer(node.name, node.target, base.__name__, f"{node.target}.weight", False)
                )
        elif node.op == "call_function" and node.target in WEIGHTED_FUNCTIONS:
            weight = _weight_node(node)
            if weight is not None and isinstance(get_attr(gm, weight.target), nn.Parameter):
                name = weight.target.rsplit(".", 1)[0] if "." in weight.target else weight.target
                found.append(WeightedLayer(node.name, name, node.target.__name__, weight.target, True))
    return found


def free_attr_name(gm: fx.GraphModule, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``... whichever ``gm`` has no attribute of yet."""
    candidate, i = name, 1
    while hasattr(gm, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def get_attr(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def first_and_last(gm: fx.GraphModule, nodes: Iterable[str]) -> tuple[set[str], set[str]]:
    """Names of the weighted nodes that are *first* (no weighted node on any path
    from a graph input to them) and *last* (none on any path from them to an output)."""
    weighted = set(nodes)
    order = list(gm.graph.nodes)
    above: dict[str, bool] = {}
    for node in order:
        above[node.name] = any(above[i.name] or i.name in weighted for i in node.all_input_nodes)
    below: dict[str, bool] = {}
    for node in reversed(order):
        below[node.name] = any(below[u.name] or u.name in weighted for u in node.users)
    first = {n for n in weighted if not above[n]}
    last = {n for n in weighted if not below[n]}
    return first, last


def weighted_downstream(gm: fx.GraphModule, weighted: Iterable[str]) -> dict[str, bool]:
    """For every node: does some weighted node lie on a path from it to an output?"""
    weighted = set(weighted)
    below: dict[str, bool] = {}
    for node in reversed(list(gm.graph.nodes)):
        below[node.name] = any(below[u.name] or u.name in weighted for u in node.users)
    return below


def is_nonnegative(gm: fx.GraphModule, node: fx.Node, _memo: dict[str, bool] | None = None) -> bool:
    """Whether ``node``'s output is provably never negative (after a ReLU, through
    pooling, upsampling, concatenation of non-negative tensors...)."""
    memo = {} if _memo is None else _memo
    if node.name in memo:
        return memo[node.name]
    memo[node.name] = False  # cycles cannot occur in a DAG; this guards re-entry only
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        unsigned_quant = getattr(module, "signed", True) is False
        if isinstance(module, NONNEGATIVE_OUTPUT_MODULES) or unsigned_quant:
            result = True
        elif isinstance(module, SIGN_PRESERVING_MODULES):
            result = _inputs_nonnegative(gm, node, memo)
        else:
            result = False
    elif node.op == "call_function":
        if node.target in NONNEGATIVE_OUTPUT_FUNCTIONS:
            result = True
        elif node.target in SIGN_PRESERVING_FUNCTIONS or node.target in DROPOUT_FUNCTIONS:
            result = _inputs_nonnegative(gm, node, memo)
        else:
            result = False
    elif node.op == "call_method":
        if node.target in RELU_METHODS or node.target in ("sigmoid", "sigmoid_"):
            result = True
        elif node.target in SIGN_PRESERVING_METHODS:
            result = _inputs_nonnegative(gm, node, memo)
        else:
            result = False
    else:
        result = False
    memo[node.name] = result
    return result


def _inputs_nonnegative(gm: fx.GraphModule, node: fx.Node, memo: dict[str, bool]) -> bool:
    inputs = node.all_input_nodes
    return bool(inputs) and all(is_nonnegative(gm, i, memo) for i in inputs)


# ---- the fallback: a module-level graph from torch.export ----------------------------------


def _is_leaf_type(module: nn.Module) -> bool:
    """A torch.nn module that is not a container: its call is one op of the model."""
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    return type(module).__module__.startswith("torch.nn.modules") and not isinstance(module, containers)


def export_module_graph(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """A graph of ``model`` at module granularity, built from ``torch.export``.

    ``torch.export`` records every aten op with the stack of modules that called
    it. Each call of a torch.nn leaf module (conv, BatchNorm, ReLU, pooling...)
    becomes one ``call_module`` node, with the module's own parameters dropped
    from its arguments; the remaining ops stay ``call_function`` nodes on aten,
    with parameters as ``get_attr``. The result is for analysis only (the same
    policy reads it as an FX graph); its root is ``model`` itself, not a copy.
    """
    was_training = model.training
    model.eval()
    try:
        exported = torch.export.export(model, example_inputs, strict=False)
    finally:
        model.train(was_training)
    signature = exported.graph_signature
    state_names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    groups: dict[str, fx.Node] = {}
    own_state: dict[str, str] = {}  # placeholder name -> owning module path

    def mapped(arg: object) -> object:
        return fx.node.map_arg(arg, lambda n: env[n.name])

    for node in exported.graph.nodes:
        if node.op == "placeholder":
            if node.name in state_names:
                target = state_names[node.name]
                own_state[node.name] = target.rsplit(".", 1)[0] if "." in target else ""
                env[node.name] = graph.get_attr(target)
            else:
                env[node.name] = graph.placeholder(node.name)
        elif node.op == "call_function":
            stack = node.meta.get("nn_module_stack") or {}
            key, (path, _) = list(stack.items())[-1] if stack else ("", ("", None))
            module = model.get_submodule(path) if path else None
            if module is not None and _is_leaf_type(module):
                if key not in groups:
                    # the module's own parameters and buffers are not inputs of its call
                    inputs = [env[i.name] for i in node.all_input_nodes if own_state.get(i.name) != path]
                    groups[key] = graph.call_module(path, tuple(inputs))
                env[node.name] = groups[key]
            else:
                env[node.name] = graph.call_function(node.target, mapped(node.args), mapped(node.kwargs))
        elif node.op == "output":
            graph.output(mapped(node.args[0]))
    return fx.GraphModule(model, graph, type(model).__name__)


# ops whose output lies on its input's grid: they select, move or pad values, never mix them
GRID_KEEPING_MODULES = (
    *RELU_MODULES,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Identity,
    nn.Flatten,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    *DROPOUT_MODULES,
)
GRID_KEEPING_FUNCTIONS = (
    *RELU_FUNCTIONS,
    torch.flatten,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.adaptive_max_pool2d,
    operator.getitem,
    aten.max_pool2d.default,
    aten.max_pool3d.default,
    aten.view.default,
    aten.reshape.default,
    aten.permute.default,
    aten.clone.default,
)
GRID_KEEPING_METHODS = (*RELU_METHODS, *RESHAPE_METHODS)
CONCATENATIONS = (torch.cat, torch.concat, torch.stack, aten.cat.default)


def _nearest(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An upsampling that copies values (nearest neighbour)."""
    module = module_of(gm, node)
    if isinstance(module, nn.Upsample):
        return module.mode == "nearest"
    if isinstance(module, nn.UpsamplingNearest2d):
        return True
    if node.op == "call_function" and node.target is F.interpolate:
        return node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest") == "nearest"
    return node.op == "call_function" and node.target in (
        aten.upsample_nearest2d.vec,
        aten.upsample_nearest3d.vec,
    )


def grid_of(gm: fx.GraphModule, node: fx.Node, grids: dict[str, object]) -> object:
    """The grid (any hashable tag, e.g. a quantizer config) ``node``'s output lies on,
    or None when it is not provably on one.

    ``grids`` maps the names of nodes whose output is quantized to their grid.
    The grid passes through ops that only select, move or pad values (ReLU,
    max pooling, nearest upsampling, reshapes, concatenation of tensors on one
    grid); averaging, bilinear interpolation and arithmetic leave it.
    """
    sources = grid_sources(gm, node, set(grids))
    tags = {grids[name] for name in sources} if sources is not None else set()
    return tags.pop() if len(tags) == 1 else None


def grid_sources(
    gm: fx.GraphModule, node: fx.Node, quantized: set[str], _memo: dict | None = None
) -> frozenset[str] | None:
    """The quantized nodes (names in ``quantized``) whose values ``node``'s output
    holds, through the ops :func:`grid_of` lets a grid pass, or None when some of
    its values come from elsewhere. ``node``'s output lies on a grid when all of
    them quantize to that one grid."""
    memo = {} if _memo is None else _memo
    if node.name in quantized:
        return frozenset((node.name,))
    if node.name in memo:
        return memo[node.name]
    memo[node.name] = None
    result = None
    inputs = [i for i in node.all_input_nodes if i.op != "get_attr"]
    if node.op == "call_function" and node.target in CONCATENATIONS:
        parts = [grid_sources(gm, i, quantized, memo) for i in inputs]
        result = frozenset().union(*parts) if parts and None not in parts else None
    elif inputs and (
        _is(gm, node, GRID_KEEPING_MODULES, GRID_KEEPING_FUNCTIONS, GRID_KEEPING_METHODS)
        or _nearest(gm, node)
    ):
        result = grid_sources(gm, inputs[0], quantized, memo)
    elif node.op == "call_function" and node.target is F.pad:
        constant = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0.0)
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        result = grid_sources(gm, inputs[0], quantized, memo) if mode == "constant" and not constant else None
    memo[node.name] = result
    return result
