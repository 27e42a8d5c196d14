"""Every public function, class and method of qseg has a docstring with an
``Example:`` section holding a doctest (pytest runs them with --doctest-modules,
and the API reference of the docs site is generated from them).

The public API is ``qseg.__all__`` plus the public names of every module of the
package whose dotted path has no component starting with ``_`` and that is not one
of the implementation modules in ``INTERNAL`` (design.md: the graph machinery behind
``qseg.prepare`` and ``qseg.convert``): the names in its ``__all__``, or, without one,
the names it defines that do not start with ``_``. A new module is public unless
it is added to ``INTERNAL``.
Of a public class, the methods, classmethods and staticmethods it defines itself
are public when their name does not start with ``_``; a method that overrides one
of a base class outside qseg (``forward``, ``extra_repr``) is documented by that
base. Properties need a docstring (an example is optional): they read as attributes.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

import qseg

EXAMPLE = re.compile(r"^\s*Examples?:\s*$(?P<body>(?:\n(?:\s*\n)*\s+.*)+)", re.MULTILINE)


# capture, policy, module swap, graph passes, the custom ops and convert's plan and appliers:
# users call prepare and convert
INTERNAL = (
    "qseg.graph",
    "qseg.policy",
    "qseg.swap",
    "qseg.passes",
    "qseg.ops",
    "qseg.convert.plan",
    "qseg.convert.apply_fx",
    "qseg.convert.apply_swap",
)


def public_modules() -> list[str]:
    names = ["qseg"]
    for info in pkgutil.walk_packages(qseg.__path__, prefix="qseg."):
        internal = any(info.name == m or info.name.startswith(m + ".") for m in INTERNAL)
        if not internal and not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def public_names(module) -> list[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == module.__name__
    ]


def _defined_outside_qseg(cls: type, name: str) -> bool:
    return any(name in vars(base) for base in cls.__mro__[1:] if not base.__module__.startswith("qseg"))


def collect() -> dict[str, tuple[object, str]]:
    """qualified name -> (object, kind) for every public function, class, method and property."""
    found: dict[str, tuple[object, str]] = {}
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in public_names(module):
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue  # constants and type aliases are documented where they are defined
            home = f"{obj.__module__}.{obj.__qualname__}"
            if not home.startswith("qseg"):
                continue
            found[home] = (obj, "class" if inspect.isclass(obj) else "function")
            if not inspect.isclass(obj):
                continue
            for attr, raw in vars(obj).items():
                if attr.startswith("_") or _defined_outside_qseg(obj, attr):
                    continue
                if isinstance(raw, property):
                    found[f"{home}.{attr}"] = (raw, "property")
                elif isinstance(raw, (staticmethod, classmethod)) or inspect.isfunction(raw):
                    found[f"{home}.{attr}"] = (getattr(obj, attr), "method")
    return found


def docstring_problem(obj: object, kind: str) -> str:
    doc = inspect.getdoc(obj) or ""
    if not doc.strip():
        return "no docstring"
    if kind == "property":
        return ""
    match = EXAMPLE.search(doc)
    if match is None:
        return "no Example: section"
    if ">>>" not in match.group("body"):
        return "its Example: section holds no doctest (>>>)"
    return ""


PUBLIC = collect()


def test_the_walk_finds_the_public_api():
    # the walk itself must see what users import, or this file tests nothing
    for name in (
        "qseg.prepare.prepare",
        "qseg.convert.convert",
        "qseg.recipes.recipe.Recipe",
        "qseg.cli.main",
    ):
        assert name in PUBLIC
    assert "qseg.quantizers.fixed_point.FixedPoint.forward" not in PUBLIC  # documented by nn.Module
    assert all(not part.startswith("_") for name in PUBLIC for part in name.split(".")[:-1])
    assert not any(name.startswith(INTERNAL) for name in PUBLIC)


def test_the_checker_rejects_what_it_should():
    def bare():
        pass

    def example_without_doctest():
        """Does a thing.

        Example:
            call it
        """

    def good():
        """Does a thing.

        Example:
            >>> 1 + 1
            2
        """

    assert docstring_problem(bare, "function") == "no docstring"
    assert docstring_problem(example_without_doctest, "function").endswith("holds no doctest (>>>)")
    assert docstring_problem(good, "function") == ""
    assert docstring_problem(property(len, doc="A value."), "property") == ""


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_object_has_a_docstring_with_an_example(name):
    obj, kind = PUBLIC[name]
    problem = docstring_problem(obj, kind)
    assert not problem, f"{kind} {name}: {problem}"
