"""Running exported models: OpenVINO compiled exactly (:func:`compile_openvino`),
onnxruntime sessions, sliding-window inference on whole images (:func:`predict`), and the
CPU facts that change what a runtime computes."""

from qseg.runtime.cpu import CpuFeatures, cpu_features
from qseg.runtime.onnxruntime import onnxruntime_ops, onnxruntime_session, run_onnxruntime
from qseg.runtime.openvino import (
    EXACT_CONFIG,
    LayerPrecision,
    compile_openvino,
    run_openvino,
    runtime_precisions,
)
from qseg.runtime.predict import predict
from qseg.runtime.settings import InferenceSettings, read_settings

__all__ = [
    "EXACT_CONFIG",
    "CpuFeatures",
    "InferenceSettings",
    "LayerPrecision",
    "compile_openvino",
    "cpu_features",
    "onnxruntime_ops",
    "onnxruntime_session",
    "predict",
    "read_settings",
    "run_onnxruntime",
    "run_openvino",
    "runtime_precisions",
]
