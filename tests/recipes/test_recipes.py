"""Recipes: loading from every source, exact round trips, and errors that name the key path."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import qseg
from qseg.errors import RecipeError
from qseg.recipes import INHERIT, Override, QuantizerConfig, Recipe, builtin_names, load
from qseg.recipes import list as list_recipes

DEFAULT = load("unet-qa6.0-qw0.4").to_dict()


def test_default_builtin_is_paper_a_qa6_qw4():
    r = load(qseg.recipes.DEFAULT)
    assert r.weights == QuantizerConfig("fixed_point", {"int_bits": 0, "frac_bits": 4})
    assert r.activations == QuantizerConfig("fixed_point", {"int_bits": 6, "frac_bits": 0, "signed": False})
    assert r.activation_placement == "after_norm" and r.strip_dropout
    assert r.keep_float.first and r.keep_float.last
    assert r.weights.build().bits == 5 and r.activations.build().bits == 6


def test_list_describes_every_builtin_and_each_loads():
    described = list_recipes()
    assert set(described) == set(builtin_names()) and "unet-qa6.0-qw0.4" in described
    for name, text in described.items():
        assert len(text) > 40, name
        assert load(name).name == name


def test_every_source_gives_the_same_recipe(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(DEFAULT))
    from_name = load("unet-qa6.0-qw0.4")
    assert load(path) == load(str(path)) == load(DEFAULT) == load(from_name) == from_name


def test_round_trip_through_dict_and_yaml():
    r = Recipe.from_dict(
        {
            **DEFAULT,
            "overrides": [
                {"name": "dec*", "weights": None},
                {"regex": "enc[12]\\..*", "type": "Conv2d", "activations": {"kind": "ternary_tanh"}},
                {"type": "Linear", "weights": {"kind": "ternary", "channel_axis": 0}},
            ],
        }
    )
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_dict(yaml.safe_load(yaml.safe_dump(r.to_dict()))) == r
    assert r.overrides[0].activations is INHERIT and r.overrides[0].weights is None


def test_recipe_is_frozen_and_replace_validates():
    r = load("unet-qa6.0-qw0.4")
    with pytest.raises(AttributeError):
        r.name = "other"
    assert r.replace(strip_dropout=False).strip_dropout is False
    with pytest.raises(RecipeError, match="activation_placement"):
        r.replace(activation_placement="before_conv")


def bad(**changes) -> dict:
    out = copy.deepcopy(DEFAULT)
    out.update(changes)
    return out


ERRORS = [
    (bad(colour="red"), r"^colour: unknown key; allowed: name, description, weights"),
    ({"description": "x"}, r"missing key 'name'"),
    (bad(name=""), r"^name: expected a non-empty string"),
    (
        bad(weights={"kind": "fixed_pt", "int_bits": 0}),
        r"^weights\.kind: unknown quantizer 'fixed_pt'; allowed: fixed_point",
    ),
    (bad(weights={"int_bits": 0}), r"^weights: missing key 'kind'"),
    (bad(weights={"kind": "fixed_point", "int_bits": 0}), r"^weights: missing key 'frac_bits'"),
    (
        bad(weights={"kind": "fixed_point", "int_bits": 0, "frac_bits": 20}),
        r"^weights\.frac_bits: frac_bits must be in \[0, 16\], got 20",
    ),
    (
        bad(weights={"kind": "fixed_point", "int_bits": 0, "frac_bits": 4, "bits": 3}),
        r"^weights\.bits: unknown key; allowed: int_bits, frac_bits, signed, overflow, ste",
    ),
    (
        bad(weights={"kind": "power_of_two", "bits": "7"}),
        r"^weights\.bits: bits must be an integer in \[2, 16\], got '7'",
    ),
    (bad(weights=[1, 2]), r"^weights: expected a quantizer mapping"),
    (
        bad(activations={"kind": "ternary"}),
        r"^activations: activation quantizers need a grid that does not depend on the data",
    ),
    (
        bad(activations={"kind": "binary", "scale": "mean"}),
        r"^activations: activation quantizers need a grid",
    ),
    (
        bad(activations={"kind": "int", "bits": 8, "channel_axis": 0}),
        r"^activations: .*or a per-tensor int grid set by calibration",
    ),
    (
        bad(activation_placement="before_conv"),
        r"^activation_placement: must be one of after_norm, conv_input; got 'before_conv'",
    ),
    (bad(keep_float={"first": "yes"}), r"^keep_float\.first: expected true or false, got 'yes'"),
    (bad(keep_float={"middle": True}), r"^keep_float\.middle: unknown key; allowed: first, last"),
    (bad(strip_dropout=1), r"^strip_dropout: expected true or false, got 1"),
    (bad(input={"bits": 8}), r"^input: missing key 'range'"),
    (bad(input={"bits": 1, "range": [0, 1]}), r"^input\.bits: expected an integer in \[2, 16\], got 1"),
    (bad(input={"bits": 8, "range": [1, 0]}), r"^input\.range: expected lo < hi, got \[1, 0\]"),
    (bad(input={"bits": 8, "range": [0, "max"]}), r"^input\.range: expected two finite numbers"),
    (
        bad(input={"bits": 8, "range": [0, 255], "mean": 3}),
        r"^input\.mean: unknown key; allowed: bits, range",
    ),
    (
        bad(input={"bits": 8, "range": [-1024, 3071]}),
        r"^input\.range: 8 bits cannot cover \[-1024, 3071\] with a step of at most 1 \(it needs 13\)",
    ),
    (bad(overrides={"name": "x"}), r"^overrides: expected a list of overrides"),
    (
        bad(overrides=[{"name": "a", "weights": None}, {"weights": None}]),
        r"^overrides\[1\]: an override needs at least one of name, regex, type",
    ),
    (
        bad(overrides=[{"name": "a", "weights": {"kind": "dorefa", "bits": 0}}]),
        r"^overrides\[0\]\.weights\.bits: bits must be in \[1, 16\], got 0",
    ),
    (bad(overrides=[{"regex": "(", "weights": None}]), r"^overrides\[0\]\.regex: not a regular expression"),
    (
        bad(overrides=[{"name": "a", "colour": 1}]),
        r"^overrides\[0\]\.colour: unknown key; allowed: name, regex, type, weights, activations",
    ),
    (bad(overrides=[{"type": 3}]), r"^overrides\[0\]\.type: expected a string, got 3"),
]


@pytest.mark.parametrize(("data", "message"), ERRORS, ids=[m for _, m in ERRORS])
def test_errors_name_the_key_path(data, message):
    with pytest.raises(RecipeError, match=message) as info:
        load(data)
    assert info.value.path == str(info.value).split(":", 1)[0] or not info.value.path


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe 'unet-qa5': neither a built-in"):
        load("unet-qa5")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        load(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must hold a mapping of recipe keys, got list"):
        load(listing)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(bad(strip_dropout="no")))
    with pytest.raises(RecipeError, match=r"wrong\.yaml: strip_dropout: expected true or false"):
        load(wrong)
    with pytest.raises(RecipeError, match="got int"):
        load(3)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        load(evil)


# ---- fuzzing ---------------------------------------------------------------------------------

quantizers = st.one_of(
    st.builds(
        lambda i, f, s, o, e: {
            "kind": "fixed_point",
            "int_bits": i,
            "frac_bits": f,
            "signed": s,
            "overflow": o,
            "ste": e,
        },
        st.integers(0, 8),
        st.integers(0, 8),
        st.booleans(),
        st.sampled_from(["saturate", "wrap"]),
        st.sampled_from(["clipped", "identity"]),
    ).filter(lambda d: d["int_bits"] + d["frac_bits"] >= 1),
    st.builds(lambda b: {"kind": "power_of_two", "bits": b}, st.integers(2, 16)),
    st.builds(lambda b: {"kind": "dorefa", "bits": b}, st.integers(1, 16)),
    st.builds(lambda a: {"kind": "ternary", "channel_axis": a}, st.sampled_from([None, 0, 1])),
    st.builds(lambda s: {"kind": "binary", "scale": s}, st.sampled_from(["none", "mean"])),
    st.just({"kind": "ternary_tanh", "beta_start": 2.0, "beta_end": 9.0}),
    st.builds(
        lambda b, m, a, learn: {"kind": "int", "bits": b, "mode": m, "channel_axis": a, "learn_scale": learn},
        st.integers(2, 16),
        st.sampled_from(["symmetric", "unsigned"]),
        st.sampled_from([None, 0]),
        st.booleans(),
    ),
)
fixed_grid_quantizers = quantizers.filter(
    lambda d: (
        d["kind"] in ("fixed_point", "ternary_tanh")
        or d == {"kind": "binary", "scale": "none"}
        or (d["kind"] == "int" and d["channel_axis"] is None)
    )  # a calibrated per-tensor grid
)
overrides = st.fixed_dictionaries(
    {"name": st.sampled_from(["enc*", "head", "dec?.conv1"])},
    optional={
        "type": st.sampled_from(["Conv2d", "Linear"]),
        "weights": st.one_of(st.none(), quantizers),
        "activations": st.one_of(st.none(), fixed_grid_quantizers),
    },
)
valid_recipes = st.fixed_dictionaries(
    {"name": st.text(min_size=1, max_size=12)},
    optional={
        "description": st.text(max_size=30),
        "weights": st.one_of(st.none(), quantizers),
        "activations": st.one_of(st.none(), fixed_grid_quantizers),
        "activation_placement": st.sampled_from(["after_norm", "conv_input"]),
        "keep_float": st.fixed_dictionaries({}, optional={"first": st.booleans(), "last": st.booleans()}),
        "input": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {"bits": st.integers(8, 16), "range": st.sampled_from([[0, 1], [0, 255], [-1.5, 2.0]])}
            ),
        ),
        "strip_dropout": st.booleans(),
        "overrides": st.lists(overrides, max_size=3),
    },
)


@given(valid_recipes)
def test_valid_recipes_load_and_round_trip(data):
    r = load(data)
    assert Recipe.from_dict(r.to_dict()) == r
    for key in ("weights", "activations"):
        if getattr(r, key) is not None:
            getattr(r, key).build()


junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
keys = st.sampled_from(
    [
        "name",
        "weights",
        "activations",
        "activation_placement",
        "keep_float",
        "strip_dropout",
        "overrides",
        "kind",
        "bits",
    ]
)


@given(
    valid_recipes,
    st.lists(
        st.tuples(st.sampled_from(["", "weights", "activations", "keep_float"]), keys, junk), max_size=3
    ),
)
def test_corrupted_recipes_fail_only_with_recipe_error(data, corruptions):
    data = copy.deepcopy(data)
    for where, key, value in corruptions:
        target = data if not where else data.get(where)
        if isinstance(target, dict):
            target[key] = value
    try:
        r = load(data)
    except RecipeError as exc:
        assert str(exc)  # a message, and nothing but RecipeError escapes
    else:
        assert Recipe.from_dict(r.to_dict()) == r


def test_override_sentinel_survives_copies():
    o = Override(name="x")
    assert copy.deepcopy(o).weights is INHERIT and copy.copy(o).activations is INHERIT


@given(
    st.integers(2, 16),
    st.floats(-4000, 0, allow_nan=False),
    st.floats(1e-3, 4000, allow_nan=False),
)
def test_input_grid_is_the_finest_power_of_two_grid_that_covers_its_range(bits, lo, hi):
    from qseg.errors import RecipeError
    from qseg.recipes import InputGrid

    try:
        grid = InputGrid(bits, (lo, hi))
    except RecipeError as exc:
        assert "cannot cover" in str(exc) or "too narrow" in str(exc)
        return
    q = grid.config.build()
    assert q.bits == bits or (q.int_bits == 0 and q.bits <= bits)  # sign-magnitude counts its sign
    top = q.spec().qmax * q.spec().scale
    assert top >= max(abs(lo), hi) - 1e-9  # the range fits
    if q.int_bits > 0:  # a step half as large would not fit (unless the grid is a pure fraction)
        assert q.spec().qmax * q.spec().scale / 2 < max(abs(lo), hi)
    assert q.signed == (lo < 0)
