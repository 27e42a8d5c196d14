"""How :func:`qseg.calibrate` turns the values a quantizer saw into its range: a percentile
of them (exact, from the tail that holds it, without sorting the rest) or the shrink of the
observed range whose grid quantizes them with the least squared error."""

from __future__ import annotations

import math

import torch

from qseg.errors import DataError
from qseg.quantizers import Quantizer

__all__ = ["extremes", "mse_range", "quantile"]

# the row length extremes() splits values into to find a threshold for their tail
TAIL_ROW = 65536
# mse_range: candidate ranges are these fractions of the observed range
MSE_FRACTIONS = torch.linspace(0.2, 1.0, 81)


def extremes(values: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """The ``k`` largest (or smallest) of ``values`` (1-d), the most extreme first: what a
    full sort gives, at a fraction of its cost on millions of values.

    Split into rows, the ``ceil(k / rows)`` most extreme of each row give a threshold that at
    least ``k`` values pass, so each of the ``k`` most extreme passes it too; only the values
    that pass are ranked.

    Raises:
        DataError: ``k`` is not between 1 and the number of values.

    Example:
        >>> import torch
        >>> extremes(torch.tensor([3.0, -1.0, 7.0, 0.5, 7.0]), 3)
        tensor([7., 7., 3.])
        >>> extremes(torch.tensor([3.0, -1.0, 7.0, 0.5]), 2, largest=False)
        tensor([-1.0000,  0.5000])
    """
    if not 0 < k <= values.numel():
        raise DataError(f"extremes: k must be in 1..{values.numel()} (the number of values), got {k}")
    rows = values.numel() // TAIL_ROW
    per_row = -(-k // rows) if rows else 0
    if rows >= 2 and per_row <= TAIL_ROW // 4:
        block = values[: rows * TAIL_ROW].view(rows, TAIL_ROW)
        bounds = torch.topk(block, per_row, dim=1, largest=largest).values[:, -1]
        values = values[values >= bounds.min()] if largest else values[values <= bounds.max()]
    return torch.topk(values, k, largest=largest, sorted=True).values


def quantile(values: torch.Tensor, q: float) -> float:
    """``torch.quantile(values.double(), q)`` (linear interpolation) of a 1-d tensor,
    bit for bit, from the tail that holds it: the percentile method's range ends. It ranks
    only that tail instead of sorting the two million values a quantizer keeps from 32
    batches (twice: one sort per end), and has no limit on their number (torch's is 2**24).

    Raises:
        DataError: no values, or ``q`` outside [0, 1].

    Example:
        >>> import torch
        >>> values = torch.arange(101, dtype=torch.float32)
        >>> quantile(values, 0.99), quantile(values, 0.005)
        (99.0, 0.5)
    """
    n = values.numel()
    if n == 0 or not 0.0 <= q <= 1.0:
        raise DataError(f"quantile needs at least one value and q in [0, 1]; got {n} values, q={q}")
    rank = q * (n - 1)  # as torch.quantile computes it: the same interpolation weight
    below = math.floor(rank)
    if q >= 0.5:  # the largest n - below values, largest first
        tail = extremes(values, n - below, largest=True)
        near, far = tail[n - 1 - below], tail[max(n - 2 - below, 0)]
    else:
        tail = extremes(values, min(below + 2, n), largest=False)
        near, far = tail[below], tail[min(below + 1, n - 1)]
    weight = torch.tensor(rank - below, dtype=torch.float64)
    return float(torch.lerp(near.double(), far.double(), weight))


def mse_range(q: Quantizer, values: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
    """The shrink of ``[lo, hi]`` (by one of :data:`MSE_FRACTIONS`) whose grid quantizes
    ``values`` with the least squared error; it leaves ``q`` set to the last candidate.

    Example:
        >>> import torch
        >>> from qseg.quantizers import Uniform
        >>> values = torch.cat([torch.rand(10000), torch.tensor([20.0])])  # one outlier
        >>> lo, hi = mse_range(Uniform(4, mode="unsigned"), values, 0.0, 20.0)
        >>> hi < 20.0
        True
    """
    best, best_error = (lo, hi), float("inf")
    for fraction in MSE_FRACTIONS.tolist():
        q.observe_range(torch.tensor(lo * fraction), torch.tensor(hi * fraction))
        with torch.no_grad():
            error = float((q(values) - values).pow(2).mean())
        if error < best_error:
            best, best_error = (lo * fraction, hi * fraction), error
    return best
