"""What the benchmarks print about the machine they ran on."""

from __future__ import annotations

from qseg.runtime import cpu_features


def cpu_name() -> str:
    """The CPU model and its int8 / bf16 flags (``qseg.runtime.cpu_features``), e.g.
    ``AMD EPYC (avx2)``."""
    return cpu_features().describe()
