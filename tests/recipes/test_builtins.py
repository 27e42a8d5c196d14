"""Every built-in recipe: it matches its paper's setup, prepares the paper U-Net, exports,
and is documented in docs/recipes.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import qseg
from qseg.exporters.parity import check_parity
from qseg.models import PaperUNet
from qseg.quantizers import kind_names
from qseg.recipes import Recipe, builtin_names, load
from qseg.recipes.training import Inq, SuggestiveAnnotation, Training

DOCS = (Path(__file__).parents[2] / "docs" / "recipes.md").read_text(encoding="utf-8")
# qseg's variants of a paper setup (exact deployment, dynamic fixed point), not setups of the papers
VARIANTS = ["unet-qa6.0-qw0.4-exact", "unet-qa8-qw8-dfp"]
# qseg's recipes for any model, with calibrated scales
GENERAL = ["int8", "w4a8"]
PAPER_A = [n for n in builtin_names() if n.startswith("unet-") and n not in VARIANTS]
PAPER_B = [n for n in builtin_names() if n.startswith("fcn-")]


def test_every_builtin_belongs_to_a_paper_or_is_a_variant_or_general():
    assert set(PAPER_A) | set(PAPER_B) | set(VARIANTS) | set(GENERAL) == set(builtin_names())
    assert len(PAPER_A) == 6 and len(PAPER_B) == 5


def test_general_recipes_quantize_every_layer_on_calibrated_grids():
    # int8 keeps its weight codes within 7 bits: exact on AVX2 int8 kernels without VNNI
    for name, weight_bits, learned in [("int8", 7, False), ("w4a8", 4, True)]:
        r = load(name)
        assert not r.keep_float.first and not r.keep_float.last and r.strip_dropout, name
        assert not r.rescale and r.inq is None, name
        w, a = r.weights, r.activations
        assert (w.kind, w.params["bits"], w.params["channel_axis"]) == ("int", weight_bits, 0), name
        assert w.params.get("learn_scale", False) == learned, name
        assert (a.kind, a.params["bits"], a.params["mode"]) == ("int", 8, "unsigned"), name
        assert a.params.get("learn_scale", False) == learned and a.activation_grid, name
        assert 1 <= r.training.epochs <= 2, name


def test_dynamic_fixed_point_variant_is_paper_a_8_bit_with_per_layer_power_of_two_steps():
    dfp, paper = load("unet-qa8-qw8-dfp"), load("unet-qa8.0-qw0.8")
    assert dfp.weights.params == {"bits": 8, "power_of_two_scale": True}
    assert dfp.activations.params == {"bits": 8, "mode": "unsigned", "power_of_two_scale": True}
    same = ("keep_float", "activation_placement", "strip_dropout", "training")
    assert all(getattr(dfp, key) == getattr(paper, key) for key in same)


def test_exact_variant_is_paper_a_default_integer_from_input_to_output():
    exact, paper = load("unet-qa6.0-qw0.4-exact"), load("unet-qa6.0-qw0.4")
    assert not exact.keep_float.first and not exact.keep_float.last
    assert exact.input is not None and exact.input.config.label == "Q1.7 unsigned"
    assert paper.input is None
    same = ("weights", "activations", "activation_placement", "strip_dropout", "rescale", "training")
    assert all(getattr(exact, key) == getattr(paper, key) for key in same)


@pytest.mark.parametrize("name", [*PAPER_A, "unet-qa8-qw8-dfp"])
def test_paper_a_setups_keep_first_and_last_float_and_train_as_published(name):
    r = load(name)
    assert r.keep_float.first and r.keep_float.last and r.strip_dropout
    assert r.activation_placement == "after_norm" and r.activations is not None
    t = r.training
    assert (t.optimizer, t.lr, t.lr_schedule, t.loss, t.epochs) == ("adam", 1e-3, "cosine", "dice", 200)
    assert r.inq is None and r.suggestive_annotation is None


@pytest.mark.parametrize("name", PAPER_B)
def test_paper_b_setups_quantize_every_layer_weights_only(name):
    r = load(name)
    assert not r.keep_float.first and not r.keep_float.last
    assert r.activations is None and r.weights is not None
    assert r.training.lr == 5e-4 and r.training.lr_at(0.99) == pytest.approx(5e-5)
    assert (r.inq is not None) == (r.weights.kind == "power_of_two")


def test_fixed_point_setups_have_the_papers_bit_splits():
    def split(config):
        return config.params["int_bits"], config.params["frac_bits"]

    for name, act, weight in [
        ("unet-qa6.0-qw0.4", (6, 0), (0, 4)),
        ("unet-qa8.8-qw8.8", (8, 8), (8, 8)),
        ("unet-qa8.0-qw0.8", (8, 0), (0, 8)),
        ("unet-qa4.0-qw0.2", (4, 0), (0, 2)),
    ]:
        r = load(name)
        assert split(r.activations) == act and split(r.weights) == weight, name


def test_sa_inq_setup_is_papers():
    r = load("fcn-sa-inq7")
    assert r.weights.params == {"bits": 7} and r.inq.portions == (0.5, 0.75, 0.875, 1.0)
    sa = r.suggestive_annotation
    assert (sa.models, sa.candidates, sa.selected, sa.uncertainty) == (5, 16, 8, "std")


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_prepares_the_paper_unet(name):
    r = load(name)
    q = qseg.prepare(PaperUNet(), r, example_inputs=torch.randn(1, 1, 16, 16))
    rows = {row.name: row for row in q.qseg_report.layers}
    quantized = {name for name, row in rows.items() if not row.weights.startswith("float")}
    assert ("enc1.conv1" in quantized) == (not r.keep_float.first)
    assert ("head" in quantized) == (not r.keep_float.last)
    assert "dec2.conv1" in quantized


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_exports_to_onnx_and_matches(name, tmp_path):
    torch.manual_seed(0)
    model = PaperUNet(widths=(4, 8, 8, 8)).eval()
    x = torch.rand(1, 1, 16, 24)
    qmodel = qseg.prepare(model, name, example_inputs=x)
    activations = load(name).activations
    if activations is not None and activations.kind == "int":  # ranges from data, not a fixed grid
        qseg.calibrate(qmodel, [torch.rand(2, 1, 16, 24) for _ in range(3)], progress=False)
    converted = qseg.convert(qmodel)
    path = tmp_path / "m.onnx"
    qseg.export_onnx(converted, x, path)
    (result,) = check_parity(converted, x, onnx_path=path)
    if load(name).activations is not None:
        assert result.ok, result  # within one activation step
    else:
        # float activations: only the runtimes' summation order differs, relative to the
        # output's size (a random-init U-Net with unscaled DoReFa weights reaches 1e6)
        scale = float(converted(x).abs().max())
        assert result.max_abs_diff <= 1e-5 * max(scale, 1.0), result


def test_docs_name_every_builtin_and_every_key():
    for name in builtin_names():
        assert f"`{name}`" in DOCS, name
    for cls in (Recipe, Training, Inq, SuggestiveAnnotation):
        for field in dataclasses.fields(cls):
            assert field.name in DOCS, f"{cls.__name__}.{field.name} is not in docs/recipes.md"
    for kind in kind_names():
        assert f"`{kind}`" in DOCS, kind
