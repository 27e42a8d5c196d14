"""QDQ ONNX export of converted models.

qseg's operators (``qseg/ops.py``) are translated into the pattern integer
runtimes fuse: an activation quantizer becomes QuantizeLinear -> Clip on the
integer codes -> DequantizeLinear (a float Clip before the Q would block
onnxruntime's QLinearConv fusion), weights are integer initializers feeding a
DequantizeLinear (never float constants: folding them through Q/DQ moves some
weights by one step in OpenVINO), and an integer conv reads its input through a
Q/DQ pair on its grid (exact, since the input lies on it) with an int32 bias.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import qseg.ops  # noqa: F401  (registers torch.ops.qseg.*)
from qseg import graph as g
from qseg.errors import ExportError
from qseg.exporters.onnx_rewrite import weights_as_float, weights_as_int4
from qseg.runtime.settings import METADATA_KEY, InferenceSettings, check_settings

__all__ = ["export_onnx"]

OPSET = 21  # INT4 / INT16 QuantizeLinear types and per-axis DequantizeLinear


def _int_type(qmin: int, qmax: int):
    import onnx_ir as ir

    for dtype in (ir.DataType.UINT8, ir.DataType.INT8, ir.DataType.UINT16, ir.DataType.INT16):
        info = np.iinfo(dtype.numpy())
        if info.min <= qmin and qmax <= info.max:
            return dtype
    raise ExportError(
        f"an activation grid [{qmin}, {qmax}] does not fit in 16 bits, ONNX QuantizeLinear's widest"
    )


def _translations() -> dict:
    import onnx_ir as ir
    from onnxscript import opset21 as op

    def constant(value, dtype):
        return op.Constant(value=ir.tensor(np.array(value, dtype=dtype)))

    def quantize_dequantize(x, scale: float, qmin: int, qmax: int, zero_point: int = 0):
        dtype = _int_type(qmin, qmax).numpy()
        s = constant(scale, np.float32)
        zero = constant(zero_point, dtype)
        info = np.iinfo(dtype)
        if info.bits > 8 and (qmin, qmax) != (info.min, info.max):
            # onnxruntime has no integer Clip for 16-bit types; clamping the float input to
            # the grid's ends first rounds to the same codes (the ends are multiples of s)
            lo, hi = (qmin - zero_point) * scale, (qmax - zero_point) * scale
            x = op.Clip(x, constant(lo, np.float32), constant(hi, np.float32))
        q = op.QuantizeLinear(x, s, zero)
        if info.bits == 8 and (qmin, qmax) != (info.min, info.max):
            # an integer Clip between Q and DQ keeps onnxruntime's QLinearConv fusion; QuantizeLinear
            # itself saturates at the type's ends, so a full-range grid needs none
            q = op.Clip(q, constant(qmin, dtype), constant(qmax, dtype))
        return op.DequantizeLinear(q, s, zero)

    def fake_quant(x, scale: float, qmin: int, qmax: int, zero_point: int):
        return quantize_dequantize(x, scale, qmin, qmax, zero_point)

    def dequantize(codes, scale, axis: int):
        return op.DequantizeLinear(codes, scale, axis=axis)

    def qconv(
        x,
        codes,
        w_scale,
        bias_codes,
        in_scale: float,
        in_qmin: int,
        in_qmax: int,
        stride,
        padding,
        dilation,
        groups: int,
    ):
        x = quantize_dequantize(x, in_scale, in_qmin, in_qmax)
        w = op.DequantizeLinear(codes, w_scale, axis=0)
        b = op.DequantizeLinear(bias_codes, op.Mul(constant(in_scale, np.float32), w_scale), axis=0)
        pads = list(padding) + list(padding)
        return op.Conv(x, w, b, strides=list(stride), pads=pads, dilations=list(dilation), group=groups)

    return {
        torch.ops.qseg.fake_quant.default: fake_quant,
        torch.ops.qseg.dequantize.default: dequantize,
        torch.ops.qseg.qconv.default: qconv,
    }


def _dynamic_shapes(inputs: tuple) -> tuple:
    # batch and every spatial dim dynamic; channels fixed
    auto = torch.export.Dim.AUTO
    return tuple(
        {d: auto for d in range(t.dim()) if d != 1} if isinstance(t, torch.Tensor) else None for t in inputs
    )


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple,
    path: str | os.PathLike,
    weights: str = "int8",
    dynamic: bool = True,
    inference: InferenceSettings | dict | None = None,
) -> Path:
    """Write ``model`` as a QDQ ONNX file (opset 21) and return its path.

    ``model`` is a converted model (``qseg.convert``); a prepared model is
    converted first, and a plain float model exports as float (a baseline).

    Args:
        model: the model to export.
        example_inputs: a tensor or tuple of the model's inputs.
        path: the ``.onnx`` file to write.
        weights: ``"int8"`` (integer codes in the narrowest type that holds them:
            int8, or int16 for wider grids), ``"int4"`` (INT4 initializers, half the
            size, for grids of at most 4 stored bits; runtimes dequantize them and
            run the conv in float), or ``"float"`` (dequantized float weights).
        dynamic: dynamic batch and spatial dimensions (channels stay fixed).
        inference: what running the file needs besides the network (window, overlap,
            input normalization, output reading: :class:`~qseg.runtime.InferenceSettings`,
            or a dict of its fields), stored in ``metadata_props`` for
            :func:`qseg.predict` and ``qseg predict``.

    Raises:
        ExportError: the export failed, a grid does not fit the chosen storage,
            or the written model does not pass ``onnx.checker``'s full check.

    Example:
        >>> import tempfile, onnx, torch, qseg
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> def block(i, o):
        ...     return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        >>> model = nn.Sequential(*block(1, 4), *block(4, 4), nn.Conv2d(4, 1, 1))
        >>> x = torch.rand(1, 1, 8, 8)
        >>> prepared = qseg.prepare(model, "unet-qa6.0-qw0.4", example_inputs=x)
        >>> path = export_onnx(prepared, x, f"{tempfile.mkdtemp()}/net.onnx")  # converts it first
        >>> proto = onnx.load(path)
        >>> sorted({node.op_type for node in proto.graph.node})
        ['Clip', 'Conv', 'DequantizeLinear', 'QuantizeLinear']
        >>> codes = next(i for i in proto.graph.initializer if i.name == "3.codes")  # the middle conv
        >>> onnx.TensorProto.DataType.Name(codes.data_type)
        'INT8'
    """
    import onnx

    from qseg.convert import convert

    if weights not in ("int8", "int4", "float"):
        raise ExportError(f"weights must be one of 'int8', 'int4', 'float'; got {weights!r}")
    settings = check_settings(inference)
    if hasattr(model, "qseg_report") and not hasattr(model, "qseg_convert"):
        model = convert(model)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    model = model.eval()
    path = Path(path)
    try:
        # torch.export in non-strict mode, as prepare captures; torch.onnx.export's own first,
        # strict attempt fails on shape arithmetic it cannot solve (nnU-Net's residual encoders:
        # "Eq(x/8 - ((x/4)//2), 0) cannot be solved"). backed_size_oblivious keeps a batch of
        # one dynamic, as torch.onnx.export does.
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            exported = torch.export.export(
                model, inputs, strict=False, dynamic_shapes=_dynamic_shapes(inputs) if dynamic else None
            )
    except Exception as exc:
        raise ExportError(f"torch.export failed: {type(exc).__name__}: {g.first_line(exc)}") from exc
    try:
        program = torch.onnx.export(
            exported,
            inputs,
            dynamo=True,
            opset_version=OPSET,
            custom_translation_table=_translations(),
            verbose=False,
        )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        program.save(str(raw))
        proto = onnx.load(str(raw))
    if weights == "int4":
        weights_as_int4(proto)
    elif weights == "float":
        weights_as_float(proto)
    if settings is not None:
        onnx.helper.set_model_props(proto, {METADATA_KEY: settings.to_json()})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported model fails onnx.checker: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path
