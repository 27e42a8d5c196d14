"""Rewrites of an exported ONNX graph, in place, before it is saved.

``weights_as_int4`` and ``weights_as_float`` change how weights are stored (the
``weights`` argument of :func:`~qseg.exporters.export_onnx`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from qseg.errors import ExportError

if TYPE_CHECKING:
    import onnx

__all__ = ["weights_as_float", "weights_as_int4"]


def weights_as_int4(model: onnx.ModelProto) -> None:
    """Store integer weight initializers that feed a DequantizeLinear as INT4.

    Raises:
        ExportError: a weight holds codes outside INT4's [-8, 7].

    Example:
        >>> import numpy as np
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> codes = numpy_helper.from_array(np.array([[7], [-8]], dtype=np.int8), "w")
        >>> scale = numpy_helper.from_array(np.array(0.25, dtype=np.float32), "s")
        >>> dq = helper.make_node("DequantizeLinear", ["w", "s"], ["y"])
        >>> out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1])
        >>> model = helper.make_model(helper.make_graph([dq], "w", [], [out], [codes, scale]))
        >>> weights_as_int4(model)
        >>> TensorProto.DataType.Name(model.graph.initializer[0].data_type)
        'INT4'
    """
    import onnx
    from onnx import numpy_helper

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
    """Fold DequantizeLinear of integer weight initializers into float initializers.

    Example:
        >>> import numpy as np
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> codes = numpy_helper.from_array(np.array([[3], [-2]], dtype=np.int8), "w")
        >>> scale = numpy_helper.from_array(np.array(0.5, dtype=np.float32), "s")
        >>> nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"]), helper.make_node("MatMul", ["x", "wf"], ["y"])]
        >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
        >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])
        >>> model = helper.make_model(helper.make_graph(nodes, "net", [x], [y], [codes, scale]))
        >>> weights_as_float(model)
        >>> [n.op_type for n in model.graph.node], numpy_helper.to_array(model.graph.initializer[0]).ravel().tolist()
        (['MatMul'], [1.5, -1.0])
    """
    import onnx
    from onnx import numpy_helper

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
