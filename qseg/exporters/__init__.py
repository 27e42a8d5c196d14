"""Exporters: QDQ ONNX (:func:`export_onnx`), OpenVINO IR (:func:`export_openvino`)
and the parity checks that prove they reproduce the PyTorch model."""

from qseg.exporters.onnx import export_onnx
from qseg.exporters.openvino import export_openvino, openvino_form, openvino_from_onnx, runtime_precisions
from qseg.exporters.parity import ParityResult, check_parity

__all__ = [
    "ParityResult",
    "check_parity",
    "export_onnx",
    "export_openvino",
    "openvino_form",
    "openvino_from_onnx",
    "runtime_precisions",
]
