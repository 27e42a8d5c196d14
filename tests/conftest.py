"""Shared test set-up: deterministic hypothesis runs and seeded torch."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# derandomize: every run draws the same examples, so CI is reproducible; raise
# max_examples locally with HYPOTHESIS_PROFILE=thorough to search harder.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=60,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
