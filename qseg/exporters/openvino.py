"""OpenVINO IR export: qseg's QDQ ONNX, rewritten into the form OpenVINO fuses
(:mod:`qseg.exporters.openvino_rewrite`), converted and saved without FP16 compression.

Running the IR is :func:`qseg.exporters.compile_openvino`'s job
(:mod:`qseg.runtime.openvino`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from qseg.errors import ExportError
from qseg.exporters.openvino_rewrite import openvino_form
from qseg.runtime.settings import METADATA_KEY, InferenceSettings

__all__ = ["export_openvino", "openvino_from_onnx"]


def export_openvino(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple,
    path: str | os.PathLike,
    weights: str = "int8",
    inference: InferenceSettings | dict | None = None,
) -> Path:
    """Write ``model`` as OpenVINO IR (``path`` ``.xml`` plus its ``.bin``) and return the xml path.

    The IR is converted from qseg's QDQ ONNX (:func:`qseg.export_onnx`, same
    ``weights`` choices) by :func:`openvino_from_onnx`; the activation quantizers
    become FakeQuantize ops fused into the int8 convolutions. Weights are saved
    as they are: ``compress_to_fp16=False`` (OpenVINO would otherwise store float
    weights as FP16, silently). ``inference`` settings (as for :func:`qseg.export_onnx`)
    are stored in the IR's ``rt_info``.

    Raises:
        ExportError: ``path`` does not end in ``.xml``, or the export or the
            conversion failed.

    Example:
        >>> import tempfile, torch, qseg
        >>> from torch import nn
        >>> def block(i, o):
        ...     return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        >>> model = nn.Sequential(*block(1, 4), *block(4, 4), nn.Conv2d(4, 1, 1))
        >>> x = torch.randn(1, 1, 16, 16)
        >>> converted = qseg.convert(qseg.prepare(model, example_inputs=x).eval())
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     xml = qseg.export_openvino(converted, x, f"{tmp}/net.xml")
        ...     xml.with_suffix(".bin").exists()
        True
    """
    from qseg.exporters.onnx import export_onnx

    if Path(path).suffix != ".xml":
        raise ExportError(f"an OpenVINO IR path ends in .xml, got {str(path)!r}")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(
            model, example_inputs, Path(tmp) / "model.onnx", weights=weights, inference=inference
        )
        return openvino_from_onnx(onnx_path, path)


def openvino_from_onnx(
    onnx_path: str | os.PathLike, path: str | os.PathLike, fuse_quantizers: bool = True
) -> Path:
    """Convert a QDQ ONNX file written by :func:`qseg.export_onnx` to OpenVINO IR
    (``compress_to_fp16=False``); returns the xml path.

    With ``fuse_quantizers`` (the default) the conversion reads the graph after
    :func:`openvino_form`, which computes the same values in the form OpenVINO
    fuses into its int8 convolutions; ``False`` gives OpenVINO's plain conversion
    of the file (for comparison). INT4 weights get an explicit ``Convert(i4 -> i8)``
    either way, so the plugin runs them in int8 kernels.

    Raises:
        ExportError: ``path`` does not end in ``.xml``, or OpenVINO cannot convert the file.

    Example:
        >>> import tempfile, torch, qseg
        >>> from torch import nn
        >>> def block(i, o):
        ...     return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        >>> model = nn.Sequential(*block(1, 4), *block(4, 4), nn.Conv2d(4, 1, 1))
        >>> x = torch.randn(1, 1, 16, 16)
        >>> converted = qseg.convert(qseg.prepare(model, example_inputs=x).eval())
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     onnx_file = qseg.export_onnx(converted, x, f"{tmp}/net.onnx")
        ...     xml = openvino_from_onnx(onnx_file, f"{tmp}/net.xml")
        ...     [p.precision for p in qseg.exporters.runtime_precisions(xml)]  # first and last stay float
        ['f32', 'u8', 'f32']
    """
    import onnx
    import openvino as ov

    path = Path(path)
    if path.suffix != ".xml":
        raise ExportError(f"an OpenVINO IR path ends in .xml, got {str(path)!r}")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(onnx_path)
        proto = onnx.load(str(onnx_path))
        settings = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)
        if fuse_quantizers:
            openvino_form(proto)
            source = Path(tmp) / "openvino_form.onnx"
            onnx.save(proto, str(source))
        try:
            ir = ov.convert_model(str(source))
        except Exception as exc:
            raise ExportError(f"OpenVINO could not convert {onnx_path}: {exc}") from exc
    _int4_to_int8_at_load(ir)
    if settings is not None:  # the ONNX file's inference settings travel into the IR
        ir.set_rt_info(settings, [METADATA_KEY])
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
