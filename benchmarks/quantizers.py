"""Forward+backward time of each qseg quantizer against torch's built-in fake quantizer.

Every variant runs on the same 4M-element float32 tensor; rounds are interleaved
(one call of each variant per round) so that drift of a shared machine hits all
variants alike, and the table reports medians and the ratio to
``torch.fake_quantize_per_tensor_affine`` (a fused C++ kernel) on a 5-bit grid.
The ``Uniform`` rows (the ``int8`` / ``w4a8`` recipes' quantizers, set from the
tensor's range first) sit next to torch's kernels on the same grids: per tensor,
per channel, and torch's learnable (LSQ) fake quantizer.
Run: ``python benchmarks/quantizers.py [--numel N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from machine import cpu_name  # benchmarks/machine.py (scripts run from this folder)

from qseg.quantizers import Binary, DoReFa, FixedPoint, PowerOfTwo, Ternary, TernaryTanh, Uniform


def builtin(x: torch.Tensor) -> torch.Tensor:
    """Signed 5-bit grid of step 1/16, the same grid as FixedPoint(0, 4)."""
    return torch.fake_quantize_per_tensor_affine(x, 1 / 16, 0, -15, 15)


def uniform(x: torch.Tensor, *args, **kwargs) -> Uniform:
    """A ``Uniform`` quantizer with its range set from ``x`` (as calibration would)."""
    q = Uniform(*args, **kwargs)
    with torch.no_grad():
        q(x.detach())
    return q


def torch_uniform(q: Uniform) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch's fused fake quantizer on ``q``'s grid (learnable when ``q`` learns its scale)."""
    scale = q.scale.detach().clone()
    zero = torch.zeros(scale.shape, dtype=torch.int32)
    if q.learn_scale:
        scale.requires_grad_(True)
        learned = torch._fake_quantize_learnable_per_channel_affine
        if q.channel_axis is None:
            learned = torch._fake_quantize_learnable_per_tensor_affine
            scale = scale.reshape(1).detach().requires_grad_(True)
        zero_f = zero.float().reshape(scale.shape)
        args = (q.channel_axis,) if q.channel_axis is not None else ()
        return lambda x: learned(x, scale, zero_f, *args, q.qmin, q.qmax, 1.0)
    if q.channel_axis is None:
        return lambda x: torch.fake_quantize_per_tensor_affine(x, float(scale), 0, q.qmin, q.qmax)
    return lambda x: torch.fake_quantize_per_channel_affine(x, scale, zero, q.channel_axis, q.qmin, q.qmax)


def variants(x: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    inq = PowerOfTwo(7)
    inq.fix_bounds(torch.tensor([1.0]))
    uint8 = uniform(x, 8, mode="unsigned")
    int7_ch = uniform(x, 7, channel_axis=0)
    uint8_lsq = uniform(x, 8, mode="unsigned", learn_scale=True)
    int4_ch_lsq = uniform(x, 4, channel_axis=0, learn_scale=True)
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
        "Uniform uint8 (int8 activations)": uint8,
        "torch fake_quantize, same grid": torch_uniform(uint8),
        "Uniform int7/ch (int8 weights)": int7_ch,
        "torch per-channel, same grid": torch_uniform(int7_ch),
        "Uniform uint8 LSQ (w4a8 acts)": uint8_lsq,
        "torch learnable, same grid": torch_uniform(uint8_lsq),
        "Uniform int4/ch LSQ (w4a8 weights)": int4_ch_lsq,
        "torch learnable/ch, same grid": torch_uniform(int4_ch_lsq),
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
    fns = variants(x)
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
