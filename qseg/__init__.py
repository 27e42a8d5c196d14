"""qseg: quantization-aware training and deployment for PyTorch segmentation models."""

from qseg import errors, quantizers, recipes
from qseg.convert import convert
from qseg.errors import ExportError, ModelError, QsegError, QuantizerError, RecipeError, TraceError
from qseg.exporters import export_onnx, export_openvino
from qseg.prepare import prepare
from qseg.recipes import Recipe

__version__ = "0.1.0"

__all__ = [
    "ExportError",
    "ModelError",
    "QsegError",
    "QuantizerError",
    "Recipe",
    "RecipeError",
    "TraceError",
    "__version__",
    "convert",
    "errors",
    "export_onnx",
    "export_openvino",
    "prepare",
    "quantizers",
    "recipes",
]
