"""One quantizer of a recipe, by kind and arguments (:class:`QuantizerConfig`).

The kinds a recipe may name, and their keys, are those registered in
:mod:`qseg.quantizers.registry`; every other question about a quantizer (label,
signedness, grid) is answered by the quantizer it builds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qseg.errors import QuantizerError, RecipeError
from qseg.quantizers import Quantizer, get_kind, kind_names
from qseg.recipes._checks import _check_keys, _check_str, _error

__all__ = ["QuantizerConfig"]


@dataclass(frozen=True)
class QuantizerConfig:
    """One quantizer, by kind and keyword arguments: ``{kind: fixed_point, int_bits: 0, frac_bits: 4}``.

    Kinds: those registered with :func:`~qseg.quantizers.register_kind`:
    ``fixed_point`` (:class:`~qseg.quantizers.FixedPoint`), ``power_of_two``, ``int``,
    ``binary``, ``dorefa``, ``ternary``, ``ternary_tanh``; the other keys are the
    quantizer's constructor arguments, checked by building it once. The properties
    below ask the quantizer it builds.

    Example:
        >>> QuantizerConfig("fixed_point", {"int_bits": 0, "frac_bits": 4}).build()
        FixedPoint(int_bits=0, frac_bits=4, signed=True)
    """

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in kind_names():
            raise _error("kind", f"unknown quantizer {self.kind!r}; allowed: {', '.join(kind_names())}")
        spec = get_kind(self.kind)
        _check_keys(self.params, "", spec.keys, spec.required)
        object.__setattr__(self, "params", dict(self.params))
        try:
            self.build()
        except QuantizerError as exc:
            key = next((k for k in self.params if str(exc).startswith(k)), "")
            raise _error(key, str(exc)) from None

    def __hash__(self) -> int:
        # params is a dict: hash its items, so configs can tag grids and key dicts
        return hash((self.kind, tuple(sorted(self.params.items()))))

    @property
    def fixed_grid(self) -> bool:
        """True when the grid does not depend on the data (usable for activations)."""
        return self.build().fixed_grid

    @property
    def activation_grid(self) -> bool:
        """True when the quantizer can stand on activations: a fixed grid, or a
        per-tensor grid set by calibration (``int``).

        Example:
            >>> QuantizerConfig("int", {"bits": 8, "mode": "unsigned"}).activation_grid
            True
            >>> QuantizerConfig("int", {"bits": 8, "channel_axis": 0}).activation_grid
            False
        """
        return self.build().activation_grid

    @property
    def nonlinearity(self) -> bool:
        """True when, on activations, the quantizer is the activation function itself
        (``binary``: BNN's sign; ``ternary_tanh``: TernaryNet's), so that ``prepare``
        removes the ReLU that follows it instead of keeping it.

        Example:
            >>> QuantizerConfig("binary").nonlinearity, QuantizerConfig("fixed_point", {"int_bits": 6, "frac_bits": 0}).nonlinearity
            (True, False)
        """
        return self.build().nonlinearity

    @property
    def signed(self) -> bool:
        """Whether the grid holds negative values."""
        return self.build().signed

    @property
    def label(self) -> str:
        """A short name for tables: ``Q0.4``, ``Q6.0 unsigned``, ``INQ 7-bit``, ``ternary/ch``...

        Example:
            >>> QuantizerConfig("int", {"bits": 8, "channel_axis": 0}).label
            'int8/ch'
            >>> QuantizerConfig("int", {"bits": 4, "mode": "unsigned", "learn_scale": True}).label
            'uint4 LSQ'
        """
        return self.build().label

    def build(self) -> Quantizer:
        """A new quantizer module with these arguments.

        Example:
            >>> import torch
            >>> q = QuantizerConfig("fixed_point", {"int_bits": 0, "frac_bits": 2}).build()
            >>> q(torch.tensor([0.3, -0.9]))
            tensor([ 0.2500, -0.7500])
        """
        return get_kind(self.kind).build(self.params)

    def as_signed(self) -> QuantizerConfig:
        """The same format with a sign (for activations that can be negative).

        Example:
            >>> qa6 = QuantizerConfig("fixed_point", {"int_bits": 6, "frac_bits": 0, "signed": False})
            >>> qa6.label, qa6.as_signed().label
            ('Q6.0 unsigned', 'Q6.0')
            >>> QuantizerConfig("int", {"bits": 8, "mode": "unsigned"}).as_signed().label
            'int8 asym'
        """
        if self.signed:
            return self
        as_signed = get_kind(self.kind).as_signed
        if as_signed is None:
            raise QuantizerError(f"quantizer kind {self.kind!r} has no signed variant of {self.label}")
        return QuantizerConfig(self.kind, as_signed(self.params))

    def to_dict(self) -> dict[str, Any]:
        """The mapping :meth:`from_dict` reads: ``kind`` and the constructor arguments.

        Example:
            >>> QuantizerConfig("ternary", {"channel_axis": 0}).to_dict()
            {'kind': 'ternary', 'channel_axis': 0}
        """
        return {"kind": self.kind, **self.params}

    @classmethod
    def from_dict(cls, data: object, path: str) -> QuantizerConfig:
        """Build and validate a config from a mapping such as ``{kind: ternary, channel_axis: 0}``.

        ``path`` is where the mapping sits in the recipe (``weights``,
        ``overrides[1].activations``); errors name keys below it.

        Example:
            >>> QuantizerConfig.from_dict({"kind": "ternary", "channel_axis": 0}, "weights").build()
            Ternary(channel_axis=0)
            >>> QuantizerConfig.from_dict({"kind": "ternary", "axis": 0}, "weights")
            Traceback (most recent call last):
            ...
            qseg.errors.RecipeError: weights.axis: unknown key; allowed: channel_axis
        """
        if not isinstance(data, Mapping):
            raise _error(
                path, f"expected a quantizer mapping such as {{kind: fixed_point, ...}}, got {data!r}"
            )
        if "kind" not in data:
            raise _error(path, f"missing key 'kind'; one of {', '.join(kind_names())}")
        params = {k: v for k, v in data.items() if k != "kind"}
        try:
            return cls(_check_str("kind", data["kind"]), params)
        except RecipeError as exc:
            raise exc.nested(path) from None

    def __str__(self) -> str:
        return repr(self.build())
