"""Deployment latency and size of paper A's U-Net and nnU-Net's 3d U-Net: qseg against float and NNCF.

U-Net part (``paper_unet_section``): one model (``PaperUNet``, 4.84M parameters, seeded), one input (1x1xSxS, S=256 by
default), the same number of threads everywhere (2 by default). The variants:

1. PyTorch eager, float (``torch.set_num_threads``, ``torch.inference_mode``);
2. OpenVINO FP32 IR of the float model (``qseg.export_onnx`` of the float model,
   then ``openvino_from_onnx``, which saves with ``compress_to_fp16=False``);
3. qseg IR, the default recipe Qa6.0/Qw0.4 (int8 weight storage), and for
   comparison OpenVINO's plain conversion of the same QDQ ONNX (without
   ``qseg.exporters.openvino_form``: the integer Clip between Q and DQ stays);
4. qseg IR, 8-bit recipes: Qa8.0/Qw0.7 (2 x 255 x 127 exceeds the int16 pair bound
   of AVX2 kernels without VNNI: ``qseg.convert`` warns) and Qa7.0/Qw0.7 (within it),
   and the exact variant: Qa6.0/Qw0.4 with the first and last layers quantized too
   (NNCF's policy) and the recipe's 8-bit input grid on [0, 1] (``unet-qa6.0-qw0.4-exact``),
   integer from input to output;
5. qseg IR with INT4 weight storage (Qa6.0/Qw0.3, ``weights="int4"``; qseg puts an
   explicit ``Convert(i4 -> i8)`` after each INT4 weight so the plugin runs int8
   kernels), and for comparison OpenVINO's plain conversion of the same ONNX;
6. NNCF int8 IR of the same float model: ``nncf.quantize`` with its defaults on
   the FP32 IR and 16 random calibration inputs, saved with ``compress_to_fp16=False``;
7. onnxruntime FP32 (the float ONNX) and 8. onnxruntime on qseg's Qa6.0/Qw0.4 QDQ ONNX.

The model is made to look trained where that matters: conv weights are redrawn
from N(0, 0.3^2) clipped to [-1, 1], so that the fixed-point codes use their range
(a default init lies within +-0.04 and rounds almost entirely to 0 on Q0.4, which
would make the parity checks trivial), and BatchNorm running statistics are the
average over 20 train-mode forward passes on random inputs (``torch.no_grad``),
computed for the float model before export and again for each prepared model.
No QAT is run: latency does not depend on the weights' values. Inputs are N(0, 1), for
the BatchNorm statistics, the NNCF calibration and the timed input alike; the exact
variant's input grid covers [0, 1], so it clamps the negative half of them to 0 (the
grid, not the input, is what exactness needs).

Every OpenVINO variant is compiled by ``qseg.exporters.compile_openvino``: ``exact=True``
(f32 float layers, accuracy mode) and, for the FP32 IR, the default and exact qseg IRs
and NNCF's, also ``exact=False`` (the plugin's defaults: bf16 float layers on CPUs with
AVX-512 BF16 or AMX). Parity is reported for both.

Latency: every variant is compiled once, then each round runs every variant once
(round-robin, the starting variant rotating every round, a short pause between
runs so that one runtime's spinning threads do not slow the next); the first
``--warmup`` rounds are discarded. The table gives each variant's median and
minimum over ``--runs`` rounds, and its speed-up as the median over rounds of the
*paired* ratio (reference time / variant time in the same round), which cancels
load that comes and goes on a shared machine better than a ratio of medians; the
goals use these paired ratios. Absolute times drift; read the ratios.

Columns: the conv kernels OpenVINO's CPU plugin really runs (runtime precisions
from the compiled model's ``rt_info``, ``qseg.exporters.runtime_precisions``), or
the convs onnxruntime executes after its graph optimizations (``QLinearConv`` =
fused integer conv); the file size (xml + bin, or .onnx); the bytes of the conv
weight tensors as stored (int4 packed, int8 codes or float32; scales and biases
excluded) and their ratio to float32. Then parity of each qseg export against the
converted PyTorch model in both runtimes (``check_parity``'s max |diff| and verdict,
plus the share of outputs within one activation step and the difference between
the two runtimes), the goals with PASS/MISS, a per-node OpenVINO profile of the
FP32, qseg (both conversions) and NNCF IRs (where the time goes), and how OpenVINO executes
INT4-stored weights (qseg's IR, OpenVINO's plain conversion, the ONNX read
directly, and under ``INFERENCE_PRECISION_HINT`` values).

Environment (nncf must not go into the project's venv; the pins keep the CPU torch
wheel and the project's onnx / openvino versions)::

    python3 -m venv /tmp/bench
    /tmp/bench/bin/pip install torch==2.13.0 nncf==3.4.0 onnx onnxruntime openvino -e "/work/main[onnx,openvino]"

nnU-Net 3d section (``nnunet3d_section``): nnU-Net's 3d full-resolution ``PlainConvUNet``
from ``dynamic_network_architectures`` (``pip install --no-deps dynamic-network-architectures==0.4.4``)
as its planner sizes it for a 64x128x128 patch: 6 stages of 32-64-128-256-320-320
features, 2 convs per stage, strides 1, 2, 2, 2, 2, (1, 2, 2), InstanceNorm3d (affine) +
LeakyReLU, conv bias, 1 input channel, 3 classes, no deep supervision, seeded with
nnU-Net's He initialization (23 convs, 5 transposed convs, 30.8M parameters). One
1x1x64x128x128 N(0, 1) volume, the same threads; four OpenVINO IRs, all compiled
``exact=True``: the FP32 IR (as above), qseg's ``int8`` recipe (``qseg.prepare``,
``qseg.calibrate`` on 4 random volumes, ``qseg.convert``, ``qseg.export_openvino``), the
same with ``quantize_norm_inputs: true`` (a quantizer on every conv output that feeds an
InstanceNorm, so the norms run on 8-bit codes) and NNCF's int8 IR (``nncf.quantize``
defaults on the FP32 IR, the same 4 volumes). Timed by the same interleaving
(``--runs3d`` rounds after ``--warmup3d``; one float inference takes seconds on 2 cores);
the table's kernel column counts Convolution, Deconvolution (transposed conv) and MVN
(InstanceNorm) precisions. Then ``check_parity`` of both qseg IRs against their converted
models and, for scale, the share of voxels each IR gives the float PyTorch model's class. The section takes about 8 minutes on a 2-core AVX2 machine,
most of it in calibration (PyTorch, then NNCF) and the float inferences.

Run (from ``benchmarks/``, which holds ``machine.py``; NNCF needs
``NNCF_EXTENSION_LOAD_TIMEOUT=0`` where its extensions cannot be built)::

    /tmp/bench/bin/python deploy.py [--runs 50] [--warmup 5] [--threads 2] [--size 256] [--out DIR]
    /tmp/bench/bin/python deploy.py --only nnunet3d [--runs3d 10] [--warmup3d 1]

``--only unet`` runs the U-Net part alone, ``--only nnunet3d`` the nnU-Net 3d section
alone; without ``--only`` both run.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from machine import cpu_name  # benchmarks/machine.py (scripts run from this folder)
from profiling import profile_line, profile_openvino  # benchmarks/profiling.py
from torch import nn

import qseg
from qseg.exporters import check_parity, openvino_from_onnx, runtime_precisions
from qseg.models import PaperUNet
from qseg.runtime import compile_openvino, cpu_features, onnxruntime_ops, run_onnxruntime, run_openvino

SEED = 0
BN_PASSES = 20
CALIBRATION_SAMPLES = 16
NNUNET3D_SHAPE = (1, 1, 64, 128, 128)
NNUNET3D_CALIBRATION_SAMPLES = 4
WEIGHT_STD = 0.3
PAUSE_S = 0.02
# goals
GOAL_SPEEDUP = 1.7
GOAL_INT4_RATIO = 0.15


# ---------------------------------------------------------------- environment


def versions() -> str:
    import nncf
    import onnxruntime
    import openvino

    return (
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"openvino {openvino.get_version()}, nncf {nncf.__version__}, qseg {qseg.__version__}, "
        f"numpy {np.__version__}"
    )


def quiet() -> None:
    """Silence the exporters' and NNCF's chatter (warnings stay in the table)."""
    warnings.filterwarnings("ignore")
    for name in ("torch.onnx", "torch._export", "torch.export", "nncf", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import nncf

    nncf.set_log_level(logging.ERROR)


# ---------------------------------------------------------------- the model


def trained_looking_unet(size: int) -> nn.Module:
    """The seeded paper U-Net with wide-range conv weights and populated BN statistics."""
    torch.manual_seed(SEED)
    model = PaperUNet()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                w = torch.randn(module.weight.shape, generator=gen) * WEIGHT_STD
                module.weight.copy_(w.clamp(-1.0, 1.0))
    populate_batchnorm(model, size, seed=SEED + 1)
    return model


def populate_batchnorm(model: nn.Module, size: int, seed: int) -> None:
    """Set every BatchNorm's running statistics to their average over ``BN_PASSES``
    train-mode forward passes on random 1x1xSxS inputs (no gradients)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(BN_PASSES):
            model(torch.randn(1, 1, size, size, generator=gen))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def nnunet_3d() -> nn.Module:
    """nnU-Net's 3d full-resolution ``PlainConvUNet`` as its planner sizes it for a
    64x128x128 patch: 6 stages of 32-64-128-256-320-320 features, 2 convs (3x3x3, bias)
    per stage in the encoder and decoder, InstanceNorm3d (affine) + LeakyReLU, strides
    1, 2, 2, 2, 2, (1, 2, 2) (bottleneck 4x4x4), 1 input channel, 3 classes, no deep
    supervision (as nnU-Net infers); seeded, with nnU-Net's He initialization."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(SEED)
    model = PlainConvUNet(
        input_channels=1, n_stages=6, features_per_stage=(32, 64, 128, 256, 320, 320), conv_op=nn.Conv3d,
        kernel_sizes=3, strides=(1, 2, 2, 2, 2, (1, 2, 2)), n_conv_per_stage=2, num_classes=3,
        n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=False,
    )  # fmt: skip
    model.apply(PlainConvUNet.initialize)
    return model.eval()


def recipe(act_bits: int, weight_frac_bits: int, every_layer: bool = False) -> dict:
    """The default recipe with unsigned Q<act_bits>.0 activations and Q0.<frac> weights;
    ``every_layer`` quantizes the first and last layers too (NNCF's policy) and puts the
    exact recipe's unsigned 8-bit input grid on [0, 1] before the first layer."""
    spec = qseg.recipes.load("unet-qa6.0-qw0.4").to_dict()
    spec["name"] = f"unet-qa{act_bits}.0-qw0.{weight_frac_bits}" + ("-exact" if every_layer else "")
    if every_layer:
        spec["keep_float"] = {"first": False, "last": False}
        spec["input"] = qseg.recipes.load("unet-qa6.0-qw0.4-exact").input.to_dict()
    spec["weights"] = {"kind": "fixed_point", "int_bits": 0, "frac_bits": weight_frac_bits}
    spec["activations"] = {"kind": "fixed_point", "int_bits": act_bits, "frac_bits": 0, "signed": False}
    return spec


# ---------------------------------------------------------------- exports


@dataclass
class QsegExport:
    """A prepared, converted and exported recipe."""

    label: str
    converted: nn.Module
    onnx_path: Path
    xml_path: Path
    convert_warnings: list[str]
    note: str = ""


def export_qseg(
    float_model: nn.Module, spec: dict, label: str, x: torch.Tensor, out: Path, weights: str = "int8"
) -> QsegExport:
    """prepare -> BN statistics -> convert -> QDQ ONNX (``weights`` storage) -> OpenVINO IR."""
    prepared = qseg.prepare(float_model, spec, example_inputs=x)
    populate_batchnorm(prepared, x.shape[-1], seed=SEED + 2)
    converted = qseg.convert(prepared)
    stem = spec["name"] + ("-int4" if weights == "int4" else "")
    onnx_path = qseg.export_onnx(converted, x, out / f"{stem}.onnx", weights=weights)
    note = ""
    xml_path = openvino_from_onnx(onnx_path, out / f"{stem}.xml")
    return QsegExport(label, converted, onnx_path, xml_path, converted.qseg_convert.warnings, note)


def plain_openvino_ir(onnx_path: Path, xml_out: Path) -> Path:
    """OpenVINO's own conversion of an ONNX file, without what
    ``qseg.exporters.openvino_from_onnx`` adds (the ``Convert(i4 -> i8)`` after INT4
    weights and ``openvino_form``), for comparison."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_out), compress_to_fp16=False)
    return xml_out


def calibration_inputs(shape: tuple[int, ...], samples: int) -> list[np.ndarray]:
    """``samples`` seeded N(0, 1) inputs of ``shape``: NNCF's calibration data, and qseg's
    where a section calibrates (the same arrays for both)."""
    rng = np.random.default_rng(SEED + 3)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(samples)]


def nncf_int8_ir(
    fp32_xml: Path, shape: tuple[int, ...], out: Path, samples: int = CALIBRATION_SAMPLES
) -> Path:
    """``nncf.quantize`` with its defaults on the FP32 IR, ``samples`` calibration inputs
    (:func:`calibration_inputs`); saved as ``out / "nncf-int8.xml"``."""
    import nncf
    import openvino as ov

    data = calibration_inputs(shape, samples)
    quantized = nncf.quantize(ov.Core().read_model(str(fp32_xml)), nncf.Dataset(data))
    path = out / "nncf-int8.xml"
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    return path


# ---------------------------------------------------------------- inspection


def ov_kernels(
    xml: Path, threads: int, exact: bool = True, layer_types: tuple[str, ...] = ("Convolution",)
) -> str:
    """'13 u8 + 2 f32': the runtime precisions of the compiled model's convolutions; with
    several ``layer_types``, one count per type ('Convolution 18 u8 + 5 f32; Deconvolution 5 f32')."""
    precisions = runtime_precisions(xml, threads, layer_types, exact=exact)
    counts = {t: Counter(p.precision for p in precisions if p.layer_type == t) for t in layer_types}
    described = {
        t: " + ".join(f"{n} {precision}" for precision, n in c.most_common()) for t, c in counts.items()
    }
    if len(layer_types) == 1:
        return described[layer_types[0]]
    return "; ".join(f"{t} {d or 0}" for t, d in described.items())


def ort_kernels(onnx_path: Path) -> str:
    """'13 QLinearConv + 2 Conv': the conv ops onnxruntime executes after optimization."""
    counts = {op: n for op, n in onnxruntime_ops(onnx_path).items() if "Conv" in op}
    return " + ".join(f"{n} {op}" for op, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def file_size(path: Path) -> int:
    """Bytes on disk: an .onnx file, or an IR's xml plus its bin."""
    if path.suffix == ".xml":
        return path.stat().st_size + path.with_suffix(".bin").stat().st_size
    return path.stat().st_size


def ov_weight_bytes(xml: Path) -> int:
    """Bytes of the conv weight tensors as stored in an IR: for every Convolution, the
    largest constant its weight input is computed from (codes before Convert/Multiply)."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    total = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Convolution":
            continue
        constants, stack = [], [op.input_value(1).get_node()]
        while stack:
            node = stack.pop()
            if node.get_type_name() == "Constant":
                constants.append(node)
            else:
                stack.extend(v.get_node() for v in node.input_values())
        total += max(constants, key=lambda c: math.prod(c.get_output_shape(0))).get_byte_size()
    return total


ONNX_BITS = {"FLOAT": 32, "FLOAT16": 16, "INT8": 8, "UINT8": 8, "INT16": 16, "INT4": 4, "UINT4": 4}


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of the conv weight initializers as stored in an ONNX file (through a
    DequantizeLinear where there is one)."""
    import onnx

    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    total = 0
    for node in proto.graph.node:
        if node.op_type != "Conv":
            continue
        name = node.input[1]
        while name not in inits:
            name = producer[name].input[0]
        init = inits[name]
        bits = ONNX_BITS[onnx.TensorProto.DataType.Name(init.data_type)]
        total += math.ceil(math.prod(init.dims) * bits / 8)
    return total


def conv_weight_bytes_fp32(model: nn.Module) -> int:
    """Bytes of the (not transposed) conv weights in float32, as ``ov_weight_bytes`` counts them."""
    return sum(4 * m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))


# ---------------------------------------------------------------- runners


def torch_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    model = model.eval()

    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return run


def openvino_runner(xml: Path, x: np.ndarray, threads: int, exact: bool = True) -> Callable[[], object]:
    import openvino as ov

    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    compiled = compile_openvino(xml, threads=threads, exact=exact, config=config, shapes=[x.shape])
    request = compiled.create_infer_request()
    request.set_input_tensor(ov.Tensor(x))
    return request.infer


def onnxruntime_runner(path: Path, x: np.ndarray, threads: int) -> Callable[[], object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


@dataclass
class Variant:
    """One row of the table; ``times[r]`` is its latency in timed round ``r``."""

    name: str
    runtime: str  # torch | openvino | onnxruntime
    run: Callable[[], object]
    kernels: str = "-"
    size: int | None = None
    weight_bytes: int | None = None
    times: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times)

    @property
    def min_ms(self) -> float:
        return 1e3 * min(self.times)

    def ratio(self, other: Variant) -> float:
        """Median over rounds of ``self / other`` latency in the same round (paired, so
        that load which comes and goes cancels); below 1 means ``self`` is faster."""
        return statistics.median(a / b for a, b in zip(self.times, other.times, strict=True))


def interleave(variants: list[Variant], runs: int, warmup: int, pause: float) -> None:
    """Round-robin timing: each round runs every variant once, starting one later each round."""
    n = len(variants)
    for r in range(warmup + runs):
        for k in range(n):
            v = variants[(r + k) % n]
            start = time.perf_counter()
            v.run()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                v.times.append(elapsed)
            time.sleep(pause)


def ov_variant(
    name: str,
    xml: Path,
    x: np.ndarray,
    threads: int,
    exact: bool = True,
    layer_types: tuple[str, ...] = ("Convolution",),
) -> Variant:
    """A row for an OpenVINO IR: its runner, the kernels of ``layer_types``, file size and
    conv weight bytes."""
    return Variant(
        name,
        "openvino",
        openvino_runner(xml, x, threads, exact),
        ov_kernels(xml, threads, exact, layer_types),
        file_size(xml),
        ov_weight_bytes(xml),
    )


def ort_variant(name: str, path: Path, x: np.ndarray, threads: int) -> Variant:
    """A row for an ONNX file in onnxruntime: its runner, conv ops, file size and conv weight bytes."""
    return Variant(
        name,
        "onnxruntime",
        onnxruntime_runner(path, x, threads),
        ort_kernels(path),
        file_size(path),
        onnx_weight_bytes(path),
    )


# ---------------------------------------------------------------- report


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def print_table(variants: list[Variant], fp32_weight_bytes: int) -> None:
    ov_ref = next(v for v in variants if v.name.startswith("OpenVINO FP32"))
    ort_ref = next((v for v in variants if v.name.startswith("onnxruntime FP32")), None)
    header = (
        "variant",
        "median ms",
        "min ms",
        "speed-up vs OV FP32",
        "conv kernels",
        "file size",
        "weight bytes (vs FP32)",
    )
    rows = []
    for v in variants:
        speedup = f"{1 / v.ratio(ov_ref):.2f}x"
        if v.runtime == "onnxruntime" and ort_ref is not None:
            speedup += f" ({1 / v.ratio(ort_ref):.2f}x vs ORT FP32)"
        weights = (
            "-"
            if v.weight_bytes is None
            else f"{mib(v.weight_bytes)} ({v.weight_bytes / fp32_weight_bytes:.3f}x)"
        )
        rows.append(
            (v.name, f"{v.median_ms:.1f}", f"{v.min_ms:.1f}", speedup, v.kernels, mib(v.size), weights)
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print(
        "  speed-up: median over rounds of (reference / variant) in the same round; "
        "median and min ms: over rounds"
    )


def parity_line(
    e: QsegExport, x: torch.Tensor, threads: int, ir_path: Path | None = None, exact: bool = True
) -> str:
    """check_parity's verdict per runtime (OpenVINO compiled with ``exact``), and how far
    the two runtimes are from each other."""
    onnx_path = None if ir_path else e.onnx_path
    ir_path = ir_path or e.xml_path
    results = check_parity(e.converted, x, onnx_path, ir_path, threads, exact=exact)
    parts = [str(r) for r in results]
    if onnx_path is not None:
        ort = run_onnxruntime(onnx_path, (x,), threads)[0]
        ov = run_openvino(ir_path, (x,), threads, exact=exact)[0]
        parts.append(f"|onnxruntime - openvino| max {np.abs(ort - ov).max():.3g}")
    return "; ".join(parts)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def investigate_int4(int4_xml: Path, int4_onnx: Path, plain_xml: Path, threads: int) -> list[str]:
    """How OpenVINO executes INT4-stored convs: qseg's IR (an explicit Convert(i4 -> i8)
    after each INT4 weight), OpenVINO's plain conversion, the ONNX read directly, and the
    precision hints."""
    import openvino as ov

    lines = [
        f"  qseg IR (INT4 storage, {mib(file_size(int4_xml))}): conv kernels {ov_kernels(int4_xml, threads)}",
        f"  OpenVINO's plain conversion of the same ONNX: conv kernels {ov_kernels(plain_xml, threads)}",
        f"  the INT4 ONNX read directly by OpenVINO (no IR): {ov_kernels(int4_onnx, threads)}",
    ]
    model = ov.Core().read_model(str(plain_xml))
    for hint in ("bf16", "f16", "i8"):
        try:
            compiled = compile_openvino(
                model, threads=threads, exact=False, config={"INFERENCE_PRECISION_HINT": hint}
            )
        except Exception as exc:
            reason = next((s for s in str(exc).splitlines() if "Supported values" in s), str(exc)[:100])
            lines.append(f"  plain IR, INFERENCE_PRECISION_HINT={hint}: rejected: {reason.strip()}")
            continue
        counts = Counter(
            op.get_rt_info()["runtimePrecision"].astype(str)
            for op in compiled.get_runtime_model().get_ordered_ops()
            if op.get_rt_info()["layerType"].astype(str) == "Convolution"
        )
        effective = compiled.get_property("INFERENCE_PRECISION_HINT")
        effective = effective.get_type_name() if hasattr(effective, "get_type_name") else str(effective)
        lines.append(
            f"  plain IR, INFERENCE_PRECISION_HINT={hint}: runs as {effective} on this CPU, conv kernels "
            + " + ".join(f"{n} {p}" for p, n in counts.most_common())
        )
    return lines


# ---------------------------------------------------------------- main


def paper_unet_section(args: argparse.Namespace, out: Path) -> None:
    """Paper A's U-Net: every variant of the module docstring's list, the table, parity,
    goals, profiles and the INT4 investigation."""
    print(
        f"# PaperUNet, input 1x1x{args.size}x{args.size}, median of {args.runs} interleaved rounds "
        f"after {args.warmup} warm-up rounds; files in {out}"
    )
    started = time.perf_counter()
    x = torch.randn(1, 1, args.size, args.size, generator=torch.Generator().manual_seed(SEED + 4))
    x_np = x.numpy()
    model = trained_looking_unet(args.size)
    fp32_weight_bytes = conv_weight_bytes_fp32(model)

    float_onnx = qseg.export_onnx(model, x, out / "float.onnx")
    float_xml = openvino_from_onnx(float_onnx, out / "float.xml")
    exports = {
        "qa6w4": export_qseg(model, recipe(6, 4), "Qa6.0/Qw0.4", x, out),
        "qa8w7": export_qseg(model, recipe(8, 7), "Qa8.0/Qw0.7", x, out),
        "qa7w7": export_qseg(model, recipe(7, 7), "Qa7.0/Qw0.7", x, out),
        "every": export_qseg(model, recipe(6, 4, every_layer=True), "exact (all int8)", x, out),
        "int4": export_qseg(model, recipe(6, 3), "Qa6.0/Qw0.3 INT4", x, out, weights="int4"),
    }
    plain_int4_xml = plain_openvino_ir(exports["int4"].onnx_path, out / "unet-qa6.0-qw0.3-int4-plain.xml")
    unfused_xml = openvino_from_onnx(
        exports["qa6w4"].onnx_path, out / "unet-qa6.0-qw0.4-unfused.xml", fuse_quantizers=False
    )
    nncf_xml = nncf_int8_ir(float_xml, (1, 1, args.size, args.size), out)
    print(f"# models built and exported in {time.perf_counter() - started:.0f} s")

    def ov(name: str, xml: Path, exact: bool = True) -> Variant:
        return ov_variant(name, xml, x_np, args.threads, exact)

    def ort(name: str, path: Path) -> Variant:
        return ort_variant(name, path, x_np, args.threads)

    variants = [
        Variant("PyTorch eager FP32", "torch", torch_runner(model, x), weight_bytes=fp32_weight_bytes),
        ov("OpenVINO FP32 IR", float_xml),
        ov("  same, exact=False", float_xml, exact=False),
        ov("qseg IR Qa6.0/Qw0.4 (default)", exports["qa6w4"].xml_path),
        ov("  same, exact=False", exports["qa6w4"].xml_path, exact=False),
        ov("  same ONNX, plain conversion (no openvino_form)", unfused_xml),
        ov("qseg IR Qa8.0/Qw0.7", exports["qa8w7"].xml_path),
        ov("qseg IR Qa7.0/Qw0.7", exports["qa7w7"].xml_path),
        ov("qseg IR exact (input grid, first + last int8)", exports["every"].xml_path),
        ov("  same, exact=False", exports["every"].xml_path, exact=False),
        ov("qseg IR Qa6.0/Qw0.3 INT4 weights", exports["int4"].xml_path),
        ov("  same, OpenVINO's plain conversion", plain_int4_xml),
        ov("NNCF int8 IR (defaults)", nncf_xml),
        ov("  same, exact=False", nncf_xml, exact=False),
        ort("onnxruntime FP32", float_onnx),
        ort("onnxruntime qseg QDQ Qa6.0/Qw0.4", exports["qa6w4"].onnx_path),
    ]
    interleave(variants, args.runs, args.warmup, PAUSE_S)

    print()
    print_table(variants, fp32_weight_bytes)

    print()
    print(
        "## parity against the converted PyTorch model (qseg.exporters.check_parity; OpenVINO "
        "compiled exact=True, then exact=False)"
    )
    for e in exports.values():
        print(f"  {e.label:<18} {parity_line(e, x, args.threads)}")
        print(f"  {'  exact=False':<18} {parity_line(e, x, args.threads, exact=False)}")
    print(f"  {'INT4 plain IR':<18} {parity_line(exports['int4'], x, args.threads, ir_path=plain_int4_xml)}")
    print(
        f"  {'Qa6.0/Qw0.4 plain':<18} {parity_line(exports['qa6w4'], x, args.threads, ir_path=unfused_xml)}"
    )
    for e in exports.values():
        kinds = Counter(w.split(": ", 1)[-1] for w in e.convert_warnings)
        for message, n in kinds.items():
            print(f"  qseg.convert warning, {e.label}: {n} layers: {message}")
        if e.note:
            print(f"  note, {e.label}: {e.note}")

    by_name = {v.name: v for v in variants}
    fp32 = by_name["OpenVINO FP32 IR"]
    nncf_v = by_name["NNCF int8 IR (defaults)"]
    qseg_v = by_name["qseg IR Qa6.0/Qw0.4 (default)"]
    q8_v = by_name["qseg IR Qa8.0/Qw0.7"]
    int4_v = by_name["qseg IR Qa6.0/Qw0.3 INT4 weights"]
    int4_ratio = int4_v.weight_bytes / fp32_weight_bytes
    print()
    print("## goals")
    vs_nncf = qseg_v.ratio(nncf_v)
    print(
        f"  {verdict(vs_nncf <= 1.0)}  qseg int8 IR latency <= NNCF int8 IR latency: "
        f"qseg / NNCF = {vs_nncf:.3f} (medians {qseg_v.median_ms:.1f} vs {nncf_v.median_ms:.1f} ms, "
        f"min {qseg_v.min_ms:.1f} vs {nncf_v.min_ms:.1f} ms; Qa8.0/Qw0.7: {q8_v.ratio(nncf_v):.3f})"
    )
    every = by_name["qseg IR exact (input grid, first + last int8)"]
    unfused = by_name["  same ONNX, plain conversion (no openvino_form)"]
    print(
        f"        same policy as NNCF (all 15 convs int8): qseg / NNCF = {every.ratio(nncf_v):.3f}; "
        f"the default before openvino_form: {unfused.ratio(nncf_v):.3f}"
    )
    speedup = 1 / qseg_v.ratio(fp32)
    print(
        f"  {verdict(speedup >= GOAL_SPEEDUP)}  qseg int8 IR >= {GOAL_SPEEDUP}x faster than FP32 IR: "
        f"{speedup:.2f}x (min/min {fp32.min_ms / qseg_v.min_ms:.2f}x; Qa8.0/Qw0.7 {1 / q8_v.ratio(fp32):.2f}x, "
        f"NNCF {1 / nncf_v.ratio(fp32):.2f}x)"
    )
    pairs = [(variants[i - 1], v) for i, v in enumerate(variants) if v.name == "  same, exact=False"]
    print(
        "        exact=False / exact=True latency (below 1: what pinning f32 costs on this CPU): "
        + ", ".join(f"{exact.name.strip()} {loose.ratio(exact):.3f}" for exact, loose in pairs)
    )
    exact_results = check_parity(
        exports["every"].converted, x, exports["every"].onnx_path, exports["every"].xml_path, args.threads
    )
    print(
        f"  {verdict(all(r.exact for r in exact_results))}  exact variant bit-exact in both runtimes "
        f"(OpenVINO exact=True): {'; '.join(str(r) for r in exact_results)}"
    )
    print(
        f"  {verdict(int4_ratio <= GOAL_INT4_RATIO)}  4-bit weights <= {GOAL_INT4_RATIO}x FP32 weight bytes: "
        f"{int4_ratio:.3f}x ({mib(int4_v.weight_bytes)} of {mib(fp32_weight_bytes)}; whole IR "
        f"{int4_v.size / fp32.size:.3f}x of the FP32 IR)"
    )

    print()
    print(
        "## where OpenVINO spends the time (per-node performance counters, mean of 5 runs, "
        "not interleaved: read the shares)"
    )
    profiled = (
        ("OpenVINO FP32 IR", float_xml),
        ("qseg IR Qa6.0/Qw0.4 (default)", exports["qa6w4"].xml_path),
        ("qseg IR, plain conversion", unfused_xml),
        ("NNCF int8 IR (defaults)", nncf_xml),
    )
    for name, xml in profiled:
        print(profile_line(name, profile_openvino(xml, x_np, args.threads)))

    print()
    print("## INT4 weights in OpenVINO: int8 or f32 kernels?")
    for line in investigate_int4(
        exports["int4"].xml_path, exports["int4"].onnx_path, plain_int4_xml, args.threads
    ):
        print(line)


def nnunet3d_section(args: argparse.Namespace, out: Path) -> None:
    """nnU-Net's 3d PlainConvUNet (:func:`nnunet_3d`) on one 1x1x64x128x128 volume: the
    OpenVINO FP32 IR, qseg's ``int8`` recipe (prepared, calibrated on the volumes NNCF
    gets, converted, ``qseg.export_openvino``) and NNCF's int8 IR, interleaved, then the
    parity of qseg's IR against the converted model."""
    out = out / "nnunet3d"
    out.mkdir(parents=True, exist_ok=True)
    shape = NNUNET3D_SHAPE
    print()
    print(
        f"## nnU-Net 3d PlainConvUNet, input {'x'.join(map(str, shape))}, median of {args.runs3d} "
        f"interleaved rounds after {args.warmup3d} warm-up rounds; files in {out}"
    )
    started = time.perf_counter()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(SEED + 4))
    x_np = x.numpy()
    model = nnunet_3d()
    fp32_weight_bytes = conv_weight_bytes_fp32(model)

    float_xml = openvino_from_onnx(qseg.export_onnx(model, x, out / "float.onnx"), out / "float.xml")
    data = [torch.from_numpy(a) for a in calibration_inputs(shape, NNUNET3D_CALIBRATION_SAMPLES)]
    prepared = qseg.prepare(model, "int8", example_inputs=x)
    qseg.calibrate(prepared, data, progress=False)
    converted = qseg.convert(prepared)
    qseg_xml = qseg.export_openvino(converted, x, out / "qseg-int8.xml")
    # the same recipe with a quantizer on every conv output that feeds an InstanceNorm
    norm_inputs = qseg.recipes.load("int8").replace(quantize_norm_inputs=True)
    prepared_ni = qseg.prepare(model, norm_inputs, example_inputs=x)
    qseg.calibrate(prepared_ni, data, progress=False)
    converted_ni = qseg.convert(prepared_ni)
    qseg_ni_xml = qseg.export_openvino(converted_ni, x, out / "qseg-int8-norm-inputs.xml")
    nncf_xml = nncf_int8_ir(float_xml, shape, out, samples=NNUNET3D_CALIBRATION_SAMPLES)
    print(f"# built, calibrated and exported in {time.perf_counter() - started:.0f} s")

    kinds = ("Convolution", "Deconvolution", "MVN")
    variants = [
        ov_variant("OpenVINO FP32 IR", float_xml, x_np, args.threads, layer_types=kinds),
        ov_variant("qseg IR int8", qseg_xml, x_np, args.threads, layer_types=kinds),
        ov_variant("qseg IR int8, norm inputs", qseg_ni_xml, x_np, args.threads, layer_types=kinds),
        ov_variant("NNCF int8 IR (defaults)", nncf_xml, x_np, args.threads, layer_types=kinds),
    ]
    interleave(variants, args.runs3d, args.warmup3d, PAUSE_S)
    print()
    print_table(variants, fp32_weight_bytes)
    print()
    print("## where OpenVINO spends the time (per-node performance counters, mean of 5 runs)")
    profiled = (
        ("OpenVINO FP32 IR", float_xml),
        ("qseg IR int8", qseg_xml),
        ("qseg IR int8, norm inputs", qseg_ni_xml),
        ("NNCF int8 IR", nncf_xml),
    )
    for name, xml in profiled:
        print(profile_line(name, profile_openvino(xml, x_np, args.threads)))
    print()
    print("## parity of qseg's IR against the converted PyTorch model (check_parity, OpenVINO exact=True)")
    for name, conv, xml in (("int8", converted, qseg_xml), ("int8, norm inputs", converted_ni, qseg_ni_xml)):
        print(f"  {name}: {'; '.join(str(r) for r in check_parity(conv, x, None, xml, args.threads))}")
    with torch.inference_mode():
        reference = model(x).numpy().argmax(1)
    agree = {
        name: (run_openvino(xml, (x,), args.threads)[0].argmax(1) == reference).mean()
        for name, xml in (
            ("OpenVINO FP32 IR", float_xml),
            ("qseg IR", qseg_xml),
            ("qseg IR, norm inputs", qseg_ni_xml),
            ("NNCF IR", nncf_xml),
        )
    }
    print(
        "  for scale, voxels of the float PyTorch model's class: "
        + ", ".join(f"{name} {100 * share:.2f}%" for name, share in agree.items())
    )
    kinds_warned = Counter(w.split(": ", 1)[-1] for w in converted.qseg_convert.warnings)
    for message, n in kinds_warned.items():
        print(f"  qseg.convert warning: {n} layers: {message}")
    print(f"# nnU-Net 3d section: {time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="timed rounds (medians over these)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="input height and width (multiple of 8)")
    parser.add_argument("--out", type=Path, default=None, help="where the files go (default: a temp dir)")
    parser.add_argument(
        "--only", choices=("unet", "nnunet3d"), default=None, help="run one section (default: both)"
    )
    parser.add_argument("--runs3d", type=int, default=10, help="timed rounds of the nnU-Net 3d section")
    parser.add_argument("--warmup3d", type=int, default=1, help="untimed rounds first, nnU-Net 3d section")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="qseg-deploy-"))
    out.mkdir(parents=True, exist_ok=True)
    quiet()
    torch.set_num_threads(args.threads)
    PaperUNet.check_input_size(args.size, args.size)

    print(f"# {versions()}")
    print(
        f"# CPU: {cpu_name()} ({os.cpu_count()} logical CPUs; OpenVINO bf16: {cpu_features().bf16}), "
        f"{args.threads} threads"
    )
    sections = {"unet": paper_unet_section, "nnunet3d": nnunet3d_section}
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    for name, section in sections.items():
        if args.only in (None, name):
            section(args, out)
    print(
        f"# total {time.perf_counter() - started:.0f} s; 1-min load average {load_start:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end (on {os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()
