"""What the benchmarks print about the machine they ran on."""

from __future__ import annotations

import os

import torch

from qseg.runtime import cpu_features


def cpu_name() -> str:
    """The CPU model and its int8 / bf16 flags (``qseg.runtime.cpu_features``), e.g.
    ``AMD EPYC (avx2)``."""
    return cpu_features().describe()


def torch_kernels() -> str:
    """The instruction set PyTorch's own kernels and its oneDNN convolutions run, e.g.
    ``ATen AVX512, oneDNN default``.

    Both can be held below the CPU's with ``ATEN_CPU_CAPABILITY=avx2
    ONEDNN_MAX_CPU_ISA=AVX2``, which runs the AVX2 kernels an AVX2-only CPU would run (on
    this CPU's cores, caches and memory, so it is a proxy for such a CPU, not a measurement
    of one).
    """
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "default"
    return f"ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN {onednn}"
