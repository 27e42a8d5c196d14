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
from qseg.recipes import Recipe, builtin_names, load
from qseg.recipes.quantizer_config import KINDS
from qseg.recipes.training import Inq, SuggestiveAnnotation, Training

DOCS = (Path(__file__).parents[2] / "docs" / "recipes.md").read_text(encoding="utf-8")
# qseg's deployment variants of a paper setup, not setups of the papers
DEPLOYMENT = ["unet-qa6.0-qw0.4-exact"]
PAPER_A = [n for n in builtin_names() if n.startswith("unet-") and n not in DEPLOYMENT]
PAPER_B = [n for n in builtin_names() if n.startswith("fcn-")]


def test_every_builtin_belongs_to_a_paper_or_is_a_deployment_variant():
    assert set(PAPER_A) | set(PAPER_B) | set(DEPLOYMENT) == set(builtin_names())
    assert len(PAPER_A) == 6 and len(PAPER_B) == 5


def test_exact_variant_is_paper_a_default_integer_from_input_to_output():
    exact, paper = load("unet-qa6.0-qw0.4-exact"), load("unet-qa6.0-qw0.4")
    assert not exact.keep_float.first and not exact.keep_float.last
    assert exact.input is not None and exact.input.config.label == "Q1.7 unsigned"
    assert paper.input is None
    same = ("weights", "activations", "activation_placement", "strip_dropout", "rescale", "training")
    assert all(getattr(exact, key) == getattr(paper, key) for key in same)


@pytest.mark.parametrize("name", PAPER_A)
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
    converted = qseg.convert(qseg.prepare(model, name, example_inputs=x))
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
    for kind in KINDS:
        assert f"`{kind}`" in DOCS, kind
