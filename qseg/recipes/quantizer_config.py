"""One quantizer of a recipe, by kind and arguments (:class:`QuantizerConfig`), and the
table of quantizer kinds a recipe may name (``KINDS``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qseg.errors import QuantizerError, RecipeError
from qseg.quantizers import Binary, DoReFa, FixedPoint, PowerOfTwo, Quantizer, Ternary, TernaryTanh, Uniform
from qseg.recipes._checks import _check_keys, _check_str, _error

__all__ = ["KINDS", "QuantizerConfig"]


@dataclass(frozen=True)
class _Kind:
    cls: type[Quantizer]
    required: tuple[str, ...]
    optional: tuple[str, ...]
    # its grid is fixed (not a statistic of the tensor), so tensors that meet at
    # a concatenation or an addition share it: usable for activations
    fixed_grid: bool
    # on activations it is the nonlinearity itself (BNN's sign, TernaryNet's ternary
    # tanh): its negative level carries information that a ReLU after it would erase
    nonlinearity: bool = False
    # usable on activations although its grid is data-dependent: each quantizer's range
    # is set by calibration, and a layer reading tensors of two such grids gets its own
    calibrated: bool = False


KINDS: dict[str, _Kind] = {
    "fixed_point": _Kind(FixedPoint, ("int_bits", "frac_bits"), ("signed", "overflow", "ste"), True),
    "power_of_two": _Kind(PowerOfTwo, ("bits",), (), False),
    "int": _Kind(
        Uniform,
        ("bits",),
        ("mode", "channel_axis", "learn_scale", "power_of_two_scale"),
        False,
        calibrated=True,
    ),
    "binary": _Kind(Binary, (), ("scale",), True, nonlinearity=True),
    "dorefa": _Kind(DoReFa, ("bits",), (), False),
    "ternary": _Kind(Ternary, (), ("channel_axis",), False),
    "ternary_tanh": _Kind(TernaryTanh, (), ("beta_start", "beta_end"), True, nonlinearity=True),
}


@dataclass(frozen=True)
class QuantizerConfig:
    """One quantizer, by kind and keyword arguments: ``{kind: fixed_point, int_bits: 0, frac_bits: 4}``.

    Kinds: ``fixed_point`` (:class:`~qseg.quantizers.FixedPoint`), ``power_of_two``,
    ``binary``, ``dorefa``, ``ternary``, ``ternary_tanh``; the other keys are the
    quantizer's constructor arguments, checked by building it once.

    Example:
        >>> QuantizerConfig("fixed_point", {"int_bits": 0, "frac_bits": 4}).build()
        FixedPoint(int_bits=0, frac_bits=4, signed=True)
    """

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise _error("kind", f"unknown quantizer {self.kind!r}; allowed: {', '.join(KINDS)}")
        spec = KINDS[self.kind]
        _check_keys(self.params, "", spec.required + spec.optional, spec.required)
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
        return KINDS[self.kind].fixed_grid and self.params.get("scale", "none") == "none"

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
        if KINDS[self.kind].calibrated:
            return self.params.get("channel_axis") is None
        return self.fixed_grid

    @property
    def nonlinearity(self) -> bool:
        """True when, on activations, the quantizer is the activation function itself
        (``binary``: BNN's sign; ``ternary_tanh``: TernaryNet's), so that ``prepare``
        removes the ReLU that follows it instead of keeping it.

        Example:
            >>> QuantizerConfig("binary").nonlinearity, QuantizerConfig("fixed_point", {"int_bits": 6, "frac_bits": 0}).nonlinearity
            (True, False)
        """
        return KINDS[self.kind].nonlinearity

    @property
    def signed(self) -> bool:
        """Whether the grid holds negative values."""
        if self.kind == "int":
            return self.params.get("mode", "symmetric") != "unsigned"
        return self.params.get("signed", True) if self.kind == "fixed_point" else True

    @property
    def label(self) -> str:
        """A short name for tables: ``Q0.4``, ``Q6.0 unsigned``, ``INQ 7-bit``, ``ternary/ch``...

        Example:
            >>> QuantizerConfig("int", {"bits": 8, "channel_axis": 0}).label
            'int8/ch'
            >>> QuantizerConfig("int", {"bits": 4, "mode": "unsigned", "learn_scale": True}).label
            'uint4 LSQ'
        """
        p = self.params
        if self.kind == "fixed_point":
            text = f"Q{p['int_bits']}.{p['frac_bits']}"
            text += "" if p.get("signed", True) else " unsigned"
            return text + (" wrap" if p.get("overflow") == "wrap" else "")
        if self.kind == "int":
            return self.build().label
        if self.kind == "power_of_two":
            return f"INQ {p['bits']}-bit"
        if self.kind == "dorefa":
            return f"DoReFa {p['bits']}-bit"
        if self.kind == "binary":
            return "binary x mean" if p.get("scale") == "mean" else "binary"
        if self.kind == "ternary":
            return "ternary" if p.get("channel_axis") is None else f"ternary/axis {p['channel_axis']}"
        return "ternary tanh"

    def build(self) -> Quantizer:
        """A new quantizer module with these arguments.

        Example:
            >>> import torch
            >>> q = QuantizerConfig("fixed_point", {"int_bits": 0, "frac_bits": 2}).build()
            >>> q(torch.tensor([0.3, -0.9]))
            tensor([ 0.2500, -0.7500])
        """
        return KINDS[self.kind].cls(**self.params)

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
        if self.kind == "int":  # an unsigned grid with room below 0: a zero point
            return QuantizerConfig(self.kind, {**self.params, "mode": "asymmetric"})
        return QuantizerConfig(self.kind, {**self.params, "signed": True})

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
            raise _error(path, f"missing key 'kind'; one of {', '.join(KINDS)}")
        params = {k: v for k, v in data.items() if k != "kind"}
        try:
            return cls(_check_str("kind", data["kind"]), params)
        except RecipeError as exc:
            raise exc.nested(path) from None

    def __str__(self) -> str:
        return repr(self.build())
