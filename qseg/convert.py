"""``qseg.convert``: freeze a prepared model for inference and export.

The converted model is what the exporters write and what the runtimes must
reproduce:

- activation quantizers with a uniform grid become :class:`FrozenActQuant`
  (``qseg::fake_quant``); a ReLU right after an unsigned one is removed (it is
  the identity on that grid, and a DequantizeLinear must feed the next conv);
- a quantized conv keeps its integer weight codes; a BatchNorm that follows it
  folds exactly into its per-channel scale, ``2^-f * gamma / sqrt(var + eps)``,
  and its bias; when the conv's input lies on a power-of-two grid it becomes an
  *integer* conv (``qseg::qconv``): int32 bias codes at scale
  ``s_in * s_w``, computed as an integer runtime computes it;
- a layer with a non-uniform grid (INQ) keeps float weights that lie exactly on
  the grid, and its BatchNorm stays a separate op;
- float layers (first/last) are left as they are.

Models prepared on the fallback path (an eager copy with swapped modules and
hooks, ``qseg/swap.py``) get the same changes by module swap; the graph facts
(which BatchNorm follows which conv, which input lies on which grid) come from
``torch.export`` of a float twin of the model on example inputs.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

import qseg.ops  # noqa: F401  (registers torch.ops.qseg.*)
from qseg import graph as g
from qseg.errors import ExportError
from qseg.nn import QUANTIZED, ActQuant

__all__ = ["ConvertReport", "FrozenActQuant", "FrozenLayer", "convert"]

# products of an activation code and a weight code are summed in int16 pairs by
# AVX2 kernels without VNNI (vpmaddubsw): keep 2 * max|a| * max|w| within int16
INT16_PAIR_LIMIT = 32767
# float32 represents every integer below 2^24: the integer accumulator stays exact
EXACT_ACCUMULATOR = 2**24


class FrozenActQuant(nn.Module):
    """An activation quantizer frozen to its grid: codes ``[qmin, qmax]`` around an
    integer ``zero_point`` (0 but for asymmetric ``int`` grids), step ``scale``.

    It computes ``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``,
    rounding half to even (``qseg::fake_quant``, which the ONNX exporter writes as
    QuantizeLinear -> Clip -> DequantizeLinear). :func:`convert` puts one in place of
    every activation quantizer with a uniform grid. :attr:`grid` is the grid relative
    to 0: ``(scale, qmin - zero_point, qmax - zero_point)``.

    Example:
        >>> import torch
        >>> quant = FrozenActQuant(scale=0.5, qmin=0, qmax=3)  # unsigned 2-bit grid, step 0.5
        >>> quant(torch.tensor([-1.0, 0.2, 0.8, 1.25, 9.0]))  # 1.25 is a tie: rounds to even
        tensor([0.0000, 0.0000, 1.0000, 1.0000, 1.5000])
    """

    def __init__(self, scale: float, qmin: int, qmax: int, zero_point: int = 0) -> None:
        super().__init__()
        self.scale, self.qmin, self.qmax = float(scale), int(qmin), int(qmax)
        self.zero_point = int(zero_point)

    @property
    def grid(self) -> tuple[float, int, int]:
        """``(scale, lowest, highest)`` integer multiple of the scale the output takes.

        Example:
            >>> FrozenActQuant(scale=0.1, qmin=0, qmax=255, zero_point=30).grid
            (0.1, -30, 225)
        """
        return self.scale, self.qmin - self.zero_point, self.qmax - self.zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qseg.fake_quant(x, self.scale, self.qmin, self.qmax, self.zero_point)

    def extra_repr(self) -> str:
        zero = f", zero_point={self.zero_point}" if self.zero_point else ""
        return f"scale={self.scale}, qmin={self.qmin}, qmax={self.qmax}{zero}"


def _narrowest_int(lo: int, hi: int) -> torch.dtype:
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    raise ExportError(f"integer codes in [{lo}, {hi}] do not fit in 32 bits")


class FrozenLayer(nn.Module):
    """A quantized conv / transposed conv / linear layer frozen for inference.

    ``codes`` are the integer weight codes (stored in the narrowest integer
    type), ``w_scale`` one float32 scale per output channel. With ``in_scale``
    set, the layer is an integer conv of an on-grid input with int32
    ``bias_codes``; otherwise it dequantizes its weights and runs in float.
    :func:`convert` builds one for each quantized layer with a uniform weight grid.

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> def block(i, o):
        ...     return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        >>> model = nn.Sequential(*block(1, 4), *block(4, 4), nn.Conv2d(4, 1, 1))
        >>> x = torch.rand(1, 1, 8, 8)
        >>> converted = qseg.convert(qseg.prepare(model, "unet-qa6.0-qw0.4", example_inputs=x))
        >>> layer = converted.get_submodule("3")  # the middle conv; the first and last stay float
        >>> layer
        FrozenLayer(conv, codes torch.int8 (4, 4, 3, 3), integer, input scale 1.0)
        >>> layer.integer, layer.bias_codes.dtype
        (True, torch.int32)
    """

    def __init__(
        self,
        kind: str,
        codes: torch.Tensor,
        w_scale: torch.Tensor,
        bias: torch.Tensor,
        params: dict,
        in_grid: tuple[float, int, int] | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind  # conv | conv_transpose | linear
        self.params = params
        self.axis = 1 if kind == "conv_transpose" else 0
        self.register_buffer("codes", codes.to(_narrowest_int(int(codes.min()), int(codes.max()))))
        self.register_buffer("w_scale", w_scale.to(torch.float32).contiguous())
        self.in_grid = in_grid
        if in_grid is not None:
            in_scale = in_grid[0]
            bias_scale = in_scale * self.w_scale
            self.register_buffer(
                "bias_codes", torch.round(bias.double() / bias_scale.double()).to(torch.int32)
            )
        else:
            self.register_buffer("bias", bias.to(torch.float32))

    @property
    def integer(self) -> bool:
        """Whether the layer runs as an integer conv (its input on a known grid)."""
        return self.in_grid is not None

    def weight(self) -> torch.Tensor:
        """The dequantized weights, ``codes * w_scale`` per output channel (BatchNorm folded in).

        Example:
            >>> import torch
            >>> conv = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1}
            >>> codes = torch.tensor([[[[3, -2]]], [[[1, 0]]]])  # 2 output channels, 1x2 kernels
            >>> layer = FrozenLayer("conv", codes, torch.tensor([0.5, 0.25]), torch.zeros(2), conv)
            >>> layer.weight().flatten(1)
            tensor([[ 1.5000, -1.0000],
                    [ 0.2500,  0.0000]])
        """
        return torch.ops.qseg.dequantize(self.codes, self.w_scale, self.axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.in_grid is not None:
            return torch.ops.qseg.qconv(
                x,
                self.codes,
                self.w_scale,
                self.bias_codes,
                self.in_grid[0],
                self.in_grid[1],
                self.in_grid[2],
                p["stride"],
                p["padding"],
                p["dilation"],
                p["groups"],
            )
        w = self.weight()
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        dims = self.codes.dim() - 2
        if self.kind == "conv":
            conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
            return conv(x, w, self.bias, p["stride"], p["padding"], p["dilation"], p["groups"])
        conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        return conv_t(
            x, w, self.bias, p["stride"], p["padding"], p["output_padding"], p["groups"], p["dilation"]
        )

    def extra_repr(self) -> str:
        mode = f"integer, input scale {self.in_grid[0]}" if self.in_grid else "float input"
        return f"{self.kind}, codes {self.codes.dtype} {tuple(self.codes.shape)}, {mode}"


@dataclass
class ConvertReport:
    """What ``convert`` did, per layer and in total (``converted.qseg_convert``).

    The lists name layers: ``integer_layers`` run as integer convs,
    ``float_input_layers`` keep integer weights but read a float input,
    ``grid_layers`` keep float weights on a non-uniform grid (INQ);
    ``folded_norms`` are the BatchNorms folded into the conv before them,
    ``removed_relus`` the ReLUs dropped after an unsigned quantizer, and
    ``warnings`` flag integer kernels that may saturate or lose exactness.

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> def block(i, o):
        ...     return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        >>> model = nn.Sequential(*block(1, 4), *block(4, 4), nn.Conv2d(4, 1, 1))
        >>> x = torch.rand(1, 1, 8, 8)
        >>> report = qseg.convert(qseg.prepare(model, "unet-qa6.0-qw0.4", example_inputs=x)).qseg_convert
        >>> print(report)
        integer convs: 1 (3)
        quantized weights, float input: -
        float weights on a non-uniform grid: -
        BatchNorms folded: 1; ReLUs removed: 2
        >>> report.folded_norms
        ['4']
    """

    integer_layers: list[str] = field(default_factory=list)
    float_input_layers: list[str] = field(default_factory=list)
    grid_layers: list[str] = field(default_factory=list)
    folded_norms: list[str] = field(default_factory=list)
    removed_relus: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"integer convs: {len(self.integer_layers)} ({', '.join(self.integer_layers) or '-'})",
            f"quantized weights, float input: {', '.join(self.float_input_layers) or '-'}",
            f"float weights on a non-uniform grid: {', '.join(self.grid_layers) or '-'}",
            f"BatchNorms folded: {len(self.folded_norms)}; ReLUs removed: {len(self.removed_relus)}",
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _frozen_act(module: ActQuant, name: str) -> FrozenActQuant | None:
    q = module.quantizer
    if not q.range_set:
        raise ExportError(
            f"activation quantizer {name} has no range yet: run qseg.calibrate(qmodel, data) "
            "(or train the model) before convert"
        )
    # clamp(round(x / s) + z) reproduces the quantizer exactly, or None (wrap mode, binary sign)
    spec = q.frozen_spec()
    if spec is None:
        return None
    return FrozenActQuant(float(spec.scale), spec.qmin, spec.qmax, spec.zero_point)


def _is_power_of_two(x: float) -> bool:
    mantissa, _ = math.frexp(x)
    return x > 0 and mantissa == 0.5


def _fold_target(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, nn.Module] | None:
    users = list(node.users)
    if len(users) != 1:
        return None
    bn = g.module_of(gm, users[0])
    if isinstance(bn, g.BATCH_NORMS) and bn.track_running_stats and bn.running_mean is not None:
        return users[0], bn
    return None


def _layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    return "conv_transpose" if isinstance(module, nn.modules.conv._ConvTransposeNd) else "conv"


def _params(module: nn.Module) -> dict:
    if isinstance(module, nn.Linear):
        return {}
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise ExportError(
            f"{type(module).__name__} with padding={module.padding!r}, padding_mode={module.padding_mode!r}: "
            "convert supports numeric zero padding"
        )
    return {
        "stride": list(module.stride),
        "padding": list(module.padding),
        "dilation": list(module.dilation),
        "groups": module.groups,
        "output_padding": list(getattr(module, "output_padding", ())),
    }


def _warn_int8_kernel_limits(
    name: str, in_grid: tuple[float, int, int], codes: torch.Tensor, report: ConvertReport
) -> None:
    """Warn where int8 kernels on CPUs without VNNI do not compute what the QDQ file says.

    ``in_grid`` is relative to 0: ``(scale, lo, hi)``. A symmetric grid (``lo == -hi``)
    is stored as signed int8; any other grid as uint8 codes ``0 .. hi - lo`` (a zero point
    where ``lo < 0``).
    """
    _, lo, hi = in_grid
    signed = lo < 0 and lo == -hi
    max_code = max(abs(lo), abs(hi)) if signed or lo >= 0 else hi - lo
    if max_code > 255:
        return  # not an 8-bit grid: no int8 kernel
    max_w = int(codes.abs().max())
    if 2 * max_code * max_w > INT16_PAIR_LIMIT:
        report.warnings.append(
            f"{name}: 2 x {max_code} x {max_w} exceeds 32767; AVX2 int8 kernels without VNNI may "
            "saturate (use 7-bit weights, or 7-bit activations, on such CPUs)"
        )
    if signed and bool((codes.remainder(2) != 0).any()):
        report.warnings.append(
            f"{name}: reads a signed int8 grid; on CPUs without VNNI, OpenVINO's int8 kernels halve "
            "the weight codes of such a conv (oneDNN's guard against int16 overflow), so its odd "
            "codes lose their last bit there and parity is lost; an unsigned grid (an input range "
            "starting at 0) is exact on every CPU"
        )


def _freeze_layer(
    name: str,
    module: nn.Module,
    bn: nn.Module | None,
    in_grid: tuple[float, int, int] | None,
    report: ConvertReport,
) -> nn.Module:
    """The frozen form of the quantized layer ``module`` (BatchNorm ``bn`` folded in,
    an integer conv when ``in_grid`` is set), recorded in ``report``."""
    weight = module.weight.detach()
    q = module.weight_quant(weight)
    if not torch.isfinite(q).all() or (module.bias is not None and not torch.isfinite(module.bias).all()):
        raise ExportError(f"layer {name}: its weights or bias hold non-finite values; it cannot be exported")
    spec = module.weight_quant.spec(weight)
    if spec is None:
        plain = copy.deepcopy(module)
        plain.__class__ = next(c for c in QUANTIZED if QUANTIZED[c] is type(module))
        del plain.weight_quant
        plain.weight = nn.Parameter(q.clone(), requires_grad=False)
        report.grid_layers.append(name)
        return plain
    kind = _layer_kind(module)
    out_axis = 1 if kind == "conv_transpose" else 0
    out_channels = weight.shape[out_axis]
    codes = spec.codes(q)
    if spec.axis is None:
        w_scale = spec.scale.to(torch.float64).expand(out_channels).clone()
    elif spec.axis == out_axis:
        w_scale = spec.scale.to(torch.float64)
    else:
        raise ExportError(
            f"layer {name}: per-channel scales along axis {spec.axis} are not the output channels"
        )
    bias = module.bias.detach().double() if module.bias is not None else torch.zeros(out_channels).double()
    if bn is not None:
        k = bn.weight.detach().double() if bn.affine else torch.ones(out_channels).double()
        k = k / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = bn.bias.detach().double() if bn.affine else torch.zeros(out_channels).double()
        w_scale = w_scale * k
        bias = (bias - bn.running_mean.double()) * k + shift
    if in_grid is not None:
        # the runtimes run int8 kernels for any 8-bit input grid, integer conv here or not
        _warn_int8_kernel_limits(name, in_grid, codes, report)
    if in_grid is not None and (kind != "conv" or not _is_power_of_two(in_grid[0])):
        in_grid = None
    frozen = FrozenLayer(kind, codes, w_scale.float(), bias.float(), _params(module), in_grid)
    if in_grid is None:
        report.float_input_layers.append(name)
        return frozen
    report.integer_layers.append(name)
    max_act = max(abs(in_grid[1]), abs(in_grid[2]))
    if max_act * int(codes.abs().max()) * codes[0].numel() >= EXACT_ACCUMULATOR:
        report.warnings.append(f"{name}: the accumulator may exceed 2^24; float32 parity is not exact")
    return frozen


def convert(qmodel: nn.Module, example_inputs: torch.Tensor | tuple | None = None) -> nn.Module:
    """An inference copy of a prepared model: eval mode, BatchNorm folded where it
    follows a quantized conv, weights frozen to integer codes, activation
    quantizers frozen; ``converted.qseg_convert`` says which layers became
    integer convs. Its outputs equal the prepared model's in eval mode up to the
    float rounding of the fold (an activation exactly at a rounding tie can move
    by one step).

    A model prepared through torch.fx converts to a ``torch.fx.GraphModule``. A
    model prepared on the fallback (torch.export + module swap, for models FX
    cannot capture) converts to a copy of the eager model with the same changes
    made by module swap; its graph is read again with ``torch.export`` on
    ``example_inputs``, by default the ones ``prepare`` verified (kept on the model
    as ``qseg_example_inputs``, moved to its device).

    Raises:
        ExportError: the model was not returned by ``qseg.prepare``, a fallback
            model has no example inputs or cannot be exported on them,
            or a layer has non-finite weights (the message names the layer).

    Example:
        >>> import torch, qseg
        >>> from qseg.models import PaperUNet
        >>> q = qseg.prepare(PaperUNet(widths=(8, 16, 32, 32)), example_inputs=torch.randn(1, 1, 32, 32))
        >>> len(qseg.convert(q).qseg_convert.integer_layers)
        13
    """
    if not hasattr(qmodel, "qseg_report"):
        raise ExportError(f"convert takes a model returned by qseg.prepare; got {type(qmodel).__name__}")
    if isinstance(qmodel, fx.GraphModule):
        return _convert_fx(qmodel)
    if example_inputs is None:
        example_inputs = getattr(qmodel, "qseg_example_inputs", None)
        if example_inputs is None:
            raise ExportError(
                f"{type(qmodel).__name__} was prepared on the torch.export + module swap fallback "
                "and carries no example inputs (a model saved and rebuilt without them): convert reads "
                "its graph again with torch.export, so pass the inputs: qseg.convert(qmodel, example_inputs=x)"
            )
        device = next((p.device for p in qmodel.parameters()), torch.device("cpu"))
        example_inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in example_inputs)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    return _convert_fallback(qmodel, inputs)


def _convert_fx(qmodel: fx.GraphModule) -> fx.GraphModule:
    gm = copy.deepcopy(qmodel).eval()
    report = ConvertReport()
    grids: dict[str, tuple[float, int, int]] = {}
    for node in list(gm.graph.nodes):
        module = g.module_of(gm, node)
        if isinstance(module, ActQuant):
            frozen = _frozen_act(module, str(node.target))
            if frozen is not None:
                gm.add_submodule(node.target, frozen)
                grids[node.name] = frozen.grid
    for node in list(gm.graph.nodes):
        module = g.module_of(gm, node)
        if type(module) not in QUANTIZED.values():
            continue
        fold = _fold_target(gm, node) if _layer_kind(module) != "linear" else None
        in_grid = g.grid_of(gm, node.args[0], grids) if node.args else None
        frozen = _freeze_layer(str(node.target), module, fold[1] if fold else None, in_grid, report)
        gm.add_submodule(node.target, frozen)
        if fold is not None and isinstance(frozen, FrozenLayer):
            bn_node = fold[0]
            bn_node.replace_all_uses_with(node)
            gm.graph.erase_node(bn_node)
            report.folded_norms.append(str(bn_node.target))
    for node in list(gm.graph.nodes):
        if g.is_relu(gm, node) and node.args and isinstance(node.args[0], fx.Node):
            source = node.args[0]
            grid = grids.get(source.name)
            if grid is not None and grid[1] >= 0:
                node.replace_all_uses_with(source)
                gm.graph.erase_node(node)
                report.removed_relus.append(node.name)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.qseg_convert = report
    return gm


# ---- the fallback: an eager model changed by module swap and hooks (qseg/swap.py) ------------

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
    layers back to their torch.nn class, every activation quantizer an identity (its
    hook stays and returns its input). ``torch.export`` then shows each layer as one call."""
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        if type(module) in QUANTIZED.values():
            module.__class__ = next(c for c in QUANTIZED if QUANTIZED[c] is type(module))
            del module.weight_quant
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


def _convert_fallback(qmodel: nn.Module, inputs: tuple) -> nn.Module:
    model = copy.deepcopy(qmodel).eval()
    try:
        graph = g.export_module_graph(_float_twin(model), inputs)
    except Exception as exc:
        raise ExportError(
            f"torch.export could not read {type(qmodel).__name__} on the example inputs again: "
            f"{type(exc).__name__}: {g.first_line(exc)}"
        ) from exc
    calls = Counter(str(n.target) for n in graph.graph.nodes if n.op == "call_module")
    report = ConvertReport()
    for prefix, module in list(model.named_modules()):
        for child in _QUANTIZER_CHILDREN:
            quantizer = module._modules.get(child)
            name = f"{prefix}.{child}" if prefix else child
            frozen = _frozen_act(quantizer, name) if isinstance(quantizer, ActQuant) else None
            if frozen is not None:
                module.add_module(child, frozen)
    # a module's output is on a grid when its forward hook quantizes it
    grids: dict[str, tuple[float, int, int]] = {}
    own_input = model._modules.get("input_quant")  # the recipe's input grid
    for node in graph.graph.nodes:
        if node.op == "placeholder" and isinstance(own_input, FrozenActQuant):
            grids[node.name] = own_input.grid
        if node.op == "call_module":
            quantizer = model.get_submodule(node.target)._modules.get("act_quant")
            if isinstance(quantizer, FrozenActQuant):
                grids[node.name] = quantizer.grid
    for node in list(graph.graph.nodes):
        if node.op != "call_module" or type(model.get_submodule(node.target)) not in QUANTIZED.values():
            continue
        name = str(node.target)
        module = model.get_submodule(name)
        # a layer called more than once, or whose output is quantized before its
        # BatchNorm, keeps a float input and its BatchNorm
        once = calls[name] == 1
        fold = _fold_target(graph, node) if once and _layer_kind(module) != "linear" else None
        if fold is not None and (calls[str(fold[0].target)] != 1 or "act_quant" in module._modules):
            fold = None
        own = module._modules.get("input_quant")
        if isinstance(own, FrozenActQuant):
            in_grid = own.grid
        else:
            in_grid = g.grid_of(graph, node.args[0], grids) if once and node.args else None
        bn = model.get_submodule(str(fold[0].target)) if fold is not None else None
        frozen = _freeze_layer(name, module, bn, in_grid, report)
        _swap(model, module, frozen)
        if bn is not None and isinstance(frozen, FrozenLayer):
            _swap(model, bn, nn.Identity())
            report.folded_norms.append(str(fold[0].target))
    for node in graph.graph.nodes:
        if node.op != "call_module" or not g.is_relu(graph, node) or calls[str(node.target)] != 1:
            continue
        relu = model.get_submodule(node.target)
        grid = grids.get(node.args[0].name) if node.args and isinstance(node.args[0], fx.Node) else None
        if grid is not None and grid[1] >= 0 and "act_quant" not in relu._modules:
            _swap(model, relu, nn.Identity())
            report.removed_relus.append(str(node.target))
    model.qseg_convert = report
    return model
