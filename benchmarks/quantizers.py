"""Forward+backward time of each qseg quantizer against torch's built-in fake quantizer.

Every variant runs on the same 4M-element float32 tensor; rounds are interleaved
(one call of each variant per round) so that drift of a shared machine hits all
variants alike, and the table reports medians and the ratio to
``torch.fake_quantize_per_tensor_affine`` (a fused C++ kernel) at the same
bit width. Run: ``python benchmarks/quantizers.py [--numel N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from machine import cpu_name  # benchmarks/machine.py (scripts run from this folder)

from qseg.quantizers import Binary, DoReFa, FixedPoint, PowerOfTwo, Ternary, TernaryTanh


def builtin(x: torch.Tensor) -> torch.Tensor:
    """Signed 5-bit grid of step 1/16, the same grid as FixedPoint(0, 4)."""
    return torch.fake_quantize_per_tensor_affine(x, 1 / 16, 0, -15, 15)


def variants() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    inq = PowerOfTwo(7)
    inq.fix_bounds(torch.tensor([1.0]))
    return {
        "torch fake_quantize (5-bit)": builtin,
        "FixedPoint(0, 4) Qw0.4": FixedPoint(0, 4),
        "FixedPoint(6, 0, unsigned) Qa6.0": FixedPoint(6, 0, signed=False),
        "FixedPoint(0, 4, wrap)": FixedPoint(0, 4, overflow="wrap"),
        "PowerOfTwo(7) bounds from input": PowerOfTwo(7),
        "PowerOfTwo(7) fixed bounds": inq,
        "Binary": Binary(),
        "Binary(mean)": Binary(scale="mean"),
        "DoReFa(4)": DoReFa(4),
        "Ternary": Ternary(),
        "Ternary(per channel)": Ternary(channel_axis=0),
        "TernaryTanh (train)": TernaryTanh(),
    }


def step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x).backward(grad)
    elapsed = time.perf_counter() - start
    x.grad = None
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=4_000_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # shaped like a stack of conv weights so the per-channel variant has channels
    x = (torch.randn(args.numel // 1000, 1000) * 0.5).requires_grad_(True)
    grad = torch.randn_like(x)
    fns = variants()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        step(fn, x, grad)
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(step(fn, x, grad))
    base = statistics.median(times["torch fake_quantize (5-bit)"])
    print(
        f"# quantizer forward+backward, {x.numel():,} float32 elements, {args.threads} threads, "
        f"median of {args.rounds} interleaved rounds"
    )
    print(f"# torch {torch.__version__}, {cpu_name()}")
    print(f"| {'variant':<34} | {'median ms':>9} | {'vs torch':>8} |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 10}|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name:<34} | {med * 1e3:9.2f} | {med / base:8.2f} |")


if __name__ == "__main__":
    main()
