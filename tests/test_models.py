"""The reference models: shapes, parameter count, FX tracing, dropout option, training, size checks."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from qseg import QsegError
from qseg.errors import ModelError
from qseg.models import PaperUNet, TwoHeadFCN

NARROW = (8, 16, 32, 32)  # fast PaperUNet copy for every test that runs a forward


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


# ---------------------------------------------------------------- PaperUNet


def test_paper_unet_default_parameter_count():
    # built only, no forward: the full-width model is slow on CPU at useful sizes
    model = PaperUNet()
    assert 4.80e6 <= n_params(model) <= 4.87e6
    # pins the decoder arrangement cat(256+256)->256, cat(256+128)->128, cat(128+64)->64
    assert n_params(model) == 4_836_737
    assert model.dec3.conv1.in_channels == 512 and model.dec3.conv1.out_channels == 256
    assert model.dec2.conv1.in_channels == 384 and model.dec2.conv1.out_channels == 128
    assert model.dec1.conv1.in_channels == 192 and model.dec1.conv1.out_channels == 64
    assert model.bottleneck.conv2.out_channels == 256
    assert model.head.kernel_size == (1, 1) and model.head.out_channels == 1


def test_paper_unet_layout():
    model = PaperUNet(widths=NARROW)
    names = [name for name, _ in model.named_children()]
    assert names == [
        "enc1", "pool1", "enc2", "pool2", "enc3", "pool3", "bottleneck", "dropout",
        "up3", "dec3", "up2", "dec2", "up1", "dec1", "head",
    ]  # fmt: skip
    for block in (model.enc1, model.enc2, model.enc3, model.bottleneck, model.dec3, model.dec2, model.dec1):
        assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
        assert block.conv1.kernel_size == (3, 3) and block.conv1.padding == (1, 1)
        assert not block.relu1.inplace
    assert count(model, nn.Conv2d) == 15
    assert count(model, nn.MaxPool2d) == 3
    for up in (model.up3, model.up2, model.up1):
        assert up.mode == "bilinear" and up.scale_factor == 2 and up.align_corners is False
    assert count(model, nn.Sigmoid) == 0


@pytest.mark.parametrize(
    ("shape", "in_channels", "out_channels"),
    [((1, 1, 64, 64), 1, 1), ((2, 1, 200, 200), 1, 1), ((2, 3, 24, 40), 3, 2)],
)
def test_paper_unet_output_shape(shape, in_channels, out_channels):
    model = PaperUNet(in_channels, out_channels, widths=NARROW).eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (shape[0], out_channels, *shape[2:])
    assert torch.isfinite(out).all()


def test_paper_unet_dropout_option():
    plain = PaperUNet(widths=NARROW)
    assert count(plain, nn.Dropout) + count(plain, nn.Dropout2d) == 0
    assert isinstance(plain.dropout, nn.Identity)

    dropped = PaperUNet(widths=NARROW, dropout=0.3)
    drops = [m for m in dropped.modules() if isinstance(m, nn.Dropout2d)]
    assert len(drops) == 1 and drops[0] is dropped.dropout and drops[0].p == 0.3

    # dropout has no state: the same weights load into both, and they agree in eval mode
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x), plain.eval()(x), rtol=0, atol=0)
        # in training mode Dropout2d zeroes whole bottleneck channels, so the output changes
        assert not torch.equal(dropped.train()(x), plain.train()(x))


def test_paper_unet_check_input_size():
    for h, w in [(8, 8), (200, 200), (256, 256), (64, 200)]:
        PaperUNet.check_input_size(h, w)
        PaperUNet(widths=NARROW).check_input_size(h, w)  # also on an instance
    for h, w in [(30, 30), (200, 30), (0, 8), (-8, 8), (4, 8), (8.0, 8)]:
        with pytest.raises(ModelError, match="divisible by 8") as info:
            PaperUNet.check_input_size(h, w)
        assert isinstance(info.value, ValueError) and isinstance(info.value, QsegError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"widths": (64, 128, 256)}, r"widths must be a sequence of 4 positive integers"),
        ({"widths": (64, 128, 0, 256)}, r"widths must be a sequence of 4"),
        ({"widths": 64}, r"widths must be a sequence of 4"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout must be a number in \[0, 1\)"),
        ({"in_channels": 0}, r"in_channels must be a positive integer, got 0"),
        ({"out_channels": True}, r"out_channels must be a positive integer"),
    ],
)
def test_paper_unet_bad_arguments(kwargs, message):
    with pytest.raises(ModelError, match=message):
        PaperUNet(**kwargs)


# ---------------------------------------------------------------- TwoHeadFCN


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 100, 52)])
def test_two_head_fcn_outputs(shape):
    model = TwoHeadFCN().eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert isinstance(out, tuple) and len(out) == 2
    for logits in out:
        assert logits.shape == (shape[0], 2, *shape[2:])
        assert torch.isfinite(logits).all()
    assert not torch.equal(out[0], out[1])  # two heads, not one output twice


def test_two_head_fcn_layout():
    model = TwoHeadFCN()
    assert n_params(model) < 1_000_000
    assert count(model, nn.ConvTranspose2d) == 2
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout2d)]
    assert len(drops) == 1 and drops[0].p == 0.5
    assert TwoHeadFCN(in_channels=1, num_classes=3)(torch.randn(1, 1, 16, 16))[1].shape == (1, 3, 16, 16)
    TwoHeadFCN.check_input_size(100, 52)
    with pytest.raises(ModelError, match="divisible by 4"):
        TwoHeadFCN.check_input_size(30, 32)
    with pytest.raises(ModelError, match="widths must be a sequence of 3"):
        TwoHeadFCN(widths=(32, 64))


# ---------------------------------------------------------------- both


def _models() -> list[tuple[nn.Module, torch.Tensor]]:
    return [
        (PaperUNet(widths=NARROW, dropout=0.2), torch.randn(2, 1, 48, 40)),
        (TwoHeadFCN(widths=(8, 16, 32)), torch.randn(2, 3, 36, 44)),
    ]


@pytest.mark.parametrize("index", [0, 1], ids=["PaperUNet", "TwoHeadFCN"])
def test_fx_trace_matches_eager(index):
    model, x = _models()[index]
    model.eval()
    graph_module = torch.fx.symbolic_trace(model)
    assert isinstance(graph_module, torch.fx.GraphModule)
    targets = {node.target for node in graph_module.graph.nodes if node.op == "call_module"}
    assert "dropout" in targets and "enc1.conv1" in targets  # readable names survive tracing
    with torch.no_grad():
        expected, actual = model(x), graph_module(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("index", [0, 1], ids=["PaperUNet", "TwoHeadFCN"])
def test_one_training_step(index):
    model, x = _models()[index]
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = model(x)
    if isinstance(out, tuple):
        objects = torch.randint(0, 2, (x.shape[0], *x.shape[2:]))
        contours = torch.randint(0, 2, (x.shape[0], *x.shape[2:]))
        loss = nn.functional.cross_entropy(out[0], objects) + nn.functional.cross_entropy(out[1], contours)
    else:
        target = (torch.rand_like(out) > 0.5).float()
        loss = nn.functional.binary_cross_entropy_with_logits(out, target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
