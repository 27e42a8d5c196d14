"""One torch thread for the suggestive-annotation tests: their tensors are tiny, and on a
shared 2-core machine under load a second OpenMP thread makes each small forward far slower
(measured at load average 7: PaperUNet (4,4,4,4) on 2x1x16x16, 0.17-0.67 s with 2 threads,
6-12 ms with 1). One thread also makes training bitwise reproducible, which the parallel
test relies on: results differ between 1 and 2 threads."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
