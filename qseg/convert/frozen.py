"""The frozen modules a converted model computes with, and how a prepared module freezes.

:class:`FrozenActQuant` replaces an activation quantizer with a uniform grid;
:class:`FrozenLayer` a quantized conv / transposed conv / linear layer, with its
BatchNorm folded in and, where its input lies on a power-of-two grid, as an integer
conv; :class:`FrozenWeight` the weight quantizer of a functional conv (``F.conv2d``
on a parameter). :func:`freeze_act`, :func:`freeze_layer` and :func:`freeze_weight`
build them; both conversion paths (``qseg/convert/apply_fx.py``,
``qseg/convert/apply_swap.py``) call them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import qseg.ops  # noqa: F401  (registers torch.ops.qseg.*)
from qseg.accumulator import folded, on_accumulator_grid
from qseg.convert.phases import Phases, as_phases, interleave, supported
from qseg.convert.report import ConvertReport
from qseg.errors import ExportError
from qseg.nn import QUANTIZED, ActQuant

__all__ = ["FrozenActQuant", "FrozenLayer", "FrozenWeight"]

# products of an activation code and a weight code are summed in int16 pairs by
# AVX2 kernels without VNNI (vpmaddubsw): keep 2 * max|a| * max|w| within int16
INT16_PAIR_LIMIT = 32767
# float32 represents every integer below 2^24: the integer accumulator stays exact
EXACT_ACCUMULATOR = 2**24

# a uniform grid relative to 0: (scale, lowest code, highest code)
Grid = tuple[float, int, int]


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
        phases: Phases | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind  # conv | conv_transpose | linear
        self.params = params
        # a transposed conv with phases holds its phase conv's codes and conv params
        self.phases = phases
        self.axis = 1 if kind == "conv_transpose" and phases is None else 0
        self.register_buffer("codes", codes.to(_narrowest_int(int(codes.min()), int(codes.max()))))
        self.register_buffer("w_scale", w_scale.to(torch.float32).contiguous())
        self.in_grid = in_grid
        if in_grid is not None:
            self.register_buffer("bias_codes", bias_codes(bias, in_grid[0], self.w_scale))
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

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        bias = self.bias_codes if self.in_grid is not None else self.bias
        y = run_layer(x, self.kind, self.codes, self.w_scale, bias, self.params, self.in_grid, self.phases)
        if output_size is not None and list(y.shape[-len(output_size) :]) != list(output_size):
            # a transposed conv told its output size: the frozen form computes the one its
            # parameters give (output_padding), and no other
            raise ExportError(
                f"a converted {self.kind} was asked for output size {list(output_size)}; it computes "
                f"{list(y.shape[2:])}, the size its parameters give: call the transposed conv without "
                "output_size, or give it the output_padding that yields that size"
            )
        return y

    def extra_repr(self) -> str:
        mode = f"integer, input scale {self.in_grid[0]}" if self.in_grid else "float input"
        phases = f", as a conv over {math.prod(self.phases.strides)} phases" if self.phases else ""
        return f"{self.kind}{phases}, codes {self.codes.dtype} {tuple(self.codes.shape)}, {mode}"


class FrozenWeight(nn.Module):
    """The quantized weight of a functional layer, frozen: it takes no input and
    returns ``codes * scale`` (per slice along ``axis`` when ``scale`` is 1-d).

    A model that calls ``F.conv2d(x, self.weight)`` itself (EfficientNet's same-padding
    convs, a hand-written layer) has, once prepared, a weight quantizer between the
    parameter and the call (through torch.fx, a module of its own; on the fallback,
    a parametrization of the parameter, which passes the float weight and is ignored).
    ``convert`` puts one of these in its place, so the exporters write the weight as integer codes and a
    DequantizeLinear, which the runtimes fuse with the conv that reads it.

    Example:
        >>> import torch
        >>> weight = FrozenWeight(torch.tensor([[3, -2], [1, 0]]), torch.tensor([0.5, 0.25]), axis=0)
        >>> weight()
        tensor([[ 1.5000, -1.0000],
                [ 0.2500,  0.0000]])
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, axis: int) -> None:
        super().__init__()
        self.axis = axis
        self.register_buffer("codes", codes.to(_narrowest_int(int(codes.min()), int(codes.max()))))
        self.register_buffer("scale", scale.to(torch.float32).contiguous())

    def forward(self, *_float_weight: torch.Tensor) -> torch.Tensor:
        # a parametrization (the fallback path's functional layers) passes the float weight
        return torch.ops.qseg.dequantize(self.codes, self.scale, self.axis)

    def extra_repr(self) -> str:
        per = "per tensor" if self.scale.dim() == 0 else f"per channel along {self.axis}"
        return f"codes {self.codes.dtype} {tuple(self.codes.shape)}, {per}"


def freeze_weight(name: str, quantizer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """The frozen form of the functional layer's weight quantizer ``quantizer`` (named
    ``name`` in errors) applied to ``weight``: a :class:`FrozenWeight` on a uniform
    grid, else (a non-uniform grid, INQ) a constant holding the quantized weight.

    Raises:
        ExportError: the quantized weight holds non-finite values.
    """
    weight = weight.detach()
    with torch.no_grad():
        q = quantizer(weight)
    if not torch.isfinite(q).all():
        raise ExportError(f"{name}: the weight it quantizes holds non-finite values; it cannot be exported")
    spec = quantizer.spec(weight)
    if spec is None:
        return _Constant(q)
    codes = spec.codes(q) - spec.zero_point
    return FrozenWeight(codes, spec.scale, 0 if spec.axis is None else spec.axis)


class _Constant(nn.Module):
    """A tensor returned as it is: a functional layer's weight on a non-uniform grid."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value.clone())

    def forward(self, *_float_weight: torch.Tensor) -> torch.Tensor:
        return self.value


def freeze_act(module: ActQuant, name: str) -> FrozenActQuant | None:
    """The frozen form of the activation quantizer ``module`` (named ``name`` in errors),
    or ``None`` where no ``clamp(round(x / s) + z)`` reproduces it.

    Raises:
        ExportError: the quantizer has no range yet (neither calibrated nor trained).
    """
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


def input_grid(inputs: list[FrozenActQuant | None]) -> tuple[Grid | None, float | None]:
    """The one grid, and the one step, that the frozen forms of a layer's input quantizers
    put values on (each ``None`` where they differ, where one has no frozen form, or where
    there are none): what ``convert`` freezes a layer with, and what a prepared layer reads
    when it computes its fold (``qseg.accumulator.eval_forward``)."""
    if not inputs or any(f is None for f in inputs):
        return None, None
    grids = {f.grid for f in inputs}
    scales = {f.scale for f in inputs}
    return (grids.pop() if len(grids) == 1 else None), (scales.pop() if len(scales) == 1 else None)


def _is_power_of_two(x: float) -> bool:
    mantissa, _ = math.frexp(x)
    return x > 0 and mantissa == 0.5


def layer_kind(module: nn.Module) -> str:
    """``"conv"``, ``"conv_transpose"`` or ``"linear"``: what :class:`FrozenLayer` computes."""
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


def freeze_layer(
    name: str,
    module: nn.Module,
    bn: nn.Module | None,
    in_grid: tuple[float, int, int] | None,
    in_scale: float | None,
    report: ConvertReport,
) -> nn.Module:
    """The frozen form of the quantized layer ``module`` (BatchNorm ``bn`` folded in,
    an integer conv when ``in_grid`` is set, its bias on the accumulator grid of
    ``in_scale`` when that is set), recorded in ``report``."""
    weight = module.weight.detach()
    q = module.weight_quant(weight)
    if not torch.isfinite(q).all() or (module.bias is not None and not torch.isfinite(module.bias).all()):
        raise ExportError(f"layer {name}: its weights or bias hold non-finite values; it cannot be exported")
    spec = module.weight_quant.spec(weight)
    if spec is None:
        # the copy computes in float: it needs no link to the quantizers and BatchNorm around it
        plain = copy.deepcopy(module, {id(module.__dict__.get("qseg_accumulator")): None})
        plain.__class__ = next(c for c in QUANTIZED if QUANTIZED[c] is type(module))
        del plain.weight_quant
        plain.weight = nn.Parameter(q.clone(), requires_grad=False)
        report.grid_layers.append(name)
        return plain
    if folded(module, bn) is None:
        raise ExportError(
            f"layer {name}: per-channel scales along axis {spec.axis} are not the output channels"
        )
    params = _params(module)
    kind = layer_kind(module)
    if kind == "conv_transpose" and (in_grid is not None or params["groups"] > 1) and not supported(params):
        if params["groups"] > 1:
            raise ExportError(f"layer {name}: convert does not support a grouped, dilated transposed conv")
        report.warnings.append(
            f"{name}: a dilated transposed conv has no phase form here; OpenVINO runs it in float "
            "where its input grid has a zero point"
        )
    parts = layer_parts(module, bn, in_grid, in_scale)
    if in_grid is not None:
        # the runtimes run int8 kernels for any 8-bit input grid, integer conv here or not
        _warn_int8_kernel_limits(name, in_grid, parts.codes, report)
    if parts.phases is not None:
        report.phase_layers.append(name)
    frozen = FrozenLayer(
        kind,
        parts.codes,
        parts.w_scale.float(),
        parts.bias.float(),
        parts.params,
        parts.in_grid,
        parts.phases,
    )
    if parts.in_grid is None:
        report.float_input_layers.append(name)
        return frozen
    report.integer_layers.append(name)
    max_act = max(abs(in_grid[1]), abs(in_grid[2]))
    if max_act * int(parts.codes.abs().max()) * parts.codes[0].numel() >= EXACT_ACCUMULATOR:
        report.warnings.append(f"{name}: the accumulator may exceed 2^24; float32 parity is not exact")
    return frozen


def convertible(module: nn.Module) -> bool:
    """Whether :func:`freeze_layer` can freeze the quantized ``module``'s convolution
    parameters: numeric zero padding, and no grouped dilated transposed conv."""
    if isinstance(module, nn.Linear):
        return True
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return False
    return not (
        layer_kind(module) == "conv_transpose" and module.groups > 1 and not supported(_params(module))
    )


@dataclass(frozen=True, eq=False)
class LayerParts:
    """What a frozen quantized layer computes with (float64 scale and bias, before
    :class:`FrozenLayer` stores them in float32): weight ``codes``, one weight scale
    ``w_scale`` and ``bias`` per output channel (BatchNorm folded in; on the accumulator
    grid where the input step is known), conv ``params``, the input grid ``in_grid``
    where it is an integer conv (``None``: float input), the ``phases`` of a transposed
    conv computed as a conv."""

    kind: str
    codes: torch.Tensor
    w_scale: torch.Tensor
    bias: torch.Tensor
    params: dict
    in_grid: Grid | None
    phases: Phases | None


def layer_parts(
    module: nn.Module, bn: nn.Module | None, in_grid: Grid | None, in_scale: float | None
) -> LayerParts:
    """The :class:`LayerParts` of the quantized ``module`` (a uniform weight grid; numeric
    zero padding, no grouped dilated transposed conv: :func:`convertible`) with the
    BatchNorm ``bn`` folded in, reading ``in_grid`` with step ``in_scale``. Tensor ops
    on the weights only, so that a compiled prepared model traces them
    (``qseg.accumulator.eval_forward``)."""
    weight = module.weight.detach()
    codes = module.weight_quant.spec(weight).codes(module.weight_quant(weight))
    kind = layer_kind(module)
    w_scale, bias, _ = folded(module, bn)
    if in_scale is not None:
        # what the prepared layer adds in eval mode and an int8 kernel adds (qseg/accumulator.py)
        bias = on_accumulator_grid(bias, in_scale, w_scale)
    params, phases = _params(module), None
    if kind == "conv_transpose" and (in_grid is not None or params["groups"] > 1) and supported(params):
        # OpenVINO runs a transposed conv int8 only on a grid without a zero point; as an
        # ordinary conv over its phases it runs int8 on any grid (qseg/convert/phases.py). A
        # grouped one takes that form on any input: its folded scales differ group by group,
        # and its weight holds one slice along the channel axis for all groups
        codes, w_scale, bias, params, phases = as_phases(codes, w_scale, bias, params)
    if in_grid is not None and ((kind != "conv" and phases is None) or not _is_power_of_two(in_grid[0])):
        in_grid = None
    return LayerParts(kind, codes, w_scale, bias, params, in_grid, phases)


def bias_codes(bias: torch.Tensor, in_scale: float, w_scale: torch.Tensor) -> torch.Tensor:
    """An integer conv's bias as int32 codes of its accumulator step ``in_scale * w_scale``
    (``w_scale`` as the layer holds it)."""
    return torch.round(bias.double() / (in_scale * w_scale).double()).to(torch.int32)


def run_layer(
    x: torch.Tensor,
    kind: str,
    codes: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor,
    params: dict,
    in_grid: Grid | None,
    phases: Phases | None,
) -> torch.Tensor:
    """A frozen layer's output on ``x``: an integer conv (``qseg::qconv``, ``bias`` its
    int32 codes) where ``in_grid`` is set, else the layer on its dequantized weights
    ``codes * w_scale`` (``qseg::dequantize``). :class:`FrozenLayer` computes with it,
    and so does a prepared layer computing its fold (``qseg.accumulator.eval_forward``)."""
    dims = codes.dim() - 2
    axis = 1 if kind == "conv_transpose" and phases is None else 0
    if in_grid is not None:
        y = torch.ops.qseg.qconv(
            x, codes, w_scale, bias, in_grid[0], in_grid[1], in_grid[2],
            params["stride"], params["padding"], params["dilation"], params["groups"],
        )  # fmt: skip
        return y if phases is None else interleave(y, phases)
    weight = torch.ops.qseg.dequantize(codes, w_scale, axis)
    if kind == "linear":
        return F.linear(x, weight, bias)
    if kind == "conv" or phases is not None:
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        y = conv(x, weight, bias, params["stride"], params["padding"], params["dilation"], params["groups"])
        return y if phases is None else interleave(y, phases)
    conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
    return conv_t(
        x, weight, bias, params["stride"], params["padding"], params["output_padding"], params["groups"],
        params["dilation"],
    )  # fmt: skip
