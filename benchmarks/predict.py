"""Whole-image and whole-volume inference: qseg.predict on the int8 IR against MONAI and float.

Two inputs, one run, one machine:

- 2d: a whole HeLa frame at full resolution (700 x 1100, ``qseg.data.load_hela(downscale=1)``,
  the last test frame), qseg's ``PaperUNet(16, 32, 64, 64)`` (BatchNorm, ReLU), windows of
  256 x 256;
- 3d: the 20 HeLa frames stacked as a 2d+t volume, downscaled 2x (20 x 350 x 550), nnU-Net's
  ``PlainConvUNet`` 3d (InstanceNorm, LeakyReLU, features 16-32-64-128, ``dynamic-network-
  architectures``), windows of 16 x 128 x 128.

Each model keeps its random initialisation (throughput does not depend on the weights) and is
prepared with the ``int8`` recipe, calibrated on 8 training crops, converted and exported; its
float model is exported as an OpenVINO float IR. Rows, all with overlap 0.25, Gaussian blend,
4 windows per call:

- (a) MONAI ``sliding_window_inference`` on the float PyTorch model (``sw_batch_size=4``);
- (b) ``qseg.predict`` on the OpenVINO float IR (f32, throughput hint, async requests);
- (c) ``qseg.predict`` on qseg's int8 IR (the same);
- (d) the int8 IR compiled with the latency hint: one infer request in flight at a time;
- (e) as (d) on one thread: asynchronous requests on ``n`` threads can at best run ``n``
  one-thread requests side by side, so ``n x (e) / (d)`` bounds what (c) can gain over (d).

Then where the time of one call goes, from OpenVINO's per-layer counters (``PERF_COUNT``) on
the float and the int8 IR (``profiling.py``: one request, ``n`` threads, mean of 5 calls after
one): the convolutions against everything else, which bounds what (c) can gain over (b).

Each row runs in its own process (spawned), which compiles its model, runs once on the input to
warm up and then times at least 3 runs and at least 2 s of them, and reports their median (a
2d call on the int8 IR takes about 0.1 s on a VNNI CPU, where a single timed run read 1.7x
the median of repeated ones); peak memory is that process's peak resident set (it
includes Python, torch and the runtime). As one process per row sees the machine at another
minute, and on a shared (virtual) CPU the speed of a row moves between minutes, the async gain
is measured a second time with rows (c), (d) and (e) in one process, one call of each in
turn. The models are untrained, so their masks say nothing:
that ``qseg.predict`` on an IR computes what MONAI computes on the converted model is tested
(tests/runtime/test_predict.py), not measured here.

Run (the benchmark venv of accuracy_models.py, which has MONAI and nnU-Net's package):
``/tmp/bench/bin/python benchmarks/predict.py [--threads 2] [--only 2d|3d]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_name  # benchmarks/machine.py (scripts run from this folder)
from profiling import convolution_ms, profile_line, profile_openvino  # benchmarks/profiling.py
from torch import nn

import qseg
from qseg.data import load_hela, tiles
from qseg.models import PaperUNet

OVERLAP = 0.25
BATCH = 4
# timed runs per row (at least both); see the module docstring
MIN_RUNS, MIN_SECONDS = 3, 2.0
# rounds of the interleaved (c) / (d) / (e) measurement of the async gain (at least both)
ASYNC_ROUNDS, ASYNC_SECONDS = 5, 20.0
ROWS = {
    "a": "MONAI sliding_window_inference, float PyTorch",
    "b": "qseg.predict, OpenVINO float IR",
    "c": "qseg.predict, qseg int8 IR",
    "d": "qseg.predict, int8 IR, one request at a time",
    "e": "qseg.predict, int8 IR, one request at a time, one thread",
}


def plain_conv_unet_3d() -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(
        1, 4, (16, 32, 64, 128), nn.Conv3d, 3, (1, 2, 2, 2), (2, 2, 2, 2), 1, (2, 2, 2), False,
        nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
    )  # fmt: skip


def build(kind: str, folder: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """Export the float and int8 models of ``kind`` into ``folder``; the input and window."""
    torch.manual_seed(0)
    if kind == "2d":
        data = load_hela(test_frames=4, downscale=1)
        image = data.test_images[-1].numpy()  # (1, 700, 1100)
        crops, _ = tiles(data.train_images, data.train_masks, 256, stride=256)
        model, roi = PaperUNet(widths=(16, 32, 64, 64)), (256, 256)
    else:
        data = load_hela(test_frames=4, downscale=2)
        volume = torch.cat([data.train_images, data.test_images])[:, 0][None]  # (1, 20, 350, 550)
        image = volume.numpy()
        roi = (16, 128, 128)
        crops = torch.stack(
            [volume[:, :16, y : y + 128, x : x + 128] for y, x in ((0, 0), (100, 200), (200, 400))]
        )
        model = plain_conv_unet_3d()
    model.eval()
    example = crops[:1]
    calibration = [crops[i % len(crops) : i % len(crops) + 1] for i in range(8)]
    qmodel = qseg.prepare(model, "int8", example_inputs=example)
    qseg.calibrate(qmodel, calibration, progress=False)
    converted = qseg.convert(qmodel.eval())
    qseg.export_openvino(converted, example, folder / "int8.xml")
    qseg.export_openvino(model, example, folder / "float.xml")  # the float model, as qseg exports it
    torch.save(model, folder / "float.pt")
    return image, roi


def peak_rss_mb() -> float:
    """This process's peak resident set since it started its program, in MB.

    ``/proc/self/status``'s ``VmHWM`` belongs to the address space the program got at
    ``exec``; ``getrusage``'s ``ru_maxrss`` does not fit here, as it keeps the peak of
    the parent that forked the process (a spawned row read the parent's 710 MB).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024  # not Linux


def infer_function(row: str, folder: Path, image: np.ndarray, roi: tuple[int, ...], threads: int):
    """What row ``row`` times: one whole-image inference, ready to call."""
    if row == "a":
        from monai.inferers import sliding_window_inference

        model = torch.load(folder / "float.pt", weights_only=False).eval()
        x = torch.from_numpy(image)[None]

        def infer() -> np.ndarray:
            with torch.inference_mode():
                out = sliding_window_inference(x, roi, BATCH, model, overlap=OVERLAP, mode="gaussian")
            return out[0].numpy()
    else:
        from qseg.exporters import compile_openvino

        xml = folder / ("float.xml" if row == "b" else "int8.xml")
        hint = "LATENCY" if row in ("d", "e") else "THROUGHPUT"
        compiled = compile_openvino(
            xml, threads=threads, config={"PERFORMANCE_HINT": hint}, shapes=[(BATCH, image.shape[0], *roi)]
        )

        def infer() -> np.ndarray:
            return qseg.predict(compiled, image, roi, overlap=OVERLAP, batch_size=BATCH)

    return infer


def timed(infer) -> float:
    """Seconds of one call of ``infer``."""
    start = time.perf_counter()
    infer()
    return time.perf_counter() - start


def run_row(row: str, folder: str, image: np.ndarray, roi: tuple[int, ...], threads: int, queue) -> None:
    """One row in a fresh process: (median seconds of the timed runs, peak RSS in MB)."""
    torch.set_num_threads(threads)
    infer = infer_function(row, Path(folder), image, roi, threads)
    infer()
    times: list[float] = []
    while len(times) < MIN_RUNS or sum(times) < MIN_SECONDS:
        times.append(timed(infer))
    queue.put((statistics.median(times), peak_rss_mb()))


def run_interleaved(folder: str, image: np.ndarray, roi: tuple[int, ...], threads: int, queue) -> None:
    """Rows (c), (d), (e) in one process, one call of each in turn for at least
    ``ASYNC_ROUNDS`` rounds and ``ASYNC_SECONDS``: their median seconds (each row sees the
    machine over the same minutes), and the number of rounds."""
    infers = {
        row: infer_function(row, Path(folder), image, roi, 1 if row == "e" else threads) for row in "cde"
    }
    for infer in infers.values():
        infer()
    times: dict[str, list[float]] = {row: [] for row in infers}
    while len(times["c"]) < ASYNC_ROUNDS or sum(map(sum, times.values())) < ASYNC_SECONDS:
        for row, infer in infers.items():
            times[row].append(timed(infer))
    queue.put(({row: statistics.median(t) for row, t in times.items()}, len(times["c"])))


def in_process(target, *args):
    """``target(*args, queue)`` in a fresh (spawned) process; what it puts on the queue."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("2d", "3d"), default=None)
    args = parser.parse_args()
    print(f"# CPU: {cpu_name()}; {os.cpu_count()} logical CPUs, {args.threads} threads")
    print(f"# torch {torch.__version__}, qseg {qseg.__version__}; overlap {OVERLAP}, gaussian, batch {BATCH}")
    for kind in ("2d", "3d"):
        if args.only and kind != args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            image, roi = build(kind, folder)
            voxels = int(np.prod(image.shape[1:]))
            print()
            print(
                f"## {kind}: input {'x'.join(map(str, image.shape[1:]))}, windows {'x'.join(map(str, roi))}"
            )
            print()
            print("| row | Mvoxel/s | vs (a) | vs (b) | peak RSS MB |")
            print("|---|---|---|---|---|")
            results = {
                row: in_process(run_row, row, str(folder), image, roi, 1 if row == "e" else args.threads)
                for row in ROWS
            }
            for row, (seconds, peak) in results.items():
                print(
                    f"| ({row}) {ROWS[row]} | {voxels / seconds / 1e6:.2f} | {results['a'][0] / seconds:.2f}x | "
                    f"{results['b'][0] / seconds:.2f}x | {peak:.0f} |",
                    flush=True,
                )
            paired, rounds = in_process(run_interleaved, str(folder), image, roi, args.threads)
            print(
                f"\n(c), (d), (e) again, one call of each in turn, {rounds} rounds in one process "
                f"(medians, ms): {paired['c'] * 1e3:.1f}, {paired['d'] * 1e3:.1f}, {paired['e'] * 1e3:.1f}"
            )
            for name, timing in (
                ("rows above", {r: t for r, (t, _) in results.items()}),
                ("interleaved", paired),
            ):
                print(
                    f"{name}: async (c) vs one request at a time (d) {timing['d'] / timing['c']:.2f}x; "
                    f"the most async requests could gain over (d), {args.threads} x (e) / (d), "
                    f"{args.threads * timing['d'] / timing['e']:.2f}x"
                )
            x = np.random.default_rng(0).standard_normal((BATCH, image.shape[0], *roi)).astype(np.float32)
            profiles = {
                name: profile_openvino(folder / f"{name}.xml", x, args.threads) for name in ("float", "int8")
            }
            conv = {name: convolution_ms(p) for name, p in profiles.items()}
            rest = {name: sum(p.values()) - conv[name] for name, p in profiles.items()}
            print(
                f"\nms per call of {BATCH} windows (one request): convolutions f32 {conv['float']:.0f}, int8 "
                f"{conv['int8']:.0f} ({conv['float'] / conv['int8']:.2f}x); the rest f32 {rest['float']:.0f}, "
                f"int8 {rest['int8']:.0f}"
            )
            for name in ("float", "int8"):
                print(profile_line(f"{name} IR", profiles[name]))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
