"""Transposed convs computed as ordinary convs over their output phases
(``qseg/convert/phases.py``): the same integer sums, and what it buys: OpenVINO runs them int8
on a grid with a zero point, where it runs a Deconvolution in float."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qseg
from qseg.convert.phases import as_phases, interleave
from qseg.exporters import check_parity, openvino_from_onnx, runtime_precisions
from qseg.exporters.parity import parity_step

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@st.composite
def transposed_convs(draw):
    dims = draw(st.integers(1, 3))
    axes = [
        draw(
            st.integers(1, 5).flatmap(
                lambda k: st.integers(1, 4).flatmap(
                    lambda s: st.tuples(
                        st.just(k),
                        st.just(s),
                        st.integers(0, k - 1),
                        st.integers(0, s - 1),
                        st.integers(1, 6),
                    )
                )
            )
        )
        for _ in range(dims)
    ]
    kernel, stride, padding, extra, size = (list(v) for v in zip(*axes, strict=True))
    groups = draw(st.integers(1, 3))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    return kernel, stride, padding, extra, size, c_in, c_out, groups


@settings(max_examples=150, deadline=None)
@given(transposed_convs(), st.integers(0, 2**16))
def test_the_phase_conv_computes_the_transposed_conv_exactly(case, seed):
    kernel, stride, padding, extra, size, c_in, c_out, groups = case
    dims = len(kernel)
    # output_padding must stay below the stride and the output non-empty
    out = [
        (n - 1) * s - 2 * p + k + e
        for n, s, p, k, e in zip(size, stride, padding, kernel, extra, strict=True)
    ]
    if any(o <= 0 for o in out):
        return
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (c_in, c_out // groups, *kernel), generator=gen)
    x = torch.randint(0, 256, (2, c_in, *size), generator=gen).double()  # unsigned codes
    params = {
        "stride": stride,
        "padding": padding,
        "output_padding": extra,
        "dilation": [1] * dims,
        "groups": groups,
    }
    bias = torch.arange(c_out, dtype=torch.float64)
    phase_codes, scale, phase_bias, conv, phases = as_phases(codes, torch.ones(c_out), bias, params)
    got = interleave(
        CONV[dims](x, phase_codes.double(), phase_bias, 1, conv["padding"], 1, conv["groups"]), phases
    )
    expected = CONV_T[dims](x, codes.double(), bias, stride, padding, extra, groups)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)  # integer sums below 2^53: exact in float64
    assert scale.shape == (c_out * torch.tensor(stride).prod().item(),)


class LeakyDecoder(nn.Module):
    """A decoder whose transposed convs read a LeakyReLU's output (a grid with a zero point),
    as nnU-Net's and MONAI UNet's do; ``kernel`` 2 is nnU-Net's (kernel = stride), 3 MONAI's
    (stride 2, padding 1, output padding 1)."""

    def __init__(self, dims: int, kernel: int) -> None:
        super().__init__()
        conv, conv_t, norm = (
            (nn.Conv2d, nn.ConvTranspose2d, nn.InstanceNorm2d)
            if dims == 2
            else (nn.Conv3d, nn.ConvTranspose3d, nn.InstanceNorm3d)
        )
        extra = {"padding": 1, "output_padding": 1} if kernel == 3 else {}
        self.stem = nn.Sequential(conv(1, 8, 3, padding=1), norm(8, affine=True), nn.LeakyReLU(0.01))
        self.down = nn.Sequential(
            conv(8, 8, 3, stride=2, padding=1), norm(8, affine=True), nn.LeakyReLU(0.01)
        )
        self.up = conv_t(8, 8, kernel, stride=2, **extra)
        self.head = conv(16, 2, 1)

    def forward(self, x):
        skip = self.stem(x)
        return self.head(torch.cat([self.up(self.down(skip)), skip], dim=1))


@pytest.mark.parametrize(("dims", "kernel"), [(2, 2), (2, 3), (3, 2)])
def test_transposed_convs_on_a_zero_point_grid_run_int8_with_parity(dims, kernel, tmp_path):
    pytest.importorskip("openvino")
    torch.manual_seed(0)
    shape = (1, 1, 16, 16) if dims == 2 else (1, 1, 8, 8, 8)
    model, x = LeakyDecoder(dims, kernel).eval(), torch.randn(shape)
    q = qseg.prepare(model, "int8", example_inputs=x)
    qseg.calibrate(q, [torch.randn(shape) for _ in range(2)], progress=False)
    c = qseg.convert(q.eval())
    assert c.qseg_convert.phase_layers == ["up"]
    with torch.no_grad():
        assert (c(x) - q(x)).abs().max() <= parity_step(c) * 1.001
    onnx_path = qseg.export_onnx(c, x, tmp_path / "m.onnx")
    ir_path = openvino_from_onnx(onnx_path, tmp_path / "m.xml")
    kinds = ("Convolution", "Deconvolution")
    precisions = runtime_precisions(ir_path, layer_types=kinds)
    # stem (first layer), down, the phase conv, head: all int8, no Deconvolution left
    assert [(p.layer_type, p.precision in ("u8", "i8")) for p in precisions] == [("Convolution", True)] * 4
    for result in check_parity(c, x, onnx_path, ir_path):
        assert result.ok, result


def _converted(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    q = qseg.prepare(model.eval(), "int8", example_inputs=x)
    qseg.calibrate(q, [x], progress=False)
    return q, qseg.convert(q.eval())


def test_a_grouped_transposed_conv_takes_the_phase_form_on_any_input(tmp_path):
    """Its BatchNorm fold gives each output channel its own scale, which a transposed conv's
    weight (one slice along the channel axis for all groups) cannot hold; the phase conv's can."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.LeakyReLU(0.01), nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2),
        nn.BatchNorm2d(8), nn.LeakyReLU(0.01), nn.Conv2d(8, 1, 1),
    )  # fmt: skip
    model[3].running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 1, 8, 8)
    q, c = _converted(model, x)
    assert c.qseg_convert.phase_layers == ["2"] and c.qseg_convert.folded_norms == ["3"]
    with torch.no_grad():
        assert (c(x) - q(x)).abs().max() <= parity_step(c) * 1.001
    onnx_path = qseg.export_onnx(c, x, tmp_path / "m.onnx")
    (result,) = check_parity(c, x, onnx_path)
    assert result.ok, result


def test_a_dilated_transposed_conv_stays_one_and_convert_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.LeakyReLU(0.01), nn.ConvTranspose2d(8, 8, 3, stride=2, dilation=2),
        nn.LeakyReLU(0.01), nn.Conv2d(8, 1, 1),
    )  # fmt: skip
    x = torch.randn(1, 1, 8, 8)
    q, c = _converted(model, x)
    assert c.qseg_convert.phase_layers == []
    assert any(w.startswith("2: ") and "no phase form" in w for w in c.qseg_convert.warnings), c.qseg_convert
    with torch.no_grad():
        assert (c(x) - q(x)).abs().max() <= parity_step(c) * 1.001
