"""OpenVINO IR export, and what the CPU plugin really executes."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qseg.errors import ExportError

__all__ = ["LayerPrecision", "export_openvino", "openvino_from_onnx", "runtime_precisions"]


def export_openvino(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple,
    path: str | os.PathLike,
    weights: str = "int8",
) -> Path:
    """Write ``model`` as OpenVINO IR (``path`` ``.xml`` plus its ``.bin``) and return the xml path.

    The IR is converted from qseg's QDQ ONNX (:func:`qseg.export_onnx`, same
    ``weights`` choices); the QDQ pairs become FakeQuantize ops that the CPU
    plugin executes as int8 convolutions. Weights are saved as they are:
    ``compress_to_fp16=False`` (OpenVINO would otherwise store float weights as
    FP16, silently).
    """
    from qseg.exporters.onnx import export_onnx

    if Path(path).suffix != ".xml":
        raise ExportError(f"an OpenVINO IR path ends in .xml, got {str(path)!r}")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(model, example_inputs, Path(tmp) / "model.onnx", weights=weights)
        return openvino_from_onnx(onnx_path, path)


def openvino_from_onnx(onnx_path: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Convert a QDQ ONNX file written by :func:`qseg.export_onnx` to OpenVINO IR
    (``compress_to_fp16=False``); returns the xml path."""
    import openvino as ov

    path = Path(path)
    if path.suffix != ".xml":
        raise ExportError(f"an OpenVINO IR path ends in .xml, got {str(path)!r}")
    try:
        ir = ov.convert_model(str(onnx_path))
    except Exception as exc:
        raise ExportError(f"OpenVINO could not convert {onnx_path}: {exc}") from exc
    _int4_to_int8_at_load(ir)
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ir, str(path), compress_to_fp16=False)
    return path


def _int4_to_int8_at_load(model) -> int:
    """Put an explicit ``Convert(i4 -> i8)`` after every INT4 constant, in place.

    Measured (benchmarks/deploy.py): the CPU plugin decompresses INT4 weights to f32 and
    runs those convs in f32; with the Convert in the graph it widens them to i8 when it
    loads the model and runs u8 x i8 kernels, while the .bin keeps the INT4 bytes.
    """
    import openvino as ov
    import openvino.opset13 as ops

    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i4:
            targets = list(op.output(0).get_target_inputs())
            widened = ops.convert(op, "i8")
            for target in targets:
                target.replace_source_output(widened.output(0))
            count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count


@dataclass(frozen=True)
class LayerPrecision:
    """One executed op of the compiled model: its layer type, the precision it ran
    in (``u8``, ``i8``, ``f32``...) and the kernel (``jit_avx2_I8``...)."""

    name: str
    layer_type: str
    precision: str
    kernel: str


def runtime_precisions(
    model_path: str | os.PathLike, threads: int = 2, layer_types: tuple[str, ...] = ("Convolution",)
) -> list[LayerPrecision]:
    """Compile an IR or ONNX file on the OpenVINO CPU plugin and list the precision
    and kernel each op of ``layer_types`` executes with (from the runtime model's
    ``rt_info``), so a claim of int8 execution can be checked."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(model_path)), "CPU", {"INFERENCE_NUM_THREADS": threads})
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer_type = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if layer_type in layer_types:
            out.append(
                LayerPrecision(
                    op.get_friendly_name(),
                    layer_type,
                    info["runtimePrecision"].astype(str),
                    info["primitiveType"].astype(str),
                )
            )
    return out
