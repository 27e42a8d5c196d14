"""Running exported models: OpenVINO compiled exactly (:func:`compile_openvino`),
onnxruntime sessions, and the CPU facts that change what a runtime computes."""

from qseg.runtime.cpu import CpuFeatures, cpu_features
from qseg.runtime.onnxruntime import onnxruntime_ops, onnxruntime_session, run_onnxruntime
from qseg.runtime.openvino import (
    EXACT_CONFIG,
    LayerPrecision,
    compile_openvino,
    run_openvino,
    runtime_precisions,
)

__all__ = [
    "EXACT_CONFIG",
    "CpuFeatures",
    "LayerPrecision",
    "compile_openvino",
    "cpu_features",
    "onnxruntime_ops",
    "onnxruntime_session",
    "run_onnxruntime",
    "run_openvino",
    "runtime_precisions",
]
