"""Running an exported ONNX file on onnxruntime's CPU provider."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["onnxruntime_ops", "onnxruntime_session", "run_onnxruntime"]


def onnxruntime_session(path: str | os.PathLike, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on the CPU provider; ``threads`` sets its
    intra-op threads (``None``: onnxruntime's choice).

    onnxruntime runs float ops in float32 on every CPU kind, so it needs no
    precision pinning (compare :func:`qseg.exporters.compile_openvino`).

    Example:
        >>> import tempfile, torch, qseg
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     onnx_file = qseg.export_onnx(torch.nn.Conv2d(1, 2, 3), torch.randn(1, 1, 8, 8), f"{tmp}/c.onnx")
        ...     [i.name for i in onnxruntime_session(onnx_file, threads=1).get_inputs()]
        ['input']
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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
    session = onnxruntime_session(path, threads)
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feed)


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
