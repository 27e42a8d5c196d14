"""The one exception hierarchy of qseg.

Everything qseg raises on bad input derives from :class:`QsegError`, so a caller
can catch the whole family at once. The subclasses also derive from the built-in
exception a Python user would expect (``ValueError``), so generic handlers keep
working.
"""

from __future__ import annotations

__all__ = [
    "AnnotationError",
    "DataError",
    "ExportError",
    "ModelError",
    "QsegError",
    "QuantizerError",
    "RecipeError",
    "TraceError",
]


class QsegError(Exception):
    """Base class of every error qseg raises on purpose.

    Catch it to handle any of qseg's own errors at once; the subclass says which
    part of the input to fix.

    Example:
        >>> from qseg.quantizers import FixedPoint
        >>> try:
        ...     FixedPoint(int_bits=0, frac_bits=40)
        ... except QsegError as exc:
        ...     print(type(exc).__name__, "-", exc)
        QuantizerError - frac_bits must be in [0, 16], got 40
    """


class QuantizerError(QsegError, ValueError):
    """A quantizer was built with an invalid argument, or asked to do what it cannot.

    The message names the argument and the range it accepts.

    Example:
        >>> from qseg.quantizers import FixedPoint
        >>> FixedPoint(0, 4, overflow="clip")
        Traceback (most recent call last):
        ...
        qseg.errors.QuantizerError: overflow must be one of 'saturate', 'wrap'; got 'clip'
    """


class RecipeError(QsegError, ValueError):
    """A recipe has an unknown key, a value of the wrong type or out of range.

    ``path`` is the key path of the offending value (``overrides[1].weights.frac_bits``),
    ``message`` what is wrong with it; ``str()`` gives both.

    Example:
        >>> from qseg.recipes import Recipe
        >>> bad = {"kind": "fixed_point", "int_bits": 0, "frac_bits": 20}
        >>> try:
        ...     Recipe.from_dict({"name": "w4", "overrides": [{"type": "Linear"}, {"name": "head", "weights": bad}]})
        ... except RecipeError as exc:
        ...     print(exc.path, "|", exc.message)
        overrides[1].weights.frac_bits | frac_bits must be in [0, 16], got 20
    """

    def __init__(self, message: str, path: str = "") -> None:
        self.message = message
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)

    def nested(self, prefix: str) -> RecipeError:
        """The same error seen from a mapping one level up, under the key ``prefix``.

        Loaders of nested sections call it while the error propagates outwards, so
        the final path names the value from the top of the recipe.

        Example:
            >>> str(RecipeError("expected a string", "kind").nested("weights"))
            'weights.kind: expected a string'
            >>> RecipeError("unknown key", "[1].kind").nested("overrides").path
            'overrides[1].kind'
        """
        if not prefix:
            return self
        if not self.path:
            path = prefix
        elif self.path.startswith("["):
            path = f"{prefix}{self.path}"
        else:
            path = f"{prefix}.{self.path}"
        return RecipeError(self.message, path)


class TraceError(QsegError, RuntimeError):
    """The model could not be captured into a graph that reproduces it.

    Example:
        >>> import torch, qseg
        >>> qseg.prepare(torch.nn.Conv2d(1, 2, 3))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qseg.errors.TraceError: prepare needs example_inputs (e.g. example_inputs=torch.randn(1, 1, 200, 200)) ...
    """


class ExportError(QsegError, RuntimeError):
    """A model could not be converted or exported as asked.

    Example:
        >>> import torch, qseg
        >>> qseg.convert(torch.nn.Conv2d(1, 2, 3))
        Traceback (most recent call last):
        ...
        qseg.errors.ExportError: convert takes a model returned by qseg.prepare; got Conv2d
    """


class ModelError(QsegError, ValueError):
    """A bundled reference model was built with an invalid argument, or given an
    input size it cannot take. The message names the argument and what it accepts.

    Example:
        >>> from qseg.models import PaperUNet
        >>> PaperUNet(widths=(8, 16))
        Traceback (most recent call last):
        ...
        qseg.errors.ModelError: widths must be a sequence of 4 positive integers, got (8, 16)
    """


class DataError(QsegError, ValueError):
    """A data set is missing or a training input has the wrong shape, type or values.

    The message says what to install or which argument to fix.

    Example:
        >>> from qseg.data import load_hela
        >>> load_hela(downscale=0)
        Traceback (most recent call last):
        ...
        qseg.errors.DataError: downscale must be an integer >= 1, got 0
    """


class AnnotationError(QsegError, ValueError):
    """Suggestive annotation (:mod:`qseg.active`) was called with an invalid argument: a
    count out of range, an unknown option, labels of the wrong shape. The message names
    the argument.

    Example:
        >>> import torch
        >>> from qseg.active import greedy_cover
        >>> greedy_cover(torch.ones(3, 3), k=0)
        Traceback (most recent call last):
        ...
        qseg.errors.AnnotationError: k must be a positive integer, got 0
    """
