"""Running an exported model on OpenVINO's CPU plugin, exactly or fast.

Every place in qseg that runs OpenVINO (parity checks, the executed-precision
listing, the demo, the CLI, the benchmarks) compiles through
:func:`compile_openvino`, so what "exact" means is decided here once.

What a default ``compile_model`` does that breaks parity: on a CPU with bf16
arithmetic (AVX-512 BF16, AMX) the CPU plugin runs every float layer in bf16
(``INFERENCE_PRECISION_HINT`` defaults to bf16 there), so a model whose first
layer is float computes its first activations with 8-bit mantissas, and the
quantizer after it moves values by whole steps. The precision request must be
made at compile time: OpenVINO 2026.4 ignores one stored in the IR's
``rt_info``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qseg.errors import ExportError

__all__ = ["EXACT_CONFIG", "LayerPrecision", "compile_openvino", "run_openvino", "runtime_precisions"]

#: The compile properties :func:`compile_openvino` sets when ``exact``: float layers
#: in f32 (not bf16 / f16), no accuracy-trading optimizations, no on-the-fly int8
#: quantization of the activations of weight-compressed matrix products, and
#: denormals computed as PyTorch computes them (not flushed to zero).
EXACT_CONFIG: dict[str, Any] = {
    "INFERENCE_PRECISION_HINT": "f32",
    "EXECUTION_MODE_HINT": "ACCURACY",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
    "CPU_DENORMALS_OPTIMIZATION": False,
}


def compile_openvino(
    model: str | os.PathLike | Any,
    device: str = "CPU",
    threads: int | None = None,
    exact: bool = True,
    config: dict[str, Any] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
):
    """Compile an IR (``.xml``), an ONNX file or an ``openvino.Model`` for inference.

    With ``exact`` (the default) the float parts of the model run in f32 on every
    CPU kind (:data:`EXACT_CONFIG`), so the outputs reproduce the converted
    PyTorch model; the integer convolutions run as int8 kernels either way.
    ``exact=False`` lets the plugin choose (bf16 float layers on AVX-512 BF16 and
    AMX CPUs): faster there, and no longer equal to PyTorch (docs/export.md
    gives the measured cost). ``threads`` sets ``INFERENCE_NUM_THREADS`` (``None``:
    OpenVINO's choice); ``config`` adds or overrides compile properties.

    ``shapes`` (one shape per model input) compiles a model of dynamic shape for those
    static shapes. Give them whenever the input shape is known: on dynamic shapes
    OpenVINO 2026.4's CPU plugin multiplies the output of an int8 convolution by its
    dequantization scale twice where that output also feeds a residual Add (a
    pre-activation residual block, MONAI's SegResNet), so only static shapes reproduce
    the file. qseg's exporters write shapes dynamic in batch and every spatial dimension.

    Raises:
        ExportError: the file does not exist, OpenVINO cannot read or compile it, or
            ``shapes`` does not fit its inputs.

    Example:
        >>> import tempfile, torch, qseg
        >>> from qseg.exporters import compile_openvino
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     onnx_file = qseg.export_onnx(torch.nn.Conv2d(1, 2, 3), torch.randn(1, 1, 8, 8), f"{tmp}/c.onnx")
        ...     compiled = compile_openvino(onnx_file, threads=1, shapes=[(1, 1, 64, 64)])
        >>> compiled.get_property("INFERENCE_PRECISION_HINT")  # f32 on every CPU kind
        <Type: 'float32'>
        >>> list(compiled.input(0).get_shape())
        [1, 1, 64, 64]
    """
    import openvino as ov

    core = ov.Core()
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ExportError(f"no model file at {str(path)!r}")
        try:
            model = core.read_model(str(path))
        except Exception as exc:
            raise ExportError(f"OpenVINO cannot read {path}: {exc}") from exc
    if shapes is not None:
        _reshape(model, shapes)
    properties: dict[str, Any] = dict(EXACT_CONFIG) if exact else {}
    if threads is not None:
        properties["INFERENCE_NUM_THREADS"] = int(threads)
    properties.update(config or {})
    try:
        return core.compile_model(model, device, properties)
    except Exception as exc:
        raise ExportError(f"OpenVINO cannot compile the model for {device}: {exc}") from exc


def run_openvino(
    path: str | os.PathLike, inputs: tuple, threads: int = 2, exact: bool = True
) -> list[np.ndarray]:
    """Outputs of an IR or ONNX file on OpenVINO's CPU plugin, compiled by
    :func:`compile_openvino` (``exact`` as there).

    ``inputs`` are tensors in the order of the model's inputs; ``threads`` sets
    OpenVINO's inference threads. The model is compiled for the shapes of ``inputs``
    (``shapes`` of :func:`compile_openvino`: on dynamic shapes OpenVINO's CPU plugin
    does not always compute what the file says).

    Example:
        >>> import tempfile, torch, qseg
        >>> conv = torch.nn.Conv2d(1, 2, 3)
        >>> x = torch.randn(1, 1, 8, 8)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     (y,) = run_openvino(qseg.export_onnx(conv, x, f"{tmp}/c.onnx"), (x,), threads=1)
        >>> y.shape, bool(abs(torch.from_numpy(y) - conv(x)).max() < 1e-5)
        ((1, 2, 6, 6), True)
    """
    arrays = [t.detach().cpu().numpy() for t in inputs]
    compiled = compile_openvino(path, threads=threads, exact=exact, shapes=[a.shape for a in arrays])
    result = compiled(arrays)
    return [result[o] for o in compiled.outputs]


def _reshape(model: Any, shapes: Sequence[Sequence[int]]) -> None:
    """Give ``model`` (an ``openvino.Model``) the static ``shapes``, one per input."""
    import openvino as ov

    shapes = [tuple(int(d) for d in shape) for shape in shapes]
    if len(shapes) != len(model.inputs):
        raise ExportError(f"shapes gives {len(shapes)} shapes for a model of {len(model.inputs)} inputs")
    try:
        model.reshape(
            {port: ov.PartialShape(list(shape)) for port, shape in zip(model.inputs, shapes, strict=True)}
        )
    except Exception as exc:
        raise ExportError(f"OpenVINO cannot give the model input shapes {shapes}: {exc}") from exc


@dataclass(frozen=True)
class LayerPrecision:
    """One executed op of the compiled model: its layer type, the precision it ran
    in (``u8``, ``i8``, ``f32``, ``bf16``...) and the kernel (``jit_avx2_I8``...).

    Example:
        >>> LayerPrecision("conv1", "Convolution", "u8", "jit_avx2_I8").precision
        'u8'
    """

    name: str
    layer_type: str
    precision: str
    kernel: str


def runtime_precisions(
    model_path: str | os.PathLike,
    threads: int = 2,
    layer_types: tuple[str, ...] = ("Convolution",),
    exact: bool = True,
) -> list[LayerPrecision]:
    """Compile an IR or ONNX file with :func:`compile_openvino` (``exact`` as there)
    and list the precision and kernel each op of ``layer_types`` executes with
    (from the runtime model's ``rt_info``), so a claim of int8 execution can be
    checked. With ``exact`` the float layers read ``f32`` on every CPU kind;
    ``exact=False`` shows what a default compile runs (``bf16`` on AVX-512 BF16 CPUs).

    Example:
        >>> import tempfile, torch, qseg
        >>> from qseg.exporters import runtime_precisions
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     onnx_file = qseg.export_onnx(torch.nn.Conv2d(1, 2, 3), torch.randn(1, 1, 8, 8), f"{tmp}/c.onnx")
        ...     [(p.layer_type, p.precision) for p in runtime_precisions(onnx_file)]
        [('Convolution', 'f32')]
    """
    compiled = compile_openvino(model_path, threads=threads, exact=exact)
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
