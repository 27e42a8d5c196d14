"""qseg.plots: files written as valid PNGs of the expected size, the overlay's colours
and dice, the grid drawn for every quantizer, and the error without matplotlib."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qseg
from qseg import plots
from qseg.errors import QsegError
from qseg.models import PaperUNet
from qseg.quantizers import Binary, DoReFa, FixedPoint, PowerOfTwo, Ternary, TernaryTanh

pytest.importorskip("matplotlib")
from PIL import Image  # matplotlib depends on Pillow


def png_size(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


@pytest.fixture(scope="module")
def tiny_qmodel():
    torch.manual_seed(0)
    return qseg.prepare(PaperUNet(widths=(4, 8, 8, 8)), example_inputs=torch.randn(1, 1, 16, 16))


def square(lo: int, hi: int, size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[lo:hi, lo:hi] = True
    return mask


# ---- prediction_overlay --------------------------------------------------------------------


def test_overlay_writes_one_panel_per_prediction(tmp_path):
    truth = square(8, 24)
    preds = {"float": square(10, 26), "quantized (OpenVINO)": torch.from_numpy(square(6, 20)).float()}
    path = plots.prediction_overlay(
        np.random.rand(1, 32, 32), truth, preds, tmp_path / "a" / "o.png", title="t"
    )
    assert path == tmp_path / "a" / "o.png"
    # 2.6 inches per panel (input, truth, two predictions) x 3.2 inches, at 100 dpi
    assert png_size(path) == (1040, 320)


def test_overlay_colours_each_outcome():
    truth = np.array([[1, 1, 0, 0]], bool)
    pred = np.array([[1, 0, 1, 0]], bool)
    rgb = plots._overlay_rgb(pred, truth)
    assert [tuple(c) for c in rgb[0]] == [
        plots.TRUE_POSITIVE,
        plots.FALSE_NEGATIVE,
        plots.FALSE_POSITIVE,
        (0, 0, 0),
    ]


@pytest.mark.parametrize(
    ("truth", "preds", "message"),
    [
        (square(0, 4), {"p": np.full((32, 32), 0.7)}, "prediction 'p' must be a binary mask"),
        (square(0, 4), {"p": square(0, 4, size=16)}, "prediction 'p' has shape (16, 16)"),
        (square(0, 4), {}, "predictions is empty"),
        (np.zeros((2, 32, 32)), {"p": square(0, 4)}, "truth must be a 2-D image"),
    ],
)
def test_overlay_rejects_bad_masks(tmp_path, truth, preds, message):
    with pytest.raises(QsegError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plots.prediction_overlay(np.zeros((32, 32)), truth, preds, tmp_path / "o.png")
    assert not (tmp_path / "o.png").exists()


# ---- weight_histograms and the grid --------------------------------------------------------


def test_histograms_of_every_quantized_layer(tmp_path, tiny_qmodel):
    path = plots.weight_histograms(tiny_qmodel, tmp_path / "w.png")
    assert len(tiny_qmodel.qseg_report.quantized_layers) == 13
    # 13 layers: 4 columns x 4 rows of 4.2 x 3.0 inches
    assert png_size(path) == (1680, 1200)


def test_histograms_of_chosen_layers(tmp_path, tiny_qmodel):
    path = plots.weight_histograms(tiny_qmodel, tmp_path / "w.png", layers=["enc1.conv2", "head"][:1])
    assert png_size(path) == (420, 300)


def test_histograms_reject_unknown_and_float_layers(tmp_path, tiny_qmodel):
    with pytest.raises(QsegError, match=r"'enc1.conv1'.*choose from enc1.conv2, enc2.conv1"):
        plots.weight_histograms(tiny_qmodel, tmp_path / "w.png", layers=["enc1.conv1"])  # kept float
    with pytest.raises(QsegError, match="has no quantized layer"):
        plots.weight_histograms(PaperUNet(widths=(2, 2, 2, 2)), tmp_path / "w.png")


def test_histograms_find_a_functional_conv(tmp_path):
    class Functional(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.w = torch.nn.Parameter(torch.randn(4, 4, 3, 3) * 0.2)
            self.last = torch.nn.Conv2d(4, 1, 1)

        def forward(self, x):
            return self.last(torch.nn.functional.conv2d(self.first(x), self.w, padding=1))

    qmodel = qseg.prepare(
        Functional(),
        {"name": "w", "weights": {"kind": "fixed_point", "int_bits": 0, "frac_bits": 3}},
        example_inputs=torch.randn(1, 1, 8, 8),
    )
    assert list(plots._quantized_weights(qmodel)) == ["w"]
    assert png_size(plots.weight_histograms(qmodel, tmp_path / "f.png")) == (420, 300)


QUANTIZERS = [
    FixedPoint(0, 4),
    FixedPoint(2, 2, signed=False),
    FixedPoint(0, 3, overflow="wrap"),
    PowerOfTwo(bits=5),
    Binary(),
    Binary(scale="mean"),
    DoReFa(1),
    DoReFa(3),
    Ternary(),
    Ternary(channel_axis=0),
    TernaryTanh().eval(),
]
# how many values each grid holds for a (4, ...) tensor
GRID_SIZES = [31, 16, 17, 17, 2, 2, 2, 8, 3, 9, 3]


@pytest.mark.parametrize(("quantizer", "size"), list(zip(QUANTIZERS, GRID_SIZES, strict=True)), ids=repr)
def test_grid_size(quantizer, size):
    x = torch.linspace(-1.5, 1.5, 4 * 25).reshape(4, 25) * torch.tensor([[1.0], [0.5], [0.25], [2.0]])
    grid = plots.quantizer_grid(quantizer, x)
    assert len(grid) == size and np.all(np.diff(grid) > 0)


@given(
    index=st.integers(0, len(QUANTIZERS) - 1),
    values=st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=4, max_size=24),
)
def test_every_quantized_value_lies_on_the_drawn_grid(index, values):
    quantizer = QUANTIZERS[index]
    x = torch.tensor(values[: len(values) // 4 * 4]).reshape(4, -1)
    if isinstance(quantizer, PowerOfTwo) and x.abs().max() == 0:
        return  # an all-zero tensor defines no power-of-two bounds
    grid = plots.quantizer_grid(quantizer, x)
    out = quantizer(x).double().numpy().ravel()
    # the grid is drawn in float64; the quantizer computes in float32 (DoReFa's 7 * (1 / 7)
    # is 1.0 there and 1.00000004 in the drawing): on the grid up to float32 rounding
    on_grid = np.isclose(out[:, None], grid[None, :], rtol=1e-6, atol=0).any(axis=1)
    assert on_grid.all(), (out[~on_grid], grid)


def test_power_of_two_grid_follows_fixed_bounds():
    q = PowerOfTwo(bits=4)
    q.fix_bounds(torch.tensor([0.9]))  # n1 = 0, n2 = -3
    grid = plots.quantizer_grid(q, torch.tensor([100.0]))  # ignored: the bounds are fixed
    assert grid.tolist() == [-1, -0.5, -0.25, -0.125, 0, 0.125, 0.25, 0.5, 1]


# ---- uncertainty_map -----------------------------------------------------------------------


def test_uncertainty_map_one_column_per_image(tmp_path):
    images = torch.rand(3, 1, 16, 16)
    maps = [np.random.rand(16, 16) * 0.1 for _ in range(3)]
    path = plots.uncertainty_map(images, maps, tmp_path / "u.png", scores=[0.1, 0.2, 0.3])
    # 3 columns of 2.2 inches plus 0.8 for the colour bar, one block of 4.4 inches
    assert png_size(path) == (740, 440)


def test_uncertainty_map_wraps_after_eight_images(tmp_path):
    path = plots.uncertainty_map(np.random.rand(10, 8, 8), np.random.rand(10, 8, 8), tmp_path / "u.png")
    assert png_size(path) == (1840, 880)


@pytest.mark.parametrize(
    ("images", "maps", "scores", "message"),
    [
        (np.zeros((2, 8, 8)), np.zeros((3, 8, 8)), None, "2 images but 3 uncertainty maps"),
        (np.zeros((2, 8, 8)), np.zeros((2, 8, 9)), None, r"image 0 has shape \(8, 8\)"),
        (np.zeros((2, 8, 8)), np.zeros((2, 8, 8)), [1.0], "1 scores for 2 images"),
        (np.zeros((8, 8)), np.zeros((8, 8)), None, "one 2-D map per image"),
        ([], [], None, "images is empty"),
    ],
)
def test_uncertainty_map_rejects_mismatches(tmp_path, images, maps, scores, message):
    with pytest.raises(QsegError, match=message):
        plots.uncertainty_map(images, maps, tmp_path / "u.png", scores=scores)


# ---- without matplotlib --------------------------------------------------------------------


def test_missing_matplotlib_says_what_to_install(tmp_path, monkeypatch, tiny_qmodel):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as for a missing package
    calls = [
        lambda: plots.prediction_overlay(
            np.zeros((4, 4)), square(0, 1, 4), {"p": square(0, 1, 4)}, tmp_path / "o.png"
        ),
        lambda: plots.weight_histograms(tiny_qmodel, tmp_path / "w.png"),
        lambda: plots.uncertainty_map(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), tmp_path / "u.png"),
    ]
    for call in calls:
        with pytest.raises(QsegError, match=r'pip install "qseg\[plot\]"'):
            call()
    assert not list(tmp_path.iterdir())
