"""Parity: the exported model must reproduce the converted PyTorch model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from qseg.convert import FrozenActQuant

__all__ = ["ParityResult", "check_parity", "onnxruntime_ops", "run_onnxruntime", "run_openvino"]


@dataclass(frozen=True)
class ParityResult:
    """One runtime against PyTorch: the largest absolute difference over all
    outputs, the smallest activation step of the model (the tolerance: one
    quantization step), whether the difference is within it, and the share of
    output values that are.

    Integer layers reproduce exactly; a float layer before a quantizer (the first
    layer, kept float) is summed in another order by each runtime, and a value that
    lands on a rounding tie of the next quantizer can move one step there and spread
    from it. ``within_step`` shows how far that went.

    Example:
        >>> result = ParityResult("onnxruntime", max_abs_diff=1.0, step=0.5, within_step=0.999)
        >>> result.ok
        False
        >>> print(result)
        onnxruntime: max |diff| 1 (one step = 0.5) MISMATCH (99.90% of outputs within one step)
    """

    runtime: str
    max_abs_diff: float
    step: float
    within_step: float = 1.0  # share of output values within one step

    @property
    def ok(self) -> bool:
        """Whether the largest difference is within one quantization step.

        Example:
            >>> ParityResult("openvino", max_abs_diff=0.25, step=0.5).ok
            True
        """
        return self.max_abs_diff <= self.step

    def __str__(self) -> str:
        verdict = "ok" if self.ok else f"MISMATCH ({self.within_step:.2%} of outputs within one step)"
        return f"{self.runtime}: max |diff| {self.max_abs_diff:.3g} (one step = {self.step:.3g}) {verdict}"


def _flat(outputs: object) -> list[np.ndarray]:
    flat, _ = tree_flatten(outputs)
    return [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in flat]


def _inputs(example_inputs: torch.Tensor | tuple) -> tuple:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def run_onnxruntime(path: str | os.PathLike, inputs: tuple, threads: int = 2) -> list[np.ndarray]:
    """Outputs of an ONNX file in onnxruntime's CPU provider.

    ``inputs`` are tensors in the order of the file's inputs; ``threads`` sets
    onnxruntime's intra-op threads.

    Example:
        >>> import tempfile, onnx, torch
        >>> from onnx import TensorProto, helper
        >>> nodes = [
        ...     helper.make_node("QuantizeLinear", ["x", "s"], ["q"]),  # uint8 codes, zero point 0
        ...     helper.make_node("DequantizeLinear", ["q", "s"], ["y"]),
        ... ]
        >>> x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [4]) for name in "xy")
        >>> scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.5])
        >>> graph = helper.make_graph(nodes, "qdq", [x], [y], [scale])
        >>> path = f"{tempfile.mkdtemp()}/qdq.onnx"
        >>> onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
        >>> run_onnxruntime(path, (torch.tensor([-1.0, 0.8, 1.25, 200.0]),))  # onto 0.5 * [0, 255]
        [array([  0. ,   1. ,   1. , 127.5], dtype=float32)]
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feed)


def run_openvino(path: str | os.PathLike, inputs: tuple, threads: int = 2) -> list[np.ndarray]:
    """Outputs of an IR or ONNX file on OpenVINO's CPU plugin.

    ``inputs`` are tensors in the order of the model's inputs; ``threads`` sets
    OpenVINO's inference threads.

    Example:
        >>> import tempfile, onnx, torch
        >>> from onnx import TensorProto, helper
        >>> nodes = [
        ...     helper.make_node("QuantizeLinear", ["x", "s"], ["q"]),  # uint8 codes, zero point 0
        ...     helper.make_node("DequantizeLinear", ["q", "s"], ["y"]),
        ... ]
        >>> x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [4]) for name in "xy")
        >>> scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.5])
        >>> graph = helper.make_graph(nodes, "qdq", [x], [y], [scale])
        >>> path = f"{tempfile.mkdtemp()}/qdq.onnx"
        >>> onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
        >>> run_openvino(path, (torch.tensor([-1.0, 0.8, 1.25, 200.0]),))  # onto 0.5 * [0, 255]
        [array([  0. ,   1. ,   1. , 127.5], dtype=float32)]
    """
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": threads})
    result = compiled([t.numpy() for t in inputs])
    return [result[o] for o in compiled.outputs]


def _step(model: nn.Module) -> float:
    steps = [m.scale for m in model.modules() if isinstance(m, FrozenActQuant)]
    return min(steps) if steps else 1e-5


def check_parity(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple,
    onnx_path: str | os.PathLike | None = None,
    ir_path: str | os.PathLike | None = None,
    threads: int = 2,
) -> list[ParityResult]:
    """Compare the converted PyTorch ``model`` with its ONNX file in onnxruntime
    and its IR in OpenVINO on ``example_inputs``; a runtime whose path is ``None``
    is skipped. The tolerance is one step of the model's finest activation grid.

    Example:
        >>> import tempfile, torch, qseg
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> def block(i, o):
        ...     return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        >>> model = nn.Sequential(*block(1, 4), *block(4, 4), nn.Conv2d(4, 1, 1))
        >>> x = torch.rand(1, 1, 8, 8)
        >>> converted = qseg.convert(qseg.prepare(model, "unet-qa6.0-qw0.4", example_inputs=x))
        >>> onnx_file = qseg.export_onnx(converted, x, f"{tempfile.mkdtemp()}/net.onnx")
        >>> xml = qseg.exporters.openvino_from_onnx(onnx_file, onnx_file.with_suffix(".xml"))
        >>> [(r.runtime, r.ok) for r in check_parity(converted, x, onnx_path=onnx_file, ir_path=xml)]
        [('onnxruntime', True), ('openvino', True)]
    """
    inputs = _inputs(example_inputs)
    with torch.no_grad():
        expected = _flat(model.eval()(*inputs))
    step = _step(model)
    results = []
    for name, path, run in (("onnxruntime", onnx_path, run_onnxruntime), ("openvino", ir_path, run_openvino)):
        if path is None:
            continue
        got = run(Path(path), inputs, threads)
        diffs = [np.abs(e - o).ravel() for e, o in zip(expected, got, strict=True)]
        every = np.concatenate(diffs) if diffs else np.zeros(0)
        diff = float(every.max()) if every.size else 0.0
        within = float((every <= step).mean()) if every.size else 1.0
        results.append(ParityResult(name, diff, step, within))
    return results


def onnxruntime_ops(path: str | os.PathLike) -> dict[str, int]:
    """How many ops of each type onnxruntime executes after its graph optimizations
    (``QLinearConv`` counts the convs it fused into integer kernels).

    Example:
        >>> import tempfile, torch, qseg
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> def block(i, o):
        ...     return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        >>> model = nn.Sequential(*block(1, 4), *block(4, 4), nn.Conv2d(4, 1, 1))
        >>> x = torch.rand(1, 1, 8, 8)
        >>> converted = qseg.convert(qseg.prepare(model, "unet-qa6.0-qw0.4", example_inputs=x))
        >>> onnx_file = qseg.export_onnx(converted, x, f"{tempfile.mkdtemp()}/net.onnx")
        >>> ops = onnxruntime_ops(onnx_file)
        >>> ops["QLinearConv"], ops["Conv"]  # the middle conv runs in int8; first and last stay float
        (1, 2)
    """
    import tempfile
    from collections import Counter

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return dict(Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node))
