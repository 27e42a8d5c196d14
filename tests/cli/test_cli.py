"""The `qseg` command: every subcommand's wiring, output and error handling."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

import qseg
from qseg import cli
from qseg.models import PaperUNet
from qseg.recipes import builtin_names, load

TINY = (4, 8, 8, 8)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A module `cli_models_<n>` in the current directory, as a user would have."""
    name = f"cli_models_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(
        "from qseg.models import PaperUNet\n"
        f"def tiny():\n    return PaperUNet(widths={TINY})\n"
        "def not_a_model():\n    return 42\n"
        "def broken():\n    raise RuntimeError('no weights here')\n"
        "class Zoo:\n    @staticmethod\n    def tiny():\n        return PaperUNet(widths=(2, 2, 2, 2))\n"
        "import torch\n"
        "class Gate(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)\n"
        "    def forward(self, x):\n        if x.mean() > 0:\n            return self.conv(x)\n        return x\n"
        "def gated():\n    return torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), Gate(), torch.nn.Conv2d(1, 1, 1))\n"
    )
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "argv",
    [[], ["demo"], ["recipes"], ["recipes", "list"], ["recipes", "show"], ["inspect"], ["export"]],
    ids=lambda a: " ".join(a) or "qseg",
)
def test_help_everywhere(capsys, argv):
    code, out, _ = run(capsys, *argv, "--help")
    assert code == 0
    assert out.startswith(f"usage: qseg{' ' if argv else ''}{' '.join(argv)}")


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"qseg {qseg.__version__}"


def test_no_command_is_a_usage_error(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "COMMAND" in err


def test_console_script_entry_point_is_main():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "qseg"]
    assert script.value == "qseg.cli:main" and script.load() is cli.main


# ---- recipes -------------------------------------------------------------------------------


def test_recipes_lists_every_builtin_with_its_headline(capsys):
    code, out, _ = run(capsys, "recipes")
    assert code == 0
    lines = out.splitlines()
    for name in builtin_names():
        (line,) = [x for x in lines if x.split()[:1] == [name]]
        headline = line[len(name) :].strip()
        assert headline and load(name).description.startswith(headline.removesuffix(" ...").rstrip())
    assert f"{len(builtin_names())} built-in recipes" in out
    assert run(capsys, "recipes", "list")[1] == out


@pytest.mark.parametrize("name", builtin_names())
def test_recipes_show_prints_yaml_that_loads_back(capsys, name):
    code, out, _ = run(capsys, "recipes", "show", name)
    assert code == 0
    assert qseg.Recipe.from_dict(yaml.safe_load(out)) == load(name)


def test_recipes_show_a_yaml_file(capsys, tmp_path):
    data = load("unet-qa6.0-qw0.4").to_dict()
    data.update(name="mine", weights={"kind": "fixed_point", "int_bits": 0, "frac_bits": 6})
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    code, out, _ = run(capsys, "recipes", "show", str(path))
    shown = yaml.safe_load(out)
    assert code == 0 and shown["name"] == "mine" and shown["weights"]["frac_bits"] == 6


def test_recipes_show_bad_name_exits_2_with_the_recipe_error(capsys, tmp_path):
    code, out, err = run(capsys, "recipes", "show", "no-such-recipe")
    assert code == 2 and out == ""
    assert err.startswith("qseg recipes: error: unknown recipe 'no-such-recipe'")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nweights: {kind: fixed_point, int_bits: 0, frac_bits: 40}\n")
    code, _, err = run(capsys, "recipes", "show", str(bad))
    assert code == 2 and "weights.frac_bits" in err


# ---- inspect -------------------------------------------------------------------------------


def test_inspect_prints_the_report_of_prepare(capsys, factory_module):
    code, out, _ = run(capsys, "inspect", f"{factory_module}:tiny", "--input-shape", "1,1,16,16")
    expected = qseg.prepare(PaperUNet(widths=TINY), example_inputs=torch.randn(1, 1, 16, 16)).qseg_report
    assert code == 0 and out.strip() == str(expected)


def test_inspect_with_a_recipe_and_a_dotted_factory(capsys, factory_module):
    code, out, _ = run(
        capsys, "inspect", f"{factory_module}:Zoo.tiny", "--input-shape", "1,1,8,8", "--recipe", "fcn-inq7"
    )
    assert code == 0
    assert out.startswith("qseg report: recipe 'fcn-inq7'") and "INQ 7-bit" in out


def test_inspect_the_bundled_unet(capsys):
    code, out, _ = run(capsys, "inspect", "qseg.models:PaperUNet", "--input-shape", "1,1,64,64")
    assert code == 0
    assert "13 of 15 weighted layers quantized" in out and "head " in out


@pytest.mark.parametrize(
    ("model", "shape", "message"),
    [
        ("qseg.models", "1,1,8,8", "MODULE:FACTORY"),
        ("no_such_module_qseg:f", "1,1,8,8", "cannot import module 'no_such_module_qseg'"),
        ("qseg.models:NoSuchNet", "1,1,8,8", "module 'qseg.models' has no attribute 'NoSuchNet'"),
        ("qseg.models:__name__", "1,1,8,8", "is a str, not a callable"),
        ("{m}:not_a_model", "1,1,8,8", "returned a int, not a torch.nn.Module"),
        ("{m}:broken", "1,1,8,8", "failed: RuntimeError: no weights here"),
        ("{m}:Zoo.missing", "1,1,8,8", "has no attribute 'missing'"),
        ("{m}:tiny", "1,1,x,8", "--input-shape takes comma-separated positive integers"),
        ("{m}:tiny", "1,1,0,8", "--input-shape takes comma-separated positive integers"),
        ("{m}:tiny", "1,1,12,12", "the model fails on the example inputs"),
    ],
)
def test_inspect_bad_input_exits_2_with_a_message(capsys, factory_module, model, shape, message):
    code, out, err = run(capsys, "inspect", model.format(m=factory_module), "--input-shape", shape)
    assert code == 2 and out == ""
    assert err.startswith("qseg inspect: error: ") and message in err


def test_inspect_leaf_module_keeps_data_dependent_control_flow_out_of_capture(capsys, factory_module):
    code, _, err = run(capsys, "inspect", f"{factory_module}:gated", "--input-shape", "1,1,8,8")
    assert code == 2 and "could not be captured" in err and "leaf_modules" in err
    code, out, _ = run(
        capsys, "inspect", f"{factory_module}:gated", "--input-shape", "1,1,8,8", "--leaf-module", "1"
    )
    assert code == 0 and "captured with torch.fx" in out


def test_inspect_unknown_recipe_exits_2(capsys):
    code, _, err = run(
        capsys, "inspect", "qseg.models:PaperUNet", "--input-shape", "1,1,8,8", "--recipe", "nah"
    )
    assert code == 2 and "unknown recipe 'nah'" in err


# ---- export --------------------------------------------------------------------------------


@pytest.fixture
def trained_checkpoint(tmp_path, factory_module):
    """A prepared tiny U-Net whose weights and BN statistics differ from a fresh build."""
    torch.manual_seed(1)
    x = torch.randn(2, 1, 16, 16)
    qmodel = qseg.prepare(PaperUNet(widths=TINY), example_inputs=x)
    with torch.no_grad():
        for p in qmodel.parameters():
            p.add_(0.05 * torch.randn_like(p))
    qmodel.train()
    qmodel(x)  # moves the BatchNorm running statistics
    path = tmp_path / "model.pt"
    torch.save(qmodel.state_dict(), path)
    return path, qmodel.eval(), factory_module


def test_export_rebuilds_the_checkpoint_and_converts_it(capsys, tmp_path, trained_checkpoint, monkeypatch):
    path, qmodel, module = trained_checkpoint
    exported = {}

    def fake_export_onnx(model, x, out, weights):
        exported.update(model=model, shape=tuple(x.shape), weights=weights)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(b"\0" * 1500)
        return Path(out)

    # the exporter itself is tested in tests/exporters; here: what the command hands it
    monkeypatch.setattr(qseg, "export_onnx", fake_export_onnx)
    out_file = tmp_path / "out" / "m.onnx"
    code, out, err = run(
        capsys, "export", str(path), "--model", f"{module}:tiny", "--input-shape", "1,1,16,16",
        "--recipe", "unet-qa6.0-qw0.4", "--format", "onnx", "--out", str(out_file),
    )  # fmt: skip
    assert code == 0, err
    assert exported["weights"] == "int8" and exported["shape"] == (1, 1, 16, 16)
    assert f"wrote {out_file} (0.002 MB)" in out and "integer convs: 13" in out
    x = torch.randn(1, 1, 24, 24)
    with torch.no_grad():
        got = exported["model"](x)
        expected = qseg.convert(qmodel)(x)
        fresh = qseg.convert(qseg.prepare(PaperUNet(widths=TINY), example_inputs=x))(x)
    # the converted model of the checkpoint, not a fresh build from the factory
    assert torch.equal(got, expected)
    assert (got - fresh).abs().max() > 1e-2


def test_export_openvino_wiring(capsys, tmp_path, trained_checkpoint, monkeypatch):
    path, _, module = trained_checkpoint
    calls = {}

    def fake_export_openvino(model, x, out, weights):
        calls.update(model=model, shape=tuple(x.shape), weights=weights)
        out = Path(out)
        out.write_text("<xml/>")
        out.with_suffix(".bin").write_bytes(b"\0" * 2000)
        return out

    monkeypatch.setattr(qseg, "export_openvino", fake_export_openvino)
    code, out, _ = run(
        capsys, "export", str(path), "--model", f"{module}:tiny", "--input-shape", "1,1,16,16",
        "--recipe", "unet-qa6.0-qw0.4", "--format", "openvino", "--out", str(tmp_path / "m.xml"),
        "--weights", "int4",
    )  # fmt: skip
    assert code == 0
    assert calls["weights"] == "int4" and calls["shape"] == (1, 1, 16, 16)
    assert hasattr(calls["model"], "qseg_convert")  # converted before export
    assert f"wrote {tmp_path / 'm.bin'} (0.002 MB)" in out


def export_args(checkpoint, module: str, *extra: str) -> list[str]:
    return [
        "export", str(checkpoint), "--model", f"{module}:tiny", "--input-shape", "1,1,16,16",
        "--format", "onnx", "--out", "never.onnx", *extra,
    ]  # fmt: skip


def test_export_checkpoint_of_another_model_exits_2(capsys, tmp_path, factory_module):
    other = qseg.prepare(PaperUNet(widths=(2, 4, 4, 4)), example_inputs=torch.randn(1, 1, 8, 8))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    code, _, err = run(
        capsys, *export_args(tmp_path / "other.pt", factory_module, "--recipe", "unet-qa6.0-qw0.4")
    )
    assert code == 2
    assert "does not fit" in err and "mismatched shapes (enc1.conv1.weight (2, 1, 3, 3)" in err
    assert "Pass the --model, --recipe and --input-shape" in err
    assert not Path("never.onnx").exists()


def test_export_checkpoint_of_another_recipe_exits_2(capsys, tmp_path, factory_module):
    # INQ's quantizers keep their bounds in the state_dict; fixed point has none
    inq = qseg.prepare(PaperUNet(widths=TINY), "fcn-inq7", example_inputs=torch.randn(1, 1, 8, 8))
    torch.save(inq.state_dict(), tmp_path / "inq.pt")
    code, _, err = run(
        capsys, *export_args(tmp_path / "inq.pt", factory_module, "--recipe", "unet-qa6.0-qw0.4")
    )
    assert code == 2 and "unexpected keys (enc1.conv1.weight_quant.n1" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ([1, 2, 3], "holds a list, not a state_dict"),
        (b"not a torch file", "cannot read checkpoint"),
    ],
)
def test_export_unreadable_checkpoint_exits_2(capsys, tmp_path, factory_module, content, message):
    path = tmp_path / "ckpt.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    code, _, err = run(capsys, *export_args(path, factory_module, "--recipe", "unet-qa6.0-qw0.4"))
    assert code == 2 and err.startswith("qseg export: error: ") and message in err


def test_export_requires_recipe_and_format(capsys, tmp_path):
    code, _, err = run(capsys, "export", str(tmp_path / "m.pt"), "--model", "a:b", "--input-shape", "1")
    assert code == 2 and "--recipe" in err and "--format" in err and "--out" in err
    code, _, err = run(capsys, *export_args("m.pt", "a", "--recipe", "x", "--weights", "int2"))
    assert code == 2 and "invalid choice: 'int2'" in err


# ---- demo ----------------------------------------------------------------------------------


def test_demo_calls_run_with_typed_arguments_and_prints(capsys, monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("qseg.demo")

    def fake_run(out, seed, fast, threads, recipe):
        calls.append((out, seed, fast, threads, recipe))
        return types.SimpleNamespace(table="dice table", figure=out / "figure.png")

    fake.run = fake_run
    monkeypatch.setitem(sys.modules, "qseg.demo", fake)
    argv = ("--out", str(tmp_path), "--seed", "3", "--fast", "--threads", "2", "--recipe", "unet-bnn")
    code, out, _ = run(capsys, "demo", *argv)
    assert code == 0 and calls == [(tmp_path, 3, True, 2, "unet-bnn")]
    assert out == f"dice table\nfigure: {tmp_path / 'figure.png'}\n"
    code, _, _ = run(capsys, "demo")
    assert code == 0 and calls[-1] == (Path("qseg-demo"), 0, False, None, "unet-qa6.0-qw0.4")


def test_demo_without_its_extras_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "qseg.demo", None)  # import fails as for a missing package
    code, _, err = run(capsys, "demo")
    assert code == 2 and 'pip install "qseg[demo]"' in err


def test_demo_bad_threads_exits_2(capsys):
    code, _, err = run(capsys, "demo", "--threads", "0")
    assert code == 2 and "--threads must be a positive integer" in err
    code, _, err = run(capsys, "demo", "--seed", "x")
    assert code == 2 and "invalid int value: 'x'" in err
