"""Where OpenVINO spends the time of one inference: per-node performance counters, shared by
``deploy.py`` and ``predict.py``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from qseg.runtime import compile_openvino


def profile_openvino(
    xml: Path, x: np.ndarray, threads: int, iterations: int = 5
) -> dict[tuple[str, str], float]:
    """Mean ms per (op type, kernel) over ``iterations`` runs after one warm-up run,
    from OpenVINO's per-node performance counters."""
    config = {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True}
    request = compile_openvino(xml, threads=threads, config=config, shapes=[x.shape]).create_infer_request()
    request.infer({0: x})
    totals: Counter[tuple[str, str]] = Counter()
    for _ in range(iterations):
        request.infer({0: x})
        for p in request.profiling_info:
            if p.status == p.Status.EXECUTED:
                totals[(p.node_type, p.exec_type)] += 1e3 * p.real_time.total_seconds() / iterations
    return dict(totals)


def convolution_ms(profile: dict[tuple[str, str], float]) -> float:
    """The ms of every kind of convolution (plain, grouped, transposed) in ``profile``."""
    return sum(ms for (op, _), ms in profile.items() if "Convolution" in op)


def profile_line(name: str, profile: dict[tuple[str, str], float]) -> str:
    """One line: the total, the convolutions, and the five costliest other (op, kernel)s."""
    total = sum(profile.values())
    conv = convolution_ms(profile)
    others = sorted(
        ((ms, op, kernel) for (op, kernel), ms in profile.items() if "Convolution" not in op), reverse=True
    )
    shown = ", ".join(f"{op} {kernel} {ms:.1f}" for ms, op, kernel in others[:5] if ms >= 0.5) or "-"
    return f"  {name:<30} total {total:6.1f} ms, convolutions {conv:6.1f} ms, other {total - conv:5.1f} ms: {shown}"
