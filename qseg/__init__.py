"""qseg: quantization-aware training and deployment for PyTorch segmentation models."""

from qseg import errors, quantizers
from qseg.errors import ExportError, QsegError, QuantizerError, RecipeError, TraceError

__version__ = "0.1.0"

__all__ = [
    "ExportError",
    "QsegError",
    "QuantizerError",
    "RecipeError",
    "TraceError",
    "__version__",
    "errors",
    "quantizers",
]
