"""Segmentation scores on binary masks."""

from __future__ import annotations

import numpy as np
import torch

from qseg.errors import DataError

__all__ = ["dice_score"]


def dice_score(prediction: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray) -> float:
    """Dice coefficient ``2 |P n T| / (|P| + |T|)`` of two binary masks, pooled over
    every pixel of every image (not averaged per image); 1.0 when both are empty.

    Args:
        prediction: a mask of 0/1 (or booleans) of any shape.
        truth: a mask of the same shape.

    Example:
        >>> dice_score(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0]))
        0.6666666666666666
    """
    p = torch.as_tensor(prediction)
    t = torch.as_tensor(truth)
    if p.shape != t.shape:
        raise DataError(f"prediction {tuple(p.shape)} and truth {tuple(t.shape)} differ in shape")
    p = p.bool()
    t = t.bool()
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((p & t).sum()) / total
