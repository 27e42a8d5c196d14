"""A quantizer kind is one class and one register_kind call: a recipe can then use it
with no other edit (prepare, training hooks, convert); a bad registration, or a
recipe naming an unregistered kind, fails with a clear error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import qseg
from qseg.errors import QuantizerError, RecipeError
from qseg.quantizers import (
    FixedPoint,
    Quantizer,
    QuantSpec,
    get_kind,
    kind_names,
    register_kind,
    unregister_kind,
)
from qseg.quantizers.base import straight_through

BUILTIN = ("fixed_point", "power_of_two", "int", "binary", "dorefa", "ternary", "ternary_tanh")


class Halves(Quantizer):
    """Multiples of ``step`` in ``[-1, 1]``: a fixed grid (usable on activations) that,
    for the test, also follows training progress."""

    fixed_grid = True
    annealed = True

    def __init__(self, step: float = 0.5) -> None:
        super().__init__()
        if step not in (0.5, 0.25):
            raise QuantizerError(f"step must be 0.5 or 0.25, got {step!r}")
        self.step = step
        self.levels = round(1 / step)
        self.progress = 0.0

    @property
    def bits(self) -> int:
        return self.levels.bit_length() + 1

    @property
    def label(self) -> str:
        return f"halves {self.step}"

    def anneal(self, progress: float) -> None:
        self.progress = progress

    def spec(self, x: torch.Tensor | None = None) -> QuantSpec:  # noqa: ARG002
        return QuantSpec(scale=torch.tensor(self.step), zero_point=0, qmin=-self.levels, qmax=self.levels)

    def frozen_spec(self) -> QuantSpec:
        return self.spec()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q = torch.round(x / self.step).clamp(-self.levels, self.levels) * self.step
        return straight_through(x, q)


@pytest.fixture
def halves() -> Iterator[str]:
    register_kind("halves", Halves, optional=("step",))
    try:
        yield "halves"
    finally:
        unregister_kind("halves")


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 1, 1),
    ).eval()


def test_builtin_kinds_register_in_the_order_recipe_errors_list_them():
    assert kind_names() == BUILTIN
    assert get_kind("int").cls is qseg.quantizers.Uniform


def test_a_registered_kind_works_in_a_recipe_with_no_other_edit(halves):
    assert kind_names() == (*BUILTIN, halves)
    recipe = {
        "name": "toy",
        "weights": {"kind": halves, "step": 0.25},
        "activations": {"kind": halves},
    }
    config = qseg.recipes.load(recipe)
    assert (config.weights.label, config.activations.label) == ("halves 0.25", "halves 0.5")
    assert config.activations.activation_grid and config.activations.signed

    x = torch.rand(1, 1, 8, 8)
    qmodel = qseg.prepare(model(), recipe, example_inputs=x)
    weight_quants = [
        m.weight_quant for m in qmodel.modules() if isinstance(getattr(m, "weight_quant", None), Halves)
    ]
    assert weight_quants and all(q.step == 0.25 for q in weight_quants)
    acts = [m for m in qmodel.modules() if isinstance(m, Halves) and m.step == 0.5]
    assert acts
    assert qmodel(x).shape == (1, 1, 8, 8)

    hooks = qseg.training_hooks(qmodel)  # the kind's own training behaviour, through the base class
    hooks.epoch(0.5)
    assert {id(m) for m in hooks.annealed} >= {id(m) for m in acts} and all(m.progress == 0.5 for m in acts)

    converted = qseg.convert(qmodel)  # frozen_spec: the activations become integer grids
    torch.testing.assert_close(converted(x), qmodel(x), atol=1e-5, rtol=0)


def test_a_registered_kinds_keys_are_checked_like_the_builtins(halves):
    with pytest.raises(RecipeError, match=r"^weights\.bits: unknown key; allowed: step$"):
        qseg.recipes.load({"name": "toy", "weights": {"kind": halves, "bits": 4}})
    with pytest.raises(RecipeError, match=r"^weights\.step: step must be 0.5 or 0.25, got 0.1$"):
        qseg.recipes.load({"name": "toy", "weights": {"kind": halves, "step": 0.1}})


def test_a_recipe_naming_an_unregistered_kind_lists_the_registered_ones():
    with pytest.raises(
        RecipeError,
        match=r"^weights\.kind: unknown quantizer 'halves'; allowed: fixed_point, power_of_two, int,",
    ):
        qseg.recipes.load({"name": "toy", "weights": {"kind": "halves"}})


def test_registering_a_taken_name_is_refused(halves):
    with pytest.raises(QuantizerError, match=r"^quantizer kind 'halves' is registered already \(Halves\)"):
        register_kind(halves, Halves)
    with pytest.raises(QuantizerError, match=r"^quantizer kind 'fixed_point' is registered already"):
        register_kind("fixed_point", FixedPoint, required=("int_bits", "frac_bits"))
    assert get_kind("fixed_point").cls is FixedPoint


@pytest.mark.parametrize(
    ("name", "cls", "keys", "message"),
    [
        ("not a name", Halves, (), r"must be an identifier"),
        ("plain", nn.Identity, (), r"is not a subclass of qseg.quantizers.Quantizer"),
        ("twice", Halves, ("step", "step"), r"keys must be distinct and not 'kind'"),
        ("kinded", Halves, ("kind",), r"keys must be distinct and not 'kind'"),
    ],
)
def test_a_bad_registration_is_refused(name, cls, keys, message):
    with pytest.raises(QuantizerError, match=message):
        register_kind(name, cls, optional=keys)
    assert name not in kind_names()


def test_unregistering_removes_the_kind_and_twice_is_an_error():
    register_kind("halves", Halves)
    unregister_kind("halves")
    assert "halves" not in kind_names()
    with pytest.raises(QuantizerError, match=r"^no quantizer kind 'halves' is registered$"):
        unregister_kind("halves")
    with pytest.raises(QuantizerError, match=r"^unknown quantizer 'halves'; allowed: fixed_point"):
        get_kind("halves")
