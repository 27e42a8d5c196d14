"""Rewrites of an exported ONNX graph, in place, before it is saved.

``weights_as_int4`` and ``weights_as_float`` change how weights are stored (the
``weights`` argument of :func:`~qseg.exporters.export_onnx`);
``bias_after_float_convs`` keeps onnxruntime from rounding a float bias.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from qseg.errors import ExportError

__all__ = ["bias_after_float_convs", "weights_as_float", "weights_as_int4"]

_BIASED = ("Conv", "ConvTranspose")


def bias_after_float_convs(model: onnx.ModelProto) -> int:
    """Move the float bias of every conv that reads dequantized input and weights,
    and whose output is not requantized right away, into an ``Add`` after it;
    returns how many moved.

    Why: onnxruntime quantizes such a bias to int32 codes at ``input scale x weight
    scale`` (its ``WeightBiasQuantization`` graph transformer), so it adds up to half
    a code less or more than the model does, and a value near a rounding tie of a
    later quantizer moves by one step. As an ``Add``, the bias is added in float as in
    PyTorch. A conv whose output goes straight into a ``QuantizeLinear`` keeps its
    bias: onnxruntime fuses it into one ``QLinearConv`` (2.6 times faster on a U-Net
    under ``int8``), and an integer conv adds its bias in the accumulator anyway.
    OpenVINO reads a conv's bias as an ``Add`` in every case.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {i.name: i for i in model.graph.initializer}
    graph_outputs = {o.name for o in model.graph.output}

    def dequantized(name: str) -> bool:
        producer = producers.get(name)
        return producer is not None and producer.op_type == "DequantizeLinear"

    nodes: list[onnx.NodeProto] = []
    moved = 0
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type not in _BIASED or len(node.input) < 3 or node.input[2] not in inits:
            continue
        bias = numpy_helper.to_array(inits[node.input[2]])
        users = consumers.get(node.output[0], [])
        requantized = users and all(u.op_type == "QuantizeLinear" for u in users)
        if not (dequantized(node.input[0]) and dequantized(node.input[1])) or bias.dtype != np.float32:
            continue
        if requantized and node.output[0] not in graph_outputs:
            continue
        codes = inits.get(producers[node.input[1]].input[0])
        if codes is None:
            continue
        name = f"{node.input[2]}_after_{node.name or node.output[0]}"
        model.graph.initializer.append(
            numpy_helper.from_array(bias.reshape(-1, *([1] * (len(codes.dims) - 2))), name)
        )
        out = node.output[0]
        node.output[0] = f"{out}_without_bias"
        del node.input[2]
        nodes.append(onnx.helper.make_node("Add", [node.output[0], name], [out], name=f"{node.name}_bias"))
        moved += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return moved


def weights_as_int4(model: onnx.ModelProto) -> None:
    """Store integer weight initializers that feed a DequantizeLinear as INT4."""
    feeding = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for init in model.graph.initializer:
        if init.name not in feeding or init.data_type != onnx.TensorProto.INT8:
            continue
        values = numpy_helper.to_array(init)
        if values.min() < -8 or values.max() > 7:
            raise ExportError(
                f"weights {init.name!r} hold codes in [{values.min()}, {values.max()}]; INT4 holds [-8, 7]. "
                "Use weights='int8' (or a recipe with at most 4 stored bits, e.g. Q0.3)"
            )
        packed = onnx.helper.make_tensor(
            init.name, onnx.TensorProto.INT4, values.shape, values.flatten().tolist()
        )
        init.CopyFrom(packed)
    # the exporter's type annotations of those initializers still say INT8
    for info in [v for v in model.graph.value_info if v.name in feeding]:
        model.graph.value_info.remove(info)


def weights_as_float(model: onnx.ModelProto) -> None:
    """Fold DequantizeLinear of integer weight initializers into float initializers."""
    inits = {i.name: i for i in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and node.input[1] in inits:
            codes = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.ndim == 1:
                shape = [1] * codes.ndim
                shape[axis] = -1
                scale = scale.reshape(shape)
            model.graph.initializer.append(numpy_helper.from_array(codes * scale, node.output[0]))
            continue
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = {i for n in model.graph.node for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.checker.check_model(model)
