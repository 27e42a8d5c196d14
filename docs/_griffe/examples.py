"""A griffe extension for the API reference: qseg's docstrings head their doctests
``Example:`` (the project's rule), which Google style reads as a generic admonition,
so its ``>>>`` lines would render as nested block quotes. The extension renames
that header to ``Examples:``, the section griffe renders as Python console code."""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADER = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Turns ``Example:`` headers into ``Examples:`` before griffe parses a docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: ARG002
        if obj.docstring is not None:
            obj.docstring.value = _HEADER.sub(r"\1Examples:", obj.docstring.value)
