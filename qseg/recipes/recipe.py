"""The :class:`Recipe`: what to quantize, how, and what to keep in float.

A recipe is a frozen, validated dataclass. It is built from a plain mapping (a
YAML file's content) by :meth:`Recipe.from_dict`, which names the key path of
every error: an unknown key, a value of the wrong type or out of range raises
:class:`~qseg.errors.RecipeError` such as
``overrides[1].weights.frac_bits: frac_bits must be in [0, 16], got 20``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qseg.errors import QuantizerError, RecipeError
from qseg.quantizers import Binary, DoReFa, FixedPoint, PowerOfTwo, Quantizer, Ternary, TernaryTanh

__all__ = ["INHERIT", "KeepFloat", "Override", "QuantizerConfig", "Recipe"]


@dataclass(frozen=True)
class _Kind:
    cls: type[Quantizer]
    required: tuple[str, ...]
    optional: tuple[str, ...]
    # its grid is fixed (not a statistic of the tensor), so tensors that meet at
    # a concatenation or an addition share it: usable for activations
    fixed_grid: bool


KINDS: dict[str, _Kind] = {
    "fixed_point": _Kind(FixedPoint, ("int_bits", "frac_bits"), ("signed", "overflow", "ste"), True),
    "power_of_two": _Kind(PowerOfTwo, ("bits",), (), False),
    "binary": _Kind(Binary, (), ("scale",), True),
    "dorefa": _Kind(DoReFa, ("bits",), (), False),
    "ternary": _Kind(Ternary, (), ("channel_axis",), False),
    "ternary_tanh": _Kind(TernaryTanh, (), ("beta_start", "beta_end"), True),
}


def _error(path: str, message: str) -> RecipeError:
    return RecipeError(message, path)


def _check_keys(data: Mapping[str, Any], path: str, allowed: Sequence[str], required: Sequence[str] = ()):
    if not isinstance(data, Mapping):
        raise _error(path, f"expected a mapping, got {type(data).__name__} {data!r}")
    for key in data:
        if key not in allowed:
            raise _error(f"{path}.{key}" if path else str(key), f"unknown key; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in data:
            raise _error(path, f"missing key {key!r}")


def _check_bool(path: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _error(path, f"expected true or false, got {value!r}")
    return value


def _check_str(path: str, value: object) -> str:
    if not isinstance(value, str):
        raise _error(path, f"expected a string, got {value!r}")
    return value


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
    def signed(self) -> bool:
        """Whether the grid holds negative values."""
        return self.params.get("signed", True) if self.kind == "fixed_point" else True

    @property
    def label(self) -> str:
        """A short name for tables: ``Q0.4``, ``Q6.0 unsigned``, ``INQ 7-bit``, ``ternary/ch``..."""
        p = self.params
        if self.kind == "fixed_point":
            text = f"Q{p['int_bits']}.{p['frac_bits']}"
            text += "" if p.get("signed", True) else " unsigned"
            return text + (" wrap" if p.get("overflow") == "wrap" else "")
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
        """A new quantizer module with these arguments."""
        return KINDS[self.kind].cls(**self.params)

    def as_signed(self) -> QuantizerConfig:
        """The same format with a sign (for activations that can be negative)."""
        if self.signed:
            return self
        return QuantizerConfig(self.kind, {**self.params, "signed": True})

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params}

    @classmethod
    def from_dict(cls, data: object, path: str) -> QuantizerConfig:
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


class _Inherit:
    """Marks an override field that was not given: the recipe's default applies."""

    _instance: _Inherit | None = None

    def __new__(cls) -> _Inherit:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "INHERIT"

    def __reduce__(self) -> str:
        return "INHERIT"

    def __deepcopy__(self, memo: dict) -> _Inherit:
        return self


#: An override field left out: the recipe's default applies to the matched layers.
INHERIT = _Inherit()

WEIGHTED_TYPES = (
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Linear",
)


@dataclass(frozen=True)
class Override:
    """Per-layer exception to the recipe's defaults.

    A layer matches when every selector given matches: ``name`` (a glob over the
    module's dotted name, ``decoder.*``), ``regex`` (``re.fullmatch`` on the name),
    ``type`` (the class name, ``ConvTranspose2d``). ``weights`` and
    ``activations`` then replace the recipe's quantizers for that layer (``None``:
    keep it in float); a field left out keeps the recipe's choice. Later
    overrides win over earlier ones, and any override wins over the first/last
    layer rule.

    Example:
        >>> Override(type="ConvTranspose2d", weights=None).matches("up1", "ConvTranspose2d")
        True
    """

    name: str | None = None
    regex: str | None = None
    type: str | None = None
    weights: QuantizerConfig | _Inherit | None = INHERIT
    activations: QuantizerConfig | _Inherit | None = INHERIT

    def __post_init__(self) -> None:
        if self.name is None and self.regex is None and self.type is None:
            raise _error("", "an override needs at least one of name, regex, type")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise _error("regex", f"not a regular expression ({exc}): {self.regex!r}") from None
        if self.activations not in (None, INHERIT) and not self.activations.fixed_grid:
            raise _error("activations", _ACT_KIND_MESSAGE)

    def matches(self, layer_name: str, type_name: str) -> bool:
        """Whether this override applies to the layer ``layer_name`` of class ``type_name``."""
        if self.name is not None and not fnmatch.fnmatchcase(layer_name, self.name):
            return False
        if self.regex is not None and re.fullmatch(self.regex, layer_name) is None:
            return False
        return self.type is None or self.type == type_name

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k in ("name", "regex", "type") if (v := getattr(self, k)) is not None}
        for key in ("weights", "activations"):
            value = getattr(self, key)
            if value is not INHERIT:
                out[key] = None if value is None else value.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: object, path: str) -> Override:
        _check_keys(data, path, ("name", "regex", "type", "weights", "activations"))
        kwargs: dict[str, Any] = {}
        for key in ("name", "regex", "type"):
            if key in data:
                kwargs[key] = _check_str(f"{path}.{key}", data[key])
        for key in ("weights", "activations"):
            if key in data:
                value = data[key]
                kwargs[key] = None if value is None else QuantizerConfig.from_dict(value, f"{path}.{key}")
        try:
            return cls(**kwargs)
        except RecipeError as exc:
            raise exc.nested(path) from None


@dataclass(frozen=True)
class KeepFloat:
    """Which layers found in the graph stay in full precision (paper A keeps both)."""

    first: bool = True
    last: bool = True

    def __post_init__(self) -> None:
        _check_bool("first", self.first)
        _check_bool("last", self.last)


PLACEMENTS = ("after_norm", "conv_input")
_ACT_KIND_MESSAGE = (
    "activation quantizers need a grid that does not depend on the data "
    "(fixed_point, binary with scale none, ternary_tanh), so that tensors meeting at a "
    "concatenation or addition share it"
)


@dataclass(frozen=True)
class Recipe:
    """How ``qseg.prepare`` quantizes a model.

    Args:
        name: the recipe's name (built-ins are listed by ``qseg.recipes.list()``).
        description: one paragraph for people.
        weights: quantizer for the weights of conv, transposed conv and linear
            layers; ``None`` keeps weights in float.
        activations: quantizer placed on activations (a fixed grid); ``None``
            places none.
        activation_placement: ``"after_norm"`` (paper A: after every BatchNorm; in
            a model without BatchNorm, after the activation that follows a layer)
            or ``"conv_input"`` (on the input of every quantized layer, the form an
            integer runtime executes).
        keep_float: keep the first / last weighted layers (found in the graph) in
            full precision.
        strip_dropout: remove every dropout (paper A: it hurts quantized training).
        overrides: per-layer exceptions, applied in order.

    Example:
        >>> r = Recipe.from_dict({"name": "w4", "weights": {"kind": "fixed_point", "int_bits": 0, "frac_bits": 4}})
        >>> r.weights, r.activations, r.keep_float
        (QuantizerConfig(kind='fixed_point', params={'int_bits': 0, 'frac_bits': 4}), None, KeepFloat(first=True, last=True))
    """

    name: str
    description: str = ""
    weights: QuantizerConfig | None = None
    activations: QuantizerConfig | None = None
    activation_placement: str = "after_norm"
    keep_float: KeepFloat = KeepFloat()
    strip_dropout: bool = True
    overrides: tuple[Override, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise _error("name", f"expected a non-empty string, got {self.name!r}")
        _check_str("description", self.description)
        for key in ("weights", "activations"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, QuantizerConfig):
                raise _error(key, f"expected a QuantizerConfig or None, got {value!r}")
        if self.activations is not None and not self.activations.fixed_grid:
            raise _error("activations", _ACT_KIND_MESSAGE)
        if self.activation_placement not in PLACEMENTS:
            raise _error(
                "activation_placement",
                f"must be one of {', '.join(PLACEMENTS)}; got {self.activation_placement!r}",
            )
        if not isinstance(self.keep_float, KeepFloat):
            raise _error("keep_float", f"expected a KeepFloat, got {self.keep_float!r}")
        _check_bool("strip_dropout", self.strip_dropout)
        object.__setattr__(self, "overrides", tuple(self.overrides))
        for i, item in enumerate(self.overrides):
            if not isinstance(item, Override):
                raise _error(f"overrides[{i}]", f"expected an Override, got {item!r}")

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: object) -> Recipe:
        """Build and validate a recipe from a mapping (a YAML file's content)."""
        fields = ("name", "description", "weights", "activations", "activation_placement", "keep_float")
        _check_keys(data, "", (*fields, "strip_dropout", "overrides"), ("name",))
        kwargs: dict[str, Any] = {}
        for key in ("name", "description", "activation_placement"):
            if key in data:
                kwargs[key] = _check_str(key, data[key])
        for key in ("weights", "activations"):
            if data.get(key) is not None:
                kwargs[key] = QuantizerConfig.from_dict(data[key], key)
        if "keep_float" in data:
            _check_keys(data["keep_float"], "keep_float", ("first", "last"))
            keep = {k: _check_bool(f"keep_float.{k}", v) for k, v in data["keep_float"].items()}
            kwargs["keep_float"] = KeepFloat(**keep)
        if "strip_dropout" in data:
            kwargs["strip_dropout"] = _check_bool("strip_dropout", data["strip_dropout"])
        if "overrides" in data:
            items = data["overrides"] or []
            if not isinstance(items, list):
                raise _error("overrides", f"expected a list of overrides, got {items!r}")
            kwargs["overrides"] = tuple(Override.from_dict(o, f"overrides[{i}]") for i, o in enumerate(items))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The plain mapping :meth:`from_dict` reads (round-trips exactly)."""
        return {
            "name": self.name,
            "description": self.description,
            "weights": None if self.weights is None else self.weights.to_dict(),
            "activations": None if self.activations is None else self.activations.to_dict(),
            "activation_placement": self.activation_placement,
            "keep_float": {"first": self.keep_float.first, "last": self.keep_float.last},
            "strip_dropout": self.strip_dropout,
            "overrides": [o.to_dict() for o in self.overrides],
        }
