"""Cost of ``qseg.prepare`` and of training the model it returns, against the float model.

a) ``qseg.prepare`` wall time (median of 3) for paper A's U-Net at two example sizes
   (prepare runs the model twice on the example to verify the capture, so the
   example's size counts), and for every model of ``tests/zoo/catalog.py`` when that
   file exists and its packages import.
b) One training step (forward, BCE-with-logits loss, backward, Adam step) of the
   paper U-Net, batch 4 of 1x1x200x200: float; prepared by qseg with the default
   recipe (Qa6.0/Qw0.4), and that model with its quantizers swapped for
   ``torch.fake_quantize_per_tensor_affine`` on the same grids (a fused C++ kernel,
   the lower bound for fake quantization); prepared with ``int8`` and with ``w4a8``
   (LSQ), calibrated on one image, and the ``int8`` model swapped for torch's
   per-tensor / per-channel fake quantizers; and nnU-Net's 2d ``PlainConvUNet``
   (InstanceNorm + LeakyReLU, the configuration of ``accuracy_models.py``) in float,
   ``int8`` and ``w4a8``, each against its own float step (no goal: the issue's goal is
   the paper U-Net's; these rows show a user's model). Each variant trains in a process of its
   own (an allocator's free memory is per process, and in one shared process each step
   inherited what the previous variant's step left), and rounds are interleaved (one
   step of each variant per round, one process at a time) so that drift of a shared
   machine hits all alike; the table reports medians and the ratio to float.

Allocator: glibc's malloc maps every buffer above 32 MB afresh and returns it on free, so a
step pays a page fault per 4 KiB of each such buffer again; a quantizer that added full-size
buffers would add their faults (qseg's add none over the float step where the graph lets them
overwrite their input and absorb the ReLU after them: qseg/quantizers/fused.py). The header
prints the ``MALLOC_*`` settings the run had, and the table each variant's median minor page
faults and kernel (system) time per step; run it once as is and once with glibc told to keep
its memory (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000``) to see that share.

Run: ``python benchmarks/prepare.py [--threads 2] [--rounds 10] [--only training]``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import cpu_name, torch_kernels  # benchmarks/machine.py (scripts run from this folder)
from torch import nn

import qseg
from qseg.models import PaperUNet
from qseg.quantizers import Quantizer

REPO = Path(__file__).resolve().parent.parent
GOAL_UNET_S = 1.0
GOAL_ZOO_S = 5.0
GOAL_RATIO = 1.3
GOAL_RATIO_INT = 1.15  # issue 13: int8 / w4a8 QAT at most 1.15x the float step


def median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prepare_rows() -> tuple[list[tuple[str, str, float | None, float, str]], list[str]]:
    """(model, example, seconds or None, goal, note) rows and lines about skipped models."""
    rows = []
    torch.manual_seed(0)
    unet = PaperUNet()
    for size in (200, 64):
        x = torch.randn(1, 1, size, size)
        seconds = median_time(lambda x=x: qseg.prepare(unet, example_inputs=x))
        rows.append(("PaperUNet (4.84M)", f"1x1x{size}x{size}", seconds, GOAL_UNET_S, ""))

    notes = []
    catalog = REPO / "tests" / "zoo" / "catalog.py"
    if not catalog.exists():
        notes.append(f"zoo: skipped, {catalog.relative_to(REPO)} does not exist")
        return rows, notes
    sys.path.insert(0, str(catalog.parent.parent))  # the catalog imports itself as zoo.catalog
    try:
        from zoo import catalog as zoo_catalog
    except ImportError as exc:
        notes.append(f"zoo: skipped, importing the catalog failed: {exc}")
        return rows, notes
    lacking = getattr(zoo_catalog, "missing", lambda entry: [])  # noqa: ARG005
    skipped = []
    for name, entry in zoo_catalog.zoo().items():
        if lacking(entry):
            skipped.append(f"{name} (needs {', '.join(lacking(entry))})")
            continue
        try:
            torch.manual_seed(0)
            model = entry.factory()
            example = entry.example()
        except ImportError as exc:  # a package the model needs is missing or broken
            skipped.append(f"{name} ({exc})")
            continue
        if isinstance(example, torch.Tensor):
            shape = "x".join(map(str, example.shape))
        else:
            shape = "tuple"
        try:
            seconds = median_time(lambda m=model, e=example: qseg.prepare(m, example_inputs=e))
            note = ""
        except Exception as exc:
            seconds, note = None, f" {type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
        rows.append((name, shape, seconds, GOAL_ZOO_S, note))
    if skipped:
        notes.append("zoo: skipped: " + "; ".join(skipped))
    else:
        notes.append("zoo: no catalog model skipped for a missing package")
    return rows, notes


class TorchFakeQuant(nn.Module):
    """``torch.fake_quantize_per_tensor_affine`` (or ``_per_channel_affine``) on a qseg
    quantizer's grid: fixed scales, the clipped straight-through gradient."""

    def __init__(self, quantizer: Quantizer) -> None:
        super().__init__()
        spec = quantizer.spec(None)
        if spec is None:
            raise ValueError(f"{quantizer} has no uniform grid")
        self.axis = spec.axis
        self.scale = float(spec.scale) if spec.axis is None else 0.0
        self.zero_point = int(spec.zero_point)
        self.qmin, self.qmax = spec.qmin, spec.qmax
        if spec.axis is not None:
            self.register_buffer("scales", spec.scale.detach().float())
            self.register_buffer("zeros", torch.full_like(self.scales, spec.zero_point, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)
        return torch.fake_quantize_per_channel_affine(
            x, self.scales, self.zeros, self.axis, self.qmin, self.qmax
        )


def with_torch_fake_quant(qmodel: nn.Module) -> nn.Module:
    """A copy of a prepared model whose quantizers are torch's fake quantizer on the same grids."""
    qmodel = copy.deepcopy(qmodel)
    for name, module in list(qmodel.named_modules()):
        if isinstance(module, Quantizer):
            parent_name, _, child = name.rpartition(".")
            setattr(qmodel.get_submodule(parent_name), child, TorchFakeQuant(module))
    return qmodel


class Trainer:
    """One model, its Adam optimizer and a timed training step on a fixed batch."""

    def __init__(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
        self.model = model.train()
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.x, self.target = x, target
        self.times: list[float] = []
        # per step: minor page faults (a fresh page's first touch) and kernel seconds
        self.faults: list[int] = []
        self.system: list[float] = []

    def step(self, record: bool = True) -> float:
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        loss = nn.functional.binary_cross_entropy_with_logits(self.model(self.x), self.target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        if record:
            self.times.append(elapsed)
            self.faults.append(after.ru_minflt - before.ru_minflt)
            self.system.append(after.ru_stime - before.ru_stime)
        return loss.detach().item()


def prepare_table() -> None:
    print("## a) qseg.prepare wall time, median of 3")
    rows, notes = prepare_rows()
    print(f"| {'model':<40} | {'example':<14} | {'seconds':>8} | {'goal':>6} | {'ok':<3} |")
    print(f"|{'-' * 42}|{'-' * 16}|{'-' * 10}|{'-' * 8}|{'-' * 5}|")
    for name, example, seconds, goal, note in rows:
        shown = f"{seconds:8.2f}" if seconds is not None else f"{'-':>8}"
        ok = "yes" if seconds is not None and seconds < goal else "NO"
        print(
            f"| {name:<40} | {example:<14} | {shown} | {'<' + format(goal, 'g') + ' s':>6} | {ok:<3} |{note}"
        )
    for line in notes:
        print(line)


def max_logit_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest |difference| of two models' eval-mode outputs on ``x`` (copies, so no
    state of the timed models changes)."""
    with torch.no_grad():
        a, b = copy.deepcopy(a).eval(), copy.deepcopy(b).eval()
        return (a(x) - b(x)).abs().max().item()


# (variant, model, recipe, swap in torch's fake quantizers, goal for the ratio to that model's float step)
VARIANTS: tuple[tuple[str, str, str | None, bool, float | None], ...] = (
    ("float", "paper", None, False, None),
    ("qseg prepared (Qa6.0/Qw0.4)", "paper", "unet-qa6.0-qw0.4", False, GOAL_RATIO),
    ("torch fake_quantize, same grids", "paper", "unet-qa6.0-qw0.4", True, GOAL_RATIO),
    ("qseg int8 (calibrated)", "paper", "int8", False, GOAL_RATIO_INT),
    ("qseg w4a8 (LSQ, calibrated)", "paper", "w4a8", False, GOAL_RATIO_INT),
    ("torch fake_quantize, int8 grids", "paper", "int8", True, None),
    # no goal: the goal is the paper U-Net's; these rows show a user's model
    ("nnU-Net float", "nnunet", None, False, None),
    ("nnU-Net qseg int8 (calibrated)", "nnunet", "int8", False, None),
    ("nnU-Net qseg w4a8 (LSQ, calibrated)", "nnunet", "w4a8", False, None),
)
MODELS = {"paper": "PaperUNet 4.84M", "nnunet": "nnU-Net PlainConvUNet 2d (IN, LeakyReLU, 16-128) 1.92M"}


def build_model(model: str) -> nn.Module:
    """The paper U-Net, or nnU-Net's 2d PlainConvUNet as benchmarks/accuracy_models.py
    builds it (``dynamic-network-architectures``, a zoo dependency)."""
    if model == "paper":
        return PaperUNet()
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(
        1, 4, (16, 32, 64, 128), nn.Conv2d, 3, (1, 2, 2, 2), (2, 2, 2, 2), 1, (2, 2, 2), False,
        nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
    )  # fmt: skip


def training_data(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, size, size, generator=gen)
    return x, (torch.rand(batch, 1, size, size, generator=gen) > 0.5).float()


def make_variant(recipe: str | None, torch_swap: bool, x: torch.Tensor, model: str = "paper") -> nn.Module:
    """``model`` (seed 0), prepared with ``recipe`` and, for the calibrated recipes,
    calibrated on one image as a user would; the same model in every process."""
    torch.manual_seed(0)
    model = build_model(model)
    if recipe is None:
        return model
    model = qseg.prepare(model, recipe, example_inputs=x[:1])
    if recipe in ("int8", "w4a8"):
        qseg.calibrate(model, [x[:1]], progress=False)
    return with_torch_fake_quant(model) if torch_swap else model


def _train_worker(index: int, batch: int, size: int, threads: int, conn) -> None:
    """One variant in a process of its own: build, warm up, then one timed step per request."""
    torch.set_num_threads(threads)
    _, model, recipe, torch_swap, _ = VARIANTS[index]
    x, target = training_data(batch, size)
    trainer = Trainer(make_variant(recipe, torch_swap, x, model), x, target)
    for _ in range(2):
        trainer.step(record=False)
    conn.send("ready")
    while conn.recv() == "step":
        trainer.step()
        conn.send((trainer.times[-1], trainer.faults[-1], trainer.system[-1]))


def training_table(batch: int, size: int, rounds: int, threads: int) -> None:
    print(
        f"## b) training step (forward + BCE loss + backward + Adam), {' and '.join(MODELS.values())}, "
        f"batch {batch}x1x{size}x{size}, median of {rounds} interleaved rounds, one process per variant"
    )
    x, _ = training_data(batch, size)
    # the swaps are faithful: the same grids, rounding and clipped STE give the same
    # logits, up to torch's x * (1/s) against qseg's x / s at near-ties
    diffs = {
        recipe: max_logit_diff(make_variant(recipe, False, x), make_variant(recipe, True, x), x[:1])
        for recipe in ("unet-qa6.0-qw0.4", "int8")
    }
    # A process per variant: glibc's heap is per process, and in one process each step
    # inherits the free memory the previous variant's step left (measured: float 305 k page
    # faults per step there, 496 k alone), which skews the ratios. Only one process steps
    # at a time, round by round, so that drift of a shared machine hits all alike.
    indices = list(range(len(VARIANTS)))
    if importlib.util.find_spec("dynamic_network_architectures") is None:
        print("# nnU-Net rows left out: pip install --no-deps dynamic-network-architectures==0.4.4")
        indices = [i for i in indices if VARIANTS[i][1] != "nnunet"]
    context = multiprocessing.get_context("spawn")
    workers = []
    for index in indices:
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_train_worker, args=(index, batch, size, threads, theirs), daemon=True
        )
        process.start()
        workers.append((process, ours))
    results: list[list[tuple[float, int, float]]] = [[] for _ in indices]
    try:
        for _, conn in workers:
            conn.recv()  # ready
        for _ in range(rounds):
            for (_, conn), timed in zip(workers, results, strict=True):
                conn.send("step")
                timed.append(conn.recv())
    finally:
        for process, conn in workers:
            conn.send("stop")
            process.join(timeout=60)
    medians = {
        i: statistics.median(t for t, _, _ in timed) for i, timed in zip(indices, results, strict=True)
    }
    # each model's quantized steps against its own float step
    base = {VARIANTS[i][1]: medians[i] for i in indices if VARIANTS[i][2] is None}
    print(
        f"| {'variant':<35} | {'median ms':>9} | {'vs float':>8} | {'goal':>7} | {'ok':<3} | "
        f"{'page faults':>11} | {'kernel ms':>9} |"
    )
    print(f"|{'-' * 37}|{'-' * 11}|{'-' * 10}|{'-' * 9}|{'-' * 5}|{'-' * 13}|{'-' * 11}|")
    for index, timed in zip(indices, results, strict=True):
        name, model, _, _, goal = VARIANTS[index]
        median = medians[index]
        ratio = median / base[model]
        shown = "" if goal is None else f"<= {goal:g}"
        ok = "" if goal is None else ("yes" if ratio <= goal else "NO")
        faults = statistics.median(f for _, f, _ in timed)
        system = statistics.median(k for _, _, k in timed)
        print(
            f"| {name:<35} | {median * 1e3:9.1f} | {ratio:8.2f} | {shown:>7} | {ok:<3} | "
            f"{faults:11.0f} | {system * 1e3:9.0f} |"
        )
    for recipe, diff in diffs.items():
        print(f"eval logits, qseg {recipe} vs torch fake_quantize swap: max |diff| = {diff:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument(
        "--only", choices=("all", "prepare", "training"), default="all", help="run part a), b) or both"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    malloc = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    print(f"# torch {torch.__version__}, {cpu_name()}, {torch.get_num_threads()} threads")
    print(f"# kernels: {torch_kernels()}")
    print(f"# allocator: glibc malloc, {malloc or 'default settings'}")
    if args.only != "training":
        print()
        prepare_table()
    if args.only != "prepare":
        print()
        training_table(args.batch, args.size, args.rounds, args.threads)


if __name__ == "__main__":
    main()
