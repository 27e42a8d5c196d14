"""qseg: quantization-aware training and deployment for PyTorch segmentation models."""

from qseg import active, errors, inq, quantizers, recipes
from qseg.calibrate import CalibrationReport, calibrate
from qseg.convert import convert
from qseg.errors import (
    AnnotationError,
    DataError,
    ExportError,
    ModelError,
    QsegError,
    QuantizerError,
    RecipeError,
    TraceError,
)
from qseg.exporters import export_onnx, export_openvino
from qseg.hooks import TrainingHooks, training_hooks
from qseg.prepare import prepare
from qseg.recipes import Recipe
from qseg.runtime.predict import predict

__version__ = "0.1.0"

__all__ = [
    "AnnotationError",
    "CalibrationReport",
    "DataError",
    "ExportError",
    "ModelError",
    "QsegError",
    "QuantizerError",
    "Recipe",
    "RecipeError",
    "TraceError",
    "TrainingHooks",
    "__version__",
    "active",
    "calibrate",
    "convert",
    "errors",
    "export_onnx",
    "export_openvino",
    "inq",
    "predict",
    "prepare",
    "quantizers",
    "recipes",
    "training_hooks",
]
