"""Models FX cannot capture faithfully: the mis-trace is caught and the
torch.export + module-swap path quantizes them; the untraceable raise TraceError."""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import quantizers_bypassed
from torch import nn

import qseg
from qseg.nn import ActQuant, QuantConv2d


class MisTraced(nn.Module):
    """FX traces it without error into a wrong graph, like MONAI's BasicUNet:
    ``torch.jit.isinstance`` is False on a proxy, so the skip is dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.drop = nn.Dropout2d(0.3)
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)))
        z = F.relu(self.b2(self.c2(self.drop(y))))
        if torch.jit.isinstance(y, torch.Tensor):
            z = z + y
        return self.head(self.b3(self.c3(z)))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        if y.mean() > 0:
            y = -y
        return self.c2(y)


def test_mis_trace_is_detected_and_the_fallback_quantizes():
    torch.manual_seed(0)
    model = MisTraced()
    x = torch.randn(2, 1, 16, 16)
    q = qseg.prepare(model, example_inputs=x)
    report = q.qseg_report
    assert "torch.export + module swap" in report.capture
    assert "does not reproduce the model" in report.capture
    rows = {r.name: r for r in report.layers}
    assert rows["c1"].weights == "float: first layer" and rows["head"].weights == "float: last layer"
    assert type(q.c2) is QuantConv2d and type(q.c3) is QuantConv2d
    assert isinstance(q.b1.act_quant, ActQuant) and isinstance(q.b2.act_quant, ActQuant)
    # after each BatchNorm (its ReLU is an aten op the policy reads), and on c3's input:
    # the residual addition is off the grid
    after_bn = {a.after for a in report.activations if a.rule == "after BatchNorm"}
    assert after_bn == {"b1", "b2", "b3"}
    assert {r.name: r.input for r in report.layers}["c3"].startswith("Q6.0 unsigned from add")
    assert isinstance(q.c3.input_quant, ActQuant)
    assert report.dropout_removed == ["drop"] and isinstance(q.drop, nn.Identity)
    # the user's model is untouched, the copy computes the eager model's function when bypassed
    assert type(model.c2) is nn.Conv2d and not hasattr(model.b1, "act_quant")
    q.eval()
    model.eval()
    with quantizers_bypassed(q):
        torch.testing.assert_close(q(x), model(x))


def test_fallback_model_keeps_names_trains_and_round_trips():
    torch.manual_seed(0)
    model = MisTraced()
    x = torch.randn(2, 1, 16, 16)
    q = qseg.prepare(model, example_inputs=x)
    assert [n for n, _ in q.named_parameters()] == [n for n, _ in model.named_parameters()]
    q.load_state_dict(model.state_dict(), strict=True)
    opt = torch.optim.Adam(q.parameters(), 1e-2)
    before = q.c2.weight.detach().clone()
    loss = q(x).pow(2).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, q.c2.weight)
    buf = io.BytesIO()
    torch.save(q, buf)  # the hooks are module-level functions: the whole model pickles
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    q.eval()
    again.eval()
    assert torch.equal(q(x), again(x))


def test_untraceable_model_raises_trace_error_naming_the_line():
    with pytest.raises(qseg.TraceError) as info:
        qseg.prepare(DataDependent(), example_inputs=torch.randn(1, 1, 8, 8))
    message = str(info.value)
    assert "test_fallback.py" in message and "if y.mean() > 0" in message
    assert "torch.fx" in message and "torch.export" in message and "What to do" in message


def test_trace_error_names_the_users_line_when_their_project_folder_is_named_qseg(tmp_path):
    # qseg's own frames are recognised by where qseg is installed, not by a folder name
    project = tmp_path / "qseg" / "torch"
    project.mkdir(parents=True)
    (project / "user_net.py").write_text(
        "import torch\n"
        "class UserNet(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.c = torch.nn.Conv2d(1, 1, 3)\n"
        "    def forward(self, x):\n"
        "        y = self.c(x)\n"
        "        if y.mean() > 0:  # the user's data-dependent line\n"
        "            return y\n"
        "        return -y\n"
    )
    spec = importlib.util.spec_from_file_location("user_net", project / "user_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(qseg.TraceError) as info:
        qseg.prepare(module.UserNet(), example_inputs=torch.randn(1, 1, 8, 8))
    assert "user_net.py:8 in forward: if y.mean() > 0" in str(info.value)


def test_a_dropout_held_under_two_names_is_removed_under_both():
    class Shared(MisTraced):
        def __init__(self):
            super().__init__()
            self.drop2 = self.drop  # as MONAI's MLPBlock does

    q = qseg.prepare(Shared(), example_inputs=torch.randn(2, 1, 16, 16))
    assert "torch.export" in q.qseg_report.capture
    assert isinstance(q.drop, nn.Identity) and isinstance(q.drop2, nn.Identity)
    assert set(q.qseg_report.dropout_removed) == {"drop", "drop2"}


class MisTracedInstanceNorm(nn.Module):
    """The mis-trace of :class:`MisTraced` on conv -> InstanceNorm -> LeakyReLU blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(1, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True)
        self.c2, self.n2 = nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.n1(self.c1(x)))
        z = F.leaky_relu(self.n2(self.c2(y)))
        if torch.jit.isinstance(y, torch.Tensor):
            z = z + y
        return self.head(z)


def test_the_fallback_quantizes_norm_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    recipe = qseg.recipes.load("int8").replace(quantize_norm_inputs=True)
    q = qseg.prepare(MisTracedInstanceNorm(), recipe, example_inputs=x)
    assert "torch.export + module swap" in q.qseg_report.capture
    before_norm = {a.after: a.rule for a in q.qseg_report.activations if "per-sample norm" in a.rule}
    assert set(before_norm) == {"c1", "c2"}
    assert isinstance(q.c1.act_quant, ActQuant) and isinstance(q.c2.act_quant, ActQuant)
    qseg.calibrate(q, [x], progress=False)
    quantizer = q.c2.act_quant.quantizer
    with torch.no_grad():
        out = q.c2(torch.randn(2, 8, 16, 16))  # the module's output hook quantizes it
    codes = out / quantizer.scale + quantizer.zero_point
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
    assert codes.unique().numel() > 10  # on the grid, not collapsed
