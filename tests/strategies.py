"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

finite32 = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)


def tensors(elements: st.SearchStrategy[float] = finite32, min_size: int = 1, max_size: int = 48):
    """1-d float32 tensors drawn from ``elements``."""
    return st.lists(elements, min_size=min_size, max_size=max_size).map(
        lambda xs: torch.tensor(xs, dtype=torch.float32)
    )


def scaled_tensors(max_size: int = 48):
    """Tensors whose magnitudes sit near a random power of two, so that every
    region of a grid (zero, the steps, saturation) is exercised."""
    return st.tuples(
        st.integers(min_value=-12, max_value=8),
        st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=1, max_size=max_size),
    ).map(lambda t: torch.tensor(t[1], dtype=torch.float32) * 2.0 ** t[0])
