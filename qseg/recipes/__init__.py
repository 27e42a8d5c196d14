"""Recipes: what ``qseg.prepare`` quantizes and how.

A recipe is a :class:`Recipe` (a frozen, validated dataclass); ``prepare`` also
accepts a built-in name, a YAML path or a mapping, resolved by :func:`load`.
"""

from qseg.recipes.input_grid import InputGrid
from qseg.recipes.loader import DEFAULT, RecipeLike, builtin_names, list, load
from qseg.recipes.quantizer_config import QuantizerConfig
from qseg.recipes.recipe import INHERIT, KeepFloat, Override, Recipe

__all__ = [
    "DEFAULT",
    "INHERIT",
    "InputGrid",
    "KeepFloat",
    "Override",
    "QuantizerConfig",
    "Recipe",
    "RecipeLike",
    "builtin_names",
    "list",
    "load",
]
