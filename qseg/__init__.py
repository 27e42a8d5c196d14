"""qseg: quantization-aware training and deployment for PyTorch segmentation models."""

from qseg import errors, quantizers
from qseg.errors import ExportError, ModelError, QsegError, QuantizerError, RecipeError, TraceError

__version__ = "0.1.0"

__all__ = [
    "ExportError",
    "ModelError",
    "QsegError",
    "QuantizerError",
    "RecipeError",
    "TraceError",
    "__version__",
    "errors",
    "quantizers",
]
