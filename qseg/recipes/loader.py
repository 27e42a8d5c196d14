"""Turns what a user passes as a recipe (a built-in name, a YAML path, a mapping or
a :class:`Recipe`) into a validated :class:`Recipe`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from qseg.errors import RecipeError
from qseg.recipes.recipe import Recipe

__all__ = ["DEFAULT", "RecipeLike", "builtin_names", "list", "load"]

#: The built-in recipe ``prepare`` uses when none is given: paper A's Qa6.0/Qw0.4.
DEFAULT = "unet-qa6.0-qw0.4"

RecipeLike = Recipe | str | os.PathLike | Mapping

_BUILTIN_DIR = Path(__file__).parent


def builtin_names() -> tuple[str, ...]:
    """Names of the recipes that ship with qseg (YAML files beside this module), sorted.

    Example:
        >>> [name for name in builtin_names() if name.startswith("unet-qa")]   # paper A's grids
        ['unet-qa4.0-qw0.2', 'unet-qa6.0-qw0.4', 'unet-qa6.0-qw0.4-exact', 'unet-qa8-qw8-dfp', 'unet-qa8.0-qw0.8', 'unet-qa8.8-qw8.8']
        >>> [name for name in builtin_names() if not name.startswith(("unet-", "fcn-"))]   # any model
        ['int8', 'w4a8']
    """
    return tuple(sorted(p.stem for p in _BUILTIN_DIR.glob("*.yaml")))


def _read_yaml(path: Path) -> Recipe:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path} must hold a mapping of recipe keys, got {type(data).__name__}")
    try:
        return Recipe.from_dict(data)
    except RecipeError as exc:
        raise RecipeError(exc.message, f"{path}: {exc.path}" if exc.path else str(path)) from None


def load(recipe: RecipeLike) -> Recipe:
    """A validated :class:`Recipe` from a built-in name, a YAML path, a mapping or a Recipe.

    Example:
        >>> load("unet-qa6.0-qw0.4").activations.params
        {'int_bits': 6, 'frac_bits': 0, 'signed': False}
    """
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        text = os.fspath(recipe)
        if text in builtin_names():
            return _read_yaml(_BUILTIN_DIR / f"{text}.yaml")
        path = Path(text)
        if path.is_file():
            return _read_yaml(path)
        raise RecipeError(
            f"unknown recipe {text!r}: neither a built-in ({', '.join(builtin_names())}) nor an existing YAML file"
        )
    raise RecipeError(
        f"a recipe is a built-in name, a YAML path, a mapping or a qseg.Recipe; got {type(recipe).__name__}"
    )


def list() -> dict[str, str]:
    """The built-in recipes: name -> description.

    Example:
        >>> "unet-qa6.0-qw0.4" in list()
        True
    """
    return {name: load(name).description for name in builtin_names()}
