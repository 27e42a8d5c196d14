"""``qseg demo``: the whole workflow on real microscopy, in minutes on a laptop CPU.

1. load the HeLa nucleus time-lapse (:mod:`qseg.data`; train on the early frames,
   test on the last four);
2. train paper A's U-Net, width reduced to (16, 32, 64, 64) channels, in float;
3. ``qseg.prepare`` it with the default recipe (Qa6.0/Qw0.4), or ``--recipe``; for a
   recipe whose activation ranges come from data (``int8``, ``w4a8``), ``qseg.calibrate``
   on 32 training crops; fine-tune it quantization-aware with the recipe's optimizer,
   schedule and loss; the float model
   trains the same number of extra epochs, so both have had equal training;
4. ``qseg.convert``, export QDQ ONNX and OpenVINO IR, check parity;
5. print one table: dice of float, quantized PyTorch, onnxruntime and OpenVINO on the
   test frames, weight bytes and latency; write a PNG of the predictions.

Epoch counts are the demo's own (short) ones, not the paper's 200; everything is
seeded. ``fast=True`` runs the same steps on a small slice of the data with a tiny
network (a smoke test: seconds, meaningless dice).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import qseg
from qseg.calibrate import calibrated_quantizers
from qseg.data import HELA_SOURCE, load_hela, tiles
from qseg.exporters.parity import ParityResult, compare, parity_step
from qseg.metrics import dice_score
from qseg.models import PaperUNet
from qseg.recipes import load
from qseg.runtime import compile_openvino, cpu_features, onnxruntime_session
from qseg.train import fit, predict

__all__ = ["DemoResult", "Settings", "run"]


@dataclass(frozen=True)
class Settings:
    """What the demo trains and measures; :data:`FULL` and :data:`FAST` are the two used.

    Example:
        >>> FAST.widths
        (4, 8, 8, 8)
    """

    widths: tuple[int, int, int, int]
    downscale: int  # of the 700 x 1100 frames
    tile: int  # training crop size
    train_frames: int | None  # None: all frames before the test frames
    test_frames: int  # the last frames of the time-lapse
    float_epochs: int
    qat_epochs: int
    batch_size: int
    latency_runs: int


# windows per inference call when the demo predicts whole frames window by window
PREDICT_BATCH = 4

# training crops that set the activation ranges of a calibrated recipe (int8, w4a8)
CALIBRATION_CROPS = 32

FULL = Settings((16, 32, 64, 64), 2, 96, None, 4, 6, 6, 8, 20)
FAST = Settings((4, 8, 8, 8), 4, 48, 3, 1, 1, 1, 8, 3)


@dataclass
class DemoResult:
    """What ``qseg demo`` measured: ``table`` (printed), ``rows`` (the same as data),
    ``figure`` (the PNG), ``out`` (the folder with the models and ``results.json``).

    Example:
        >>> DemoResult(table="t", rows=[], figure=Path("f.png"), out=Path(".")).table
        't'
    """

    table: str
    rows: list[dict]
    figure: Path
    out: Path
    parity: list[ParityResult] = dataclasses.field(default_factory=list)


def _median_ms(run, runs: int) -> float:
    run()  # warm-up: the first call compiles / allocates
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _openvino_runner(path: Path, x: np.ndarray, threads: int):
    compiled = compile_openvino(
        path, threads=threads, config={"PERFORMANCE_HINT": "LATENCY"}, shapes=[x.shape]
    )
    request = compiled.create_infer_request()
    return lambda: request.infer({0: x})


def _onnxruntime_runner(path: Path, x: np.ndarray, threads: int):
    session = onnxruntime_session(path, threads)
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


def _float_ir(model: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
    import openvino as ov

    ov.save_model(ov.convert_model(model.eval(), example_input=x), str(path), compress_to_fp16=False)
    return path


def _format_table(rows: list[dict]) -> str:
    header = ["model", "dice (test frames)", "weights", "weight bytes", "latency ms", "speed-up"]
    lines = [header]
    for r in rows:
        lines.append(
            [
                r["model"],
                f"{r['dice']:.4f}" if r["dice"] is not None else "-",
                r["weights"],
                f"{r['weight_bytes']:,}" if r["weight_bytes"] else "-",
                f"{r['latency_ms']:.1f}" if r["latency_ms"] else "-",
                f"{r['speedup']:.2f}x" if r["speedup"] else "-",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def run(
    out: str | Path = "qseg-demo",
    *,
    seed: int = 0,
    fast: bool = False,
    threads: int | None = None,
    progress: bool = True,
    recipe: str = qseg.recipes.DEFAULT,
) -> DemoResult:
    """Train, quantize, export and compare; see the module docstring.

    Args:
        out: folder for ``float.pt``, ``prepared.pt``, ``model.onnx``, ``model.xml``,
            ``predictions.png`` and ``results.json`` (created).
        seed: seeds weights, batch order and augmentation.
        fast: the smoke-test variant (tiny network, a slice of the data).
        threads: CPU threads for training and for both runtimes (default: torch's).
        progress: progress bars and step messages on stderr.
        recipe: the recipe to quantize with (default paper A's Qa6.0/Qw0.4;
            ``"unet-qa6.0-qw0.4-exact"`` deploys bit-exact).

    Example:
        >>> result = run("qseg-demo", fast=True, progress=False)  # doctest: +SKIP
        >>> print(result.table)  # doctest: +SKIP
    """
    settings = FAST if fast else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    started = time.perf_counter()

    def say(text: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    say("loading the HeLa time-lapse")
    data = load_hela(test_frames=settings.test_frames, downscale=settings.downscale)
    train_x, train_y = data.train_images, data.train_masks
    if settings.train_frames is not None:
        train_x, train_y = train_x[: settings.train_frames], train_y[: settings.train_frames]
    x, y = tiles(train_x, train_y, settings.tile)
    test_x, test_y = data.test_images, data.test_masks
    say(
        f"{len(x)} training crops of {settings.tile}x{settings.tile}, {len(test_x)} test frames {tuple(test_x.shape[-2:])}"
    )

    recipe = load(recipe)
    training = dataclasses.replace(recipe.training, batch_size=settings.batch_size)

    torch.manual_seed(seed)
    model = PaperUNet(widths=settings.widths)
    fit(
        model, x, y, training, epochs=settings.float_epochs, seed=seed, progress=progress, description="float"
    )

    # the quantized model starts from the float one; the float reference trains the same extra
    # epochs, so the table compares equal training, not float vs float + fine-tuning
    qmodel = qseg.prepare(model, recipe, example_inputs=x[:1])
    say(f"prepared with {recipe.name}")
    if calibrated_quantizers(qmodel):  # ranges from data (int8, w4a8): set them before training
        crops = list(
            x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:CALIBRATION_CROPS]]
        )
        report = qseg.calibrate(qmodel, [c[None] for c in crops], method="percentile", progress=False)
        say(f"calibrated {len(report.ranges)} activation ranges on {report.batches} training crops")
    fit(
        qmodel,
        x,
        y,
        training,
        epochs=settings.qat_epochs,
        seed=seed + 1,
        progress=progress,
        description="quantization-aware",
    )
    fit(
        model,
        x,
        y,
        training,
        epochs=settings.qat_epochs,
        seed=seed + 1,
        progress=progress,
        description="float, same extra epochs",
    )
    torch.save(model.state_dict(), out / "float.pt")
    float_logits = predict(model, test_x)
    torch.save(qmodel.state_dict(), out / "prepared.pt")
    qat_logits = predict(qmodel, test_x)

    converted = qseg.convert(qmodel)
    converted_logits = predict(converted, test_x)
    example = torch.nn.functional.pad(
        test_x[:1], (0, (-test_x.shape[-1]) % 8, 0, (-test_x.shape[-2]) % 8), mode="reflect"
    )
    onnx_path = qseg.export_onnx(converted, example, out / "model.onnx")
    ir_path = qseg.export_openvino(converted, example, out / "model.xml")
    float_ir = _float_ir(model, example, out / "float.xml")
    say("exported model.onnx and model.xml; checking parity on the test frames")
    compiled = compile_openvino(ir_path, threads=threads, shapes=[example.shape])
    session = onnxruntime_session(onnx_path, threads)
    runners = {
        "onnxruntime": lambda frame: session.run(None, {session.get_inputs()[0].name: frame})[0],
        "openvino": lambda frame: compiled([frame])[compiled.output(0)],
    }

    def runtime_logits(run_frame) -> torch.Tensor:
        outs = []
        for i in range(len(test_x)):
            frame = torch.nn.functional.pad(
                test_x[i : i + 1],
                (0, example.shape[-1] - test_x.shape[-1], 0, example.shape[-2] - test_x.shape[-2]),
                mode="reflect",
            )
            outs.append(
                torch.from_numpy(run_frame(frame.numpy()))[..., : test_x.shape[-2], : test_x.shape[-1]]
            )
        return torch.cat(outs)

    ort_logits = runtime_logits(runners["onnxruntime"])
    ov_logits = runtime_logits(runners["openvino"])

    say(f"predicting the test frames window by window ({settings.tile}x{settings.tile}, qseg.predict)")
    roi = (settings.tile, settings.tile)
    tiler = compile_openvino(
        ir_path, threads=threads, config={"PERFORMANCE_HINT": "THROUGHPUT"}, shapes=[(PREDICT_BATCH, 1, *roi)]
    )
    predict_start = time.perf_counter()
    tiled_logits = torch.from_numpy(
        np.stack([qseg.predict(tiler, frame.numpy(), roi, batch_size=PREDICT_BATCH) for frame in test_x])
    )
    predict_ms = (time.perf_counter() - predict_start) * 1e3 / len(test_x)
    step = parity_step(converted)
    parity = [
        compare(name, [converted_logits.numpy()], [logits.numpy()], step)
        for name, logits in (("onnxruntime", ort_logits), ("openvino", ov_logits))
    ]

    say("timing one test frame")
    xin = example.numpy()
    float_params = sum(p.numel() for p in model.parameters())
    quant_bytes = int(sum(row.bytes for row in qmodel.qseg_report.layers))
    with torch.no_grad():
        torch_ms = _median_ms(lambda: model(example), settings.latency_runs)
    fp32_ms = _median_ms(_openvino_runner(float_ir, xin, threads), settings.latency_runs)
    ov_ms = _median_ms(_openvino_runner(ir_path, xin, threads), settings.latency_runs)
    ort_ms = _median_ms(_onnxruntime_runner(onnx_path, xin, threads), settings.latency_runs)

    def dice(logits: torch.Tensor) -> float:
        return dice_score(logits > 0, test_y)

    label = recipe.name
    rows = [
        dict(
            model="PyTorch float",
            dice=dice(float_logits),
            weights="float32",
            weight_bytes=4 * float_params,
            latency_ms=torch_ms,
            speedup=fp32_ms / torch_ms,
        ),
        dict(
            model="OpenVINO float IR",
            dice=None,
            weights="float32",
            weight_bytes=4 * float_params,
            latency_ms=fp32_ms,
            speedup=1.0,
        ),
        dict(
            model=f"PyTorch {label} (QAT)",
            dice=dice(qat_logits),
            weights="fake-quant",
            weight_bytes=None,
            latency_ms=None,
            speedup=None,
        ),
        dict(
            model="PyTorch converted",
            dice=dice(converted_logits),
            weights="int codes",
            weight_bytes=quant_bytes,
            latency_ms=None,
            speedup=None,
        ),
        dict(
            model="onnxruntime QDQ",
            dice=dice(ort_logits),
            weights="int8 QDQ",
            weight_bytes=quant_bytes,
            latency_ms=ort_ms,
            speedup=fp32_ms / ort_ms,
        ),
        dict(
            model="OpenVINO IR",
            dice=dice(ov_logits),
            weights="int8 QDQ",
            weight_bytes=quant_bytes,
            latency_ms=ov_ms,
            speedup=fp32_ms / ov_ms,
        ),
        dict(
            model="OpenVINO IR, qseg.predict",
            dice=dice(tiled_logits),
            weights="int8 QDQ",
            weight_bytes=quant_bytes,
            latency_ms=predict_ms,
            speedup=fp32_ms / predict_ms,
        ),
    ]
    table = "\n".join(
        [
            _format_table(rows),
            f"test frames {list(data.test_frames)} of {HELA_SOURCE}.",
            f"latency: one {tuple(example.shape)} frame, median of {settings.latency_runs} runs, {threads} threads; "
            "speed-up vs the OpenVINO float IR. weight bytes: quantized codes at their stored width, "
            "float first/last layers, scales and biases included.",
            f"qseg.predict: each test frame by {settings.tile}x{settings.tile} windows (the training crop), "
            f"overlap 0.25, Gaussian blend, {PREDICT_BATCH} windows per async request: "
            f"{test_x[0, 0].numel() / predict_ms / 1e3:.2f} Mpixel/s; its latency is one whole frame's.",
            f"parity against PyTorch converted, on the test frames (OpenVINO compiled exact, {cpu_features().describe()}):",
            *(f"  {p}" for p in parity),
        ]
    )

    from qseg.plots import prediction_overlay

    frame = len(test_x) - 1
    figure = prediction_overlay(
        test_x[frame, 0].numpy(),
        test_y[frame, 0].numpy(),
        {
            "float": (float_logits[frame, 0] > 0).numpy(),
            "quantized (OpenVINO)": (ov_logits[frame, 0] > 0).numpy(),
        },
        out / "predictions.png",
        title=f"HeLa frame {data.test_frames[frame]} (masks: an automatic method's output, not a human)",
    )
    (out / "results.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "parity": [{**dataclasses.asdict(p), "verdict": str(p)} for p in parity],
                "recipe": label,
                "seed": seed,
                "fast": fast,
            },
            indent=2,
        )
    )
    say(f"done; files in {out}")
    return DemoResult(table=table, rows=rows, figure=figure, out=out, parity=parity)
