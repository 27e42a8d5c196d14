"""The one exception hierarchy of qseg.

Everything qseg raises on bad input derives from :class:`QsegError`, so a caller
can catch the whole family at once. The subclasses also derive from the built-in
exception a Python user would expect (``ValueError``), so generic handlers keep
working.
"""

from __future__ import annotations

__all__ = ["ExportError", "QsegError", "QuantizerError", "RecipeError", "TraceError"]


class QsegError(Exception):
    """Base class of every error qseg raises on purpose."""


class QuantizerError(QsegError, ValueError):
    """A quantizer was built with an invalid argument, or asked to do what it cannot.

    The message names the argument and the range it accepts.
    """


class RecipeError(QsegError, ValueError):
    """A recipe has an unknown key, a value of the wrong type or out of range.

    ``path`` is the key path of the offending value (``overrides[1].weights.frac_bits``),
    ``message`` what is wrong with it; ``str()`` gives both.
    """

    def __init__(self, message: str, path: str = "") -> None:
        self.message = message
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)

    def nested(self, prefix: str) -> RecipeError:
        """The same error seen from a mapping one level up, under the key ``prefix``."""
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
    """The model could not be captured into a graph that reproduces it."""


class ExportError(QsegError, RuntimeError):
    """A model could not be converted or exported as asked."""


class ModelError(QsegError, ValueError):
    """A bundled reference model was built with an invalid argument, or given an
    input size it cannot take. The message names the argument and what it accepts."""
