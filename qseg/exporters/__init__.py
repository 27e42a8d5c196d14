"""Exporters: QDQ ONNX (:func:`export_onnx`), OpenVINO IR (:func:`export_openvino`),
the exact way to run an IR (:func:`compile_openvino`, from :mod:`qseg.runtime`) and
the parity checks that prove the files reproduce the PyTorch model."""

from qseg.exporters.onnx import export_onnx
from qseg.exporters.openvino import export_openvino, openvino_from_onnx
from qseg.exporters.openvino_rewrite import OpenVINOForm, openvino_form
from qseg.exporters.parity import ParityResult, check_parity
from qseg.runtime.openvino import LayerPrecision, compile_openvino, runtime_precisions

__all__ = [
    "LayerPrecision",
    "OpenVINOForm",
    "ParityResult",
    "check_parity",
    "compile_openvino",
    "export_onnx",
    "export_openvino",
    "openvino_form",
    "openvino_from_onnx",
    "runtime_precisions",
]
