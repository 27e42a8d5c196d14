"""The quantizer kinds a recipe may name: ``{kind: fixed_point, int_bits: 0, frac_bits: 4}``.

A *kind* ties a recipe name to a :class:`~qseg.quantizers.Quantizer` class and its
recipe schema (the keys a recipe may give, which are the constructor's keyword
arguments). Everything else a kind's quantizer does lives on its class: the label
in tables, whether its grid is signed, fixed or calibrated, whether it is an
activation function, how it freezes for deployment and what a training loop does
for it (see :class:`~qseg.quantizers.Quantizer`). So adding a kind is one class and
one :func:`register_kind` call next to it; recipes, ``prepare``, ``convert``,
``training_hooks`` and the plots then handle it with no other edit.

The built-in kinds register in the order recipes list them in their errors:
``fixed_point``, ``power_of_two``, ``int``, ``binary``, ``dorefa``, ``ternary``,
``ternary_tanh``.

Example:
    >>> from qseg.quantizers.registry import get_kind, kind_names
    >>> kind_names()
    ('fixed_point', 'power_of_two', 'int', 'binary', 'dorefa', 'ternary', 'ternary_tanh')
    >>> get_kind("int").cls.__name__, get_kind("int").required
    ('Uniform', ('bits',))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from qseg.errors import QuantizerError
from qseg.quantizers.base import Quantizer

__all__ = ["QuantizerKind", "get_kind", "kind_names", "register_kind", "unregister_kind"]

Params = Mapping[str, Any]


@dataclass(frozen=True)
class QuantizerKind:
    """One recipe kind: its name, its class and the keys a recipe may give it.

    Attributes:
        name: what recipes write after ``kind:``.
        cls: the quantizer class; a recipe's other keys are its keyword arguments.
        required: keys a recipe must give, in the order error messages list them.
        optional: keys a recipe may give (the constructor's defaults apply otherwise).
        as_signed: the arguments of the same format with a sign, from those of an
            unsigned one (``prepare`` uses it for activations that can be negative);
            ``None`` for kinds whose grids are always signed.

    Example:
        >>> from qseg.quantizers.registry import get_kind
        >>> fp = get_kind("fixed_point")
        >>> fp.keys
        ('int_bits', 'frac_bits', 'signed', 'overflow', 'ste')
        >>> fp.build({"int_bits": 6, "frac_bits": 0, "signed": False}).label
        'Q6.0 unsigned'
        >>> fp.as_signed({"int_bits": 6, "frac_bits": 0, "signed": False})
        {'int_bits': 6, 'frac_bits': 0, 'signed': True}
    """

    name: str
    cls: type[Quantizer]
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    as_signed: Callable[[Params], dict[str, Any]] | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key a recipe may give: the required ones, then the optional ones."""
        return self.required + self.optional

    def build(self, params: Params) -> Quantizer:
        """A new quantizer of this kind with these arguments (checked by the class, which
        raises :class:`~qseg.errors.QuantizerError` naming a bad argument).

        Example:
            >>> from qseg.quantizers.registry import get_kind
            >>> get_kind("int").build({"bits": 8, "mode": "unsigned"})
            Uniform(bits=8, mode='unsigned')
            >>> get_kind("int").build({"bits": 1})
            Traceback (most recent call last):
            ...
            qseg.errors.QuantizerError: bits must be in [2, 16], got 1
        """
        return self.cls(**params)


_KINDS: dict[str, QuantizerKind] = {}


def register_kind(
    name: str,
    cls: type[Quantizer],
    *,
    required: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
    as_signed: Callable[[Params], dict[str, Any]] | None = None,
) -> QuantizerKind:
    """Make ``name`` a quantizer kind recipes may use; returns its declaration.

    Call it once, next to the class (a module's import registers it). The class
    answers everything else through the :class:`~qseg.quantizers.Quantizer` methods
    it overrides.

    Raises:
        QuantizerError: ``name`` is taken, not an identifier, ``cls`` is not a
            Quantizer subclass, or a key is listed twice.

    Example:
        >>> from qseg.quantizers import FixedPoint
        >>> kind = register_kind("q4", FixedPoint, required=("int_bits", "frac_bits"))
        >>> kind.build({"int_bits": 0, "frac_bits": 4})
        FixedPoint(int_bits=0, frac_bits=4, signed=True)
        >>> register_kind("q4", FixedPoint)
        Traceback (most recent call last):
        ...
        qseg.errors.QuantizerError: quantizer kind 'q4' is registered already (FixedPoint); unregister_kind('q4') first
        >>> unregister_kind("q4")
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise QuantizerError(
            f"a quantizer kind's name must be an identifier such as 'fixed_point', got {name!r}"
        )
    if name in _KINDS:
        raise QuantizerError(
            f"quantizer kind {name!r} is registered already ({_KINDS[name].cls.__name__}); "
            f"unregister_kind({name!r}) first"
        )
    if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
        raise QuantizerError(
            f"quantizer kind {name!r}: {cls!r} is not a subclass of qseg.quantizers.Quantizer"
        )
    keys = tuple(required) + tuple(optional)
    if len(set(keys)) != len(keys) or "kind" in keys:
        raise QuantizerError(f"quantizer kind {name!r}: keys must be distinct and not 'kind', got {keys}")
    kind = QuantizerKind(name, cls, tuple(required), tuple(optional), as_signed)
    _KINDS[name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove a kind registered with :func:`register_kind` (recipes naming it then fail).

    Raises:
        QuantizerError: no kind has that name.

    Example:
        >>> unregister_kind("no_such_kind")
        Traceback (most recent call last):
        ...
        qseg.errors.QuantizerError: no quantizer kind 'no_such_kind' is registered
    """
    if name not in _KINDS:
        raise QuantizerError(f"no quantizer kind {name!r} is registered")
    del _KINDS[name]


def get_kind(name: str) -> QuantizerKind:
    """The declaration of kind ``name``.

    Raises:
        QuantizerError: no kind has that name; the message lists the registered ones.

    Example:
        >>> get_kind("ternary").optional
        ('channel_axis',)
    """
    try:
        return _KINDS[name]
    except (KeyError, TypeError):
        raise QuantizerError(f"unknown quantizer {name!r}; allowed: {', '.join(_KINDS)}") from None


def kind_names() -> tuple[str, ...]:
    """The registered kinds, in the order they registered.

    Example:
        >>> "int" in kind_names()
        True
    """
    return tuple(_KINDS)
