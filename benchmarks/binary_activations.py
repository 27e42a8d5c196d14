"""Why a ReLU after a binary or ternary-tanh activation is removed: the same U-Net trained
with the ReLU put back, and as ``prepare`` leaves it.

``prepare`` removes a ReLU that reads a ``binary`` (BNN sign) or ``ternary_tanh``
activation quantizer: with it, sign's -1 becomes 0 and the straight-through gradient
only flows where the sign was +1. This script measures what that costs: PaperUNet
(``--widths``) trained from scratch on the HeLa crops with ``unet-bnn`` and
``unet-ternarynet`` (each recipe's optimizer, schedule and loss; ``--epochs`` epochs,
batch 8), once as prepared and once with ``F.relu`` inserted after every such
quantizer again (what qseg did before), at the recipe's learning rate and at 1e-2.
Dice on the HeLa test frames (masks from an automatic method, not a human).

Run: ``python benchmarks/binary_activations.py`` (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
import torch.nn.functional as F
from machine import cpu_name  # benchmarks/machine.py (scripts run from this folder)
from torch import fx

import qseg
from qseg.data import HELA_SOURCE, load_hela, tiles
from qseg.metrics import dice_score
from qseg.models import PaperUNet
from qseg.nn import ActQuant
from qseg.recipes import load
from qseg.train import fit, predict


def put_relus_back(q: fx.GraphModule) -> int:
    """Insert ``F.relu`` after every binary / ternary-tanh quantizer that follows a
    BatchNorm (the graph qseg built before it removed those ReLUs); returns how many."""
    count = 0
    for node in list(q.graph.nodes):
        module = q.get_submodule(node.target) if node.op == "call_module" else None
        if (
            isinstance(module, ActQuant)
            and module.quantizer.nonlinearity  # binary, ternary tanh
            and module.rule == "after BatchNorm"
        ):
            with q.graph.inserting_after(node):
                relu = q.graph.call_function(F.relu, (node,))
            node.replace_all_uses_with(relu, delete_user_cb=lambda user, r=relu: user is not r)
            count += 1
    q.graph.lint()
    q.recompile()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--widths", type=int, nargs=4, default=(8, 16, 32, 32))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_hela(test_frames=4, downscale=2)
    x, y = tiles(data.train_images, data.train_masks, 96)
    print(f"# {cpu_name()}, {args.threads} threads, torch {torch.__version__}; {' '.join(sys.argv)}")
    print(f"# data: {HELA_SOURCE}; {len(x)} training crops 96x96, test frames {list(data.test_frames)}")
    print(
        f"# PaperUNet widths {tuple(args.widths)} from scratch, {args.epochs} epochs, batch 8, seed {args.seed}"
    )
    print()
    print(
        "| recipe | lr | ReLU after the quantizer | first / last epoch loss | dice | predicted foreground | s |"
    )
    print("|---|---|---|---|---|---|---|")
    runs = [("unet-bnn", None), ("unet-bnn", 1e-2), ("unet-ternarynet", None)]
    for name, lr in runs:
        recipe = load(name)
        training = dataclasses.replace(recipe.training, batch_size=8, lr=lr or recipe.training.lr)
        for relu in (True, False):
            torch.manual_seed(args.seed)
            q = qseg.prepare(PaperUNet(widths=tuple(args.widths)), recipe, example_inputs=x[:1])
            label = f"kept ({put_relus_back(q)} put back)" if relu else "removed (qseg)"
            start = time.perf_counter()
            losses = fit(q, x, y, training, epochs=args.epochs, seed=args.seed, progress=False)
            prediction = predict(q, data.test_images) > 0
            dice = dice_score(prediction, data.test_masks)
            print(
                f"| {name} | {training.lr:g} | {label} | {losses[0]:.3f} / {losses[-1]:.3f} | {dice:.4f} "
                f"| {prediction.float().mean():.3f} | {time.perf_counter() - start:.0f} |",
                flush=True,
            )
    print(f"(truth: {data.test_masks.float().mean():.3f} of test pixels are foreground)")


if __name__ == "__main__":
    main()
