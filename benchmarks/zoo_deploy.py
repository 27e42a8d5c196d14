"""Every model of the zoo the whole way with one recipe: prepare, calibrate (for recipes with
ranges from data), convert, QDQ ONNX and OpenVINO IR, parity of both runtimes against the
converted model, and the convs OpenVINO executes in int8.

Each model is built seeded (``tests/zoo/catalog.py``) with random weights, calibrated on
two random batches of its example's shape, and compared on its example input, by the same
steps ``tests/zoo/test_zoo_deploy.py`` checks (``tests/zoo/deploy.py``). One row per
model: capture path, quantized layers, convs OpenVINO runs ``u8``/``i8`` out of all its
convolutions (any kind: plain, grouped, transposed), the share of the converted model's outputs
within one step of the prepared model's and their largest difference,
each runtime's parity verdict (``qseg.exporters.parity``), seconds.

Run: ``python benchmarks/zoo_deploy.py [--recipe int8] [--models monai.,smp.Unet]``
(from the repository root or ``benchmarks/``; needs the ``zoo``, ``onnx`` and ``openvino``
extras). Random-init models with random inputs have logits near 0, so "same class" is a
strict test here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py (scripts run from this folder)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from zoo import tv_shim

tv_shim.install()

from zoo.catalog import available, zoo  # noqa: E402
from zoo.deploy import deploy  # noqa: E402

from qseg.exporters.parity import ParityResult  # noqa: E402


def verdict(result: ParityResult) -> str:
    """A table cell: the verdict, and where a share decided it, both shares (and the
    float floor, where it was measured)."""
    if result.exact:
        return "bit-exact"
    if result.max_abs_diff <= result.step:
        return "within one step"
    word = "MISMATCH" if not result.ok else "float rounding" if result.rounding_explained else "ok"
    cell = f"{word}: {result.within_step:.2%} in one step, {result.same_class:.2%} same class"
    if result.floor_within_step is not None:
        cell += f" (float floor: {result.floor_within_step:.2%}, {result.floor_same_class:.2%})"
    return cell


def row(entry, recipe: str, folder: Path) -> str:
    d = deploy(entry, recipe, folder)
    verdicts = " | ".join(verdict(r) for r in d.results)
    quantized = len(d.qmodel.qseg_report.quantized_layers)
    a = d.agreement
    return (
        f"{d.path} | {quantized} | {d.int8}/{len(d.precisions)} | {a.within:.2%}, {a.drift:.3g} | {verdicts}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="int8")
    parser.add_argument(
        "--models", default="", help="comma-separated substrings of model names (default: all)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    wanted = [w for w in args.models.split(",") if w]
    print(f"# {cpu_name()}; torch {torch.__version__}; recipe {args.recipe}")
    print(
        "| model | path | quantized layers | OpenVINO int8 convs | converted vs prepared: share within one step, max diff | onnxruntime | OpenVINO | s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, entry in zoo().items():
        if wanted and not any(w in name for w in wanted):
            continue
        if not entry.capturable or not available(entry):
            print(
                f"| {name} | not run: {'not capturable' if not entry.capturable else 'package missing'} |||||||"
            )
            continue
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                line = row(entry, args.recipe, Path(tmp))
            except Exception as exc:  # a failing model is a row of the table, not the end of the run
                line = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} ||||||"
        print(f"| {name} | {line} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
