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
from dataclasses import dataclass, field
from typing import Any

from qseg.errors import RecipeError
from qseg.recipes._checks import _check_bool, _check_keys, _check_str, _error
from qseg.recipes.input_grid import InputGrid
from qseg.recipes.quantizer_config import QuantizerConfig
from qseg.recipes.training import Inq, SuggestiveAnnotation, Training

__all__ = ["INHERIT", "KeepFloat", "Override", "Recipe"]


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
        if self.activations not in (None, INHERIT) and not self.activations.activation_grid:
            raise _error("activations", _ACT_KIND_MESSAGE)

    def matches(self, layer_name: str, type_name: str) -> bool:
        """Whether this override applies to the layer ``layer_name`` of class ``type_name``.

        Example:
            >>> o = Override(name="dec*", type="Conv2d", weights=None)
            >>> o.matches("dec1.conv1", "Conv2d"), o.matches("dec1.up", "ConvTranspose2d")
            (True, False)
            >>> o.matches("enc1.conv1", "Conv2d")
            False
        """
        if self.name is not None and not fnmatch.fnmatchcase(layer_name, self.name):
            return False
        if self.regex is not None and re.fullmatch(self.regex, layer_name) is None:
            return False
        return self.type is None or self.type == type_name

    def to_dict(self) -> dict[str, Any]:
        """The mapping :meth:`from_dict` reads; selectors not given and fields left to
        the recipe (``INHERIT``) are omitted, ``None`` (keep float) is kept.

        Example:
            >>> Override(name="dec*", weights=None).to_dict()
            {'name': 'dec*', 'weights': None}
        """
        out: dict[str, Any] = {k: v for k in ("name", "regex", "type") if (v := getattr(self, k)) is not None}
        for key in ("weights", "activations"):
            value = getattr(self, key)
            if value is not INHERIT:
                out[key] = None if value is None else value.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: object, path: str) -> Override:
        """Build and validate an override from a mapping (one item of a recipe's
        ``overrides`` list); ``path`` prefixes the key path of any error.

        Example:
            >>> fp6 = {"kind": "fixed_point", "int_bits": 0, "frac_bits": 6}
            >>> Override.from_dict({"type": "Linear", "weights": fp6}, "overrides[0]").weights.label
            'Q0.6'
            >>> Override.from_dict({"layer": "head"}, "overrides[2]")
            Traceback (most recent call last):
            ...
            qseg.errors.RecipeError: overrides[2].layer: unknown key; allowed: name, regex, type, weights, activations
        """
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
    """Which layers found in the graph stay in full precision (paper A keeps both).

    Example:
        >>> from qseg.recipes import load
        >>> load("unet-qa6.0-qw0.4").replace(keep_float=KeepFloat(first=False)).keep_float
        KeepFloat(first=False, last=True)
        >>> KeepFloat(first="no")
        Traceback (most recent call last):
        ...
        qseg.errors.RecipeError: first: expected true or false, got 'no'
    """

    first: bool = True
    last: bool = True

    def __post_init__(self) -> None:
        _check_bool("first", self.first)
        _check_bool("last", self.last)


PLACEMENTS = ("after_norm", "conv_input")
_ACT_KIND_MESSAGE = (
    "activation quantizers need a grid that does not depend on the data "
    "(fixed_point, binary with scale none, ternary_tanh), so that tensors meeting at a "
    "concatenation or addition share it, or a per-tensor int grid set by calibration "
    "(int without channel_axis)"
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
        input: the grid of the model's inputs (:class:`~qseg.recipes.InputGrid`),
            or ``None`` (inputs stay float). With ``keep_float: {first: false,
            last: false}`` the model is integer from input to output, and
            deploys bit-exact (docs/export.md).
        quantize_norm_inputs: also quantize a layer's output where it feeds only an
            InstanceNorm or GroupNorm (with per-sample statistics), so that the
            deployed norm reads integer codes: OpenVINO then runs the layer with an
            8-bit output and the norm on 8-bit input (NNCF's placement; qseg's
            addition, docs/prepare.md).
        strip_dropout: remove every dropout (paper A: it hurts quantized training).
        rescale: rescale a float model's channels so that quantized weights and
            activations use their whole grid, without changing the float function
            (qseg's addition, see :func:`qseg.passes.rescale`).
        overrides: per-layer exceptions, applied in order.
        training: how the paper trained the quantized network (read by
            :func:`qseg.train.fit`, not by ``prepare``).
        inq: incremental quantization stages (power-of-two weights), or ``None``.
        suggestive_annotation: settings of the suggestive-annotation loop, or ``None``.

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
    input: InputGrid | None = None
    quantize_norm_inputs: bool = False
    strip_dropout: bool = True
    rescale: bool = False
    overrides: tuple[Override, ...] = ()
    training: Training = field(default_factory=Training)
    inq: Inq | None = None
    suggestive_annotation: SuggestiveAnnotation | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise _error("name", f"expected a non-empty string, got {self.name!r}")
        _check_str("description", self.description)
        for key in ("weights", "activations"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, QuantizerConfig):
                raise _error(key, f"expected a QuantizerConfig or None, got {value!r}")
        if self.activations is not None and not self.activations.activation_grid:
            raise _error("activations", _ACT_KIND_MESSAGE)
        if self.activation_placement not in PLACEMENTS:
            raise _error(
                "activation_placement",
                f"must be one of {', '.join(PLACEMENTS)}; got {self.activation_placement!r}",
            )
        if not isinstance(self.keep_float, KeepFloat):
            raise _error("keep_float", f"expected a KeepFloat, got {self.keep_float!r}")
        if self.input is not None and not isinstance(self.input, InputGrid):
            raise _error("input", f"expected an InputGrid or None, got {self.input!r}")
        _check_bool("quantize_norm_inputs", self.quantize_norm_inputs)
        _check_bool("strip_dropout", self.strip_dropout)
        _check_bool("rescale", self.rescale)
        object.__setattr__(self, "overrides", tuple(self.overrides))
        for i, item in enumerate(self.overrides):
            if not isinstance(item, Override):
                raise _error(f"overrides[{i}]", f"expected an Override, got {item!r}")
        if not isinstance(self.training, Training):
            raise _error("training", f"expected a Training, got {self.training!r}")
        for key, cls in (("inq", Inq), ("suggestive_annotation", SuggestiveAnnotation)):
            value = getattr(self, key)
            if value is not None and not isinstance(value, cls):
                raise _error(key, f"expected a {cls.__name__} or None, got {value!r}")
        if self.inq is not None and (self.weights is None or self.weights.kind != "power_of_two"):
            raise _error("inq", "incremental quantization needs power_of_two weights (weights.kind)")

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (validated again).

        Example:
            >>> from qseg.recipes import load
            >>> qa6 = load("unet-qa6.0-qw0.4")
            >>> qa6.replace(activation_placement="conv_input").activation_placement
            'conv_input'
            >>> qa6.replace(activation_placement="before")
            Traceback (most recent call last):
            ...
            qseg.errors.RecipeError: activation_placement: must be one of after_norm, conv_input; got 'before'
        """
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: object) -> Recipe:
        """Build and validate a recipe from a mapping (a YAML file's content).

        Keys left out take the field defaults; an error names the key path.

        Example:
            >>> r = Recipe.from_dict({
            ...     "name": "w4-float-decoder",
            ...     "weights": {"kind": "fixed_point", "int_bits": 0, "frac_bits": 4},
            ...     "overrides": [{"name": "dec*", "weights": None}],
            ... })
            >>> r.weights.label, r.overrides[0].matches("dec1.conv1", "Conv2d")
            ('Q0.4', True)
            >>> Recipe.from_dict({"name": "x", "weights": {"kind": "fixed_point", "int_bits": 0}})
            Traceback (most recent call last):
            ...
            qseg.errors.RecipeError: weights: missing key 'frac_bits'
        """
        fields = ("name", "description", "weights", "activations", "activation_placement", "keep_float")
        sections = {"training": Training, "inq": Inq, "suggestive_annotation": SuggestiveAnnotation}
        _check_keys(
            data,
            "",
            (*fields, "input", "quantize_norm_inputs", "strip_dropout", "rescale", "overrides", *sections),
            ("name",),
        )
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
        if data.get("input") is not None:
            kwargs["input"] = InputGrid.from_dict(data["input"], "input")
        for key in ("quantize_norm_inputs", "strip_dropout", "rescale"):
            if key in data:
                kwargs[key] = _check_bool(key, data[key])
        if "overrides" in data:
            items = data["overrides"] or []
            if not isinstance(items, list):
                raise _error("overrides", f"expected a list of overrides, got {items!r}")
            kwargs["overrides"] = tuple(Override.from_dict(o, f"overrides[{i}]") for i, o in enumerate(items))
        for key, section in sections.items():
            if data.get(key) is not None:
                kwargs[key] = section.from_dict(data[key], key)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The plain mapping :meth:`from_dict` reads (round-trips exactly), every field
        written out, defaults included.

        Example:
            >>> from qseg.recipes import load
            >>> qa6 = load("unet-qa6.0-qw0.4")
            >>> d = qa6.to_dict()
            >>> d["weights"], d["keep_float"]
            ({'kind': 'fixed_point', 'int_bits': 0, 'frac_bits': 4}, {'first': True, 'last': True})
            >>> Recipe.from_dict(d) == qa6
            True
        """
        return {
            "name": self.name,
            "description": self.description,
            "weights": None if self.weights is None else self.weights.to_dict(),
            "activations": None if self.activations is None else self.activations.to_dict(),
            "activation_placement": self.activation_placement,
            "keep_float": {"first": self.keep_float.first, "last": self.keep_float.last},
            "input": None if self.input is None else self.input.to_dict(),
            "quantize_norm_inputs": self.quantize_norm_inputs,
            "strip_dropout": self.strip_dropout,
            "rescale": self.rescale,
            "overrides": [o.to_dict() for o in self.overrides],
            "training": self.training.to_dict(),
            "inq": None if self.inq is None else self.inq.to_dict(),
            "suggestive_annotation": None
            if self.suggestive_annotation is None
            else self.suggestive_annotation.to_dict(),
        }
