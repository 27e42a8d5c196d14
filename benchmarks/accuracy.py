"""Accuracy of every built-in recipe on real microscopy, and the suggestive-annotation experiment.

Data: the HeLa time-lapse (``qseg.data``; frames 0-15 train, 16-19 test, downscaled 2x,
96 x 96 training crops). The masks are an automatic method's output (Cell Tracking
Challenge ERR_SEG), not a human annotation: dice measures agreement with it.

a) Recipes. One float U-Net (``--widths``) trains ``--float-epochs``; then, for the float
   model and for each built-in recipe, a copy trains ``--tune-epochs`` more with that
   recipe's optimizer, schedule and loss (the float copy with paper A's training): quantization-
   aware fine-tuning, INQ stages spread over the epochs for INQ recipes. Dice of each on the
   test frames, the delta to the float copy, beside the deltas the papers report. Extra
   rows (``--lr-variants``, default ``unet-bnn=0.01``) run a recipe at another learning
   rate: BNN at the paper's 1e-3 is far from converged after a few epochs.
b) Suggestive annotation (``--sa-rounds`` > 0). The pool is the training crops; 16 random
   crops start labelled. Each round, 5 models (float, or quantized with INQ 7 bit) trained on
   bootstrap samples pick 8 of the 16 most uncertain crops (paper B's setup,
   ``fcn-sa-inq7``). Then a network trained with INQ 7 bit on the SA-selected set is compared
   with one trained on a random set of the same size.

Run: ``python benchmarks/accuracy.py [--threads 2] [--quick]`` (long: tens of minutes on a
2-core CPU; ``--quick`` is a smaller network and fewer epochs, for a first look).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time

import torch
from machine import cpu_name  # benchmarks/machine.py (scripts run from this folder)

import qseg
from qseg.active import AnnotationLoop, default_train
from qseg.data import HELA_SOURCE, load_hela, tiles
from qseg.inq import Schedule
from qseg.metrics import dice_score
from qseg.models import PaperUNet
from qseg.recipes import builtin_names, load
from qseg.train import fit, predict

# dice deltas to full precision reported by paper A (EM / GM / NIH, dice points)
PAPER_A_FLOAT = (94.05, 56.32, 75.69)
PAPER_A = {
    "unet-qa8.8-qw8.8": (92.02, 56.11, 74.61),
    "unet-qa8.0-qw0.8": (92.21, 56.10, 73.05),
    "unet-qa6.0-qw0.4": (91.03, 55.85, 73.48),
    "unet-qa4.0-qw0.2": (79.80, 51.80, 71.77),
    "unet-bnn": (78.53, 31.44, 72.56),
    "unet-ternarynet": (None, None, 73.9),
}
PAPER_B = {
    "fcn-inq7": "best setting",
    "fcn-inq5": "close to INQ 7",
    "fcn-dorefa": "collapses on FCNs",
    "fcn-twn": "collapses on FCNs",
    "fcn-sa-inq7": "see part b",
}
GOALS = {"unet-qa6.0-qw0.4": 1.0, "fcn-inq7": 0.5}  # max dice points below float


def paper_delta(name: str) -> str:
    if name in PAPER_A:
        parts = [
            "-" if q is None else f"{q - f:+.2f}" for q, f in zip(PAPER_A[name], PAPER_A_FLOAT, strict=True)
        ]
        return "A: " + " / ".join(parts)
    return "B: " + PAPER_B.get(name, "-")


def dice_of(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor) -> float:
    return dice_score(predict(model, images) > 0, masks)


def tune(model, recipe, x, y, epochs: int, seed: int, progress: bool):
    """Fine-tune ``model`` (prepared with ``recipe``, or float) with the recipe's training."""
    training = dataclasses.replace(recipe.training, batch_size=8)
    schedule = Schedule(model, recipe.inq.portions) if recipe.inq is not None else None
    epochs = max(epochs, len(recipe.inq.portions)) if recipe.inq is not None else epochs
    fit(
        model,
        x,
        y,
        training,
        epochs=epochs,
        seed=seed,
        inq=schedule,
        progress=progress,
        description=recipe.name,
    )
    return model


def recipes_to_run(args) -> list[tuple[str, qseg.Recipe]]:
    """The built-ins asked for, then each ``--lr-variants`` entry ``name=lr`` as the
    recipe ``name`` with only its learning rate changed (row ``name, lr X``)."""
    out = [(name, load(name)) for name in args.recipes]
    for text in args.lr_variants:
        name, _, lr = text.partition("=")
        recipe = load(name)
        training = dataclasses.replace(recipe.training, lr=float(lr))
        out.append((f"{name}, lr {float(lr):g}", dataclasses.replace(recipe, training=training)))
    return out


def part_a(args, data, x, y) -> None:
    torch.manual_seed(args.seed)
    base = PaperUNet(widths=args.widths)
    start = time.perf_counter()
    paper_a_training = dataclasses.replace(load("unet-qa6.0-qw0.4").training, batch_size=8)
    fit(
        base,
        x,
        y,
        paper_a_training,
        epochs=args.float_epochs,
        seed=args.seed,
        progress=args.progress,
        description="float",
    )
    print(f"# float model: {args.float_epochs} epochs in {time.perf_counter() - start:.0f} s", flush=True)
    reference = copy.deepcopy(base)
    fit(
        reference,
        x,
        y,
        paper_a_training,
        epochs=args.tune_epochs,
        seed=args.seed + 1,
        progress=args.progress,
        description="float tune",
    )
    float_dice = dice_of(reference, data.test_images, data.test_masks)
    rows = [("float (same extra epochs)", float_dice, 0.0, "-", "-", float("nan"))]
    for name, recipe in recipes_to_run(args):
        started = time.perf_counter()
        qmodel = qseg.prepare(base, recipe, example_inputs=x[:1])
        before = dice_of(qmodel, data.test_images, data.test_masks) if recipe.inq is None else float("nan")
        tune(qmodel, recipe, x, y, args.tune_epochs, args.seed + 1, args.progress)
        d = dice_of(qmodel, data.test_images, data.test_masks)
        goal = GOALS.get(name)
        verdict = "-" if goal is None else ("met" if (float_dice - d) * 100 <= goal else "MISSED")
        rows.append((name, d, (d - float_dice) * 100, paper_delta(name.split(",")[0]), verdict, before))
        print(f"# {name}: {time.perf_counter() - started:.0f} s", flush=True)
    print()
    print(f"## a) recipes: dice on HeLa test frames {list(data.test_frames)}")
    print(
        "| recipe | dice | delta vs float (points) | paper's delta (points) | goal | dice before fine-tuning |"
    )
    print("|---|---|---|---|---|---|")
    for name, d, delta, paper, verdict, before in rows:
        before_text = "-" if name.startswith("float") or before != before else f"{before:.4f}"
        print(f"| {name} | {d:.4f} | {delta:+.2f} | {paper} | {verdict} | {before_text} |")
    print("goals: Qa6.0/Qw0.4 within 1.0 dice point of float; INQ 7 bit within 0.5.")


def train_inq_from_scratch(model, images, masks, recipe, epochs: int, seed: int):
    """``default_train`` with the recipe's training at batch 8: half of the epochs in float
    (INQ starts from a trained net), the other half through the stages."""
    training = dataclasses.replace(recipe.training, batch_size=8)
    return default_train(
        model, images, masks, seed, training=training, epochs=epochs, inq_portions=recipe.inq.portions
    )


def part_b(args, data, x, y) -> None:
    sa = load("fcn-sa-inq7")
    settings = sa.suggestive_annotation
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(x), generator=gen)
    start_idx, pool_idx = order[: args.sa_start], order[args.sa_start :]
    n_final = args.sa_start + args.sa_rounds * settings.selected
    ensemble_training = dataclasses.replace(
        load("unet-qa6.0-qw0.4").training, batch_size=8, epochs=args.sa_epochs
    )
    results = {}
    for kind in ("float", "INQ 7 bit"):
        recipe = sa if kind != "float" else None

        def factory(recipe=recipe):
            net = PaperUNet(widths=args.sa_widths)
            return net if recipe is None else qseg.prepare(net, recipe, example_inputs=x[:1])

        def train_fn(model, images, masks, seed, recipe=recipe):
            if recipe is None:
                return default_train(model, images, masks, seed, training=ensemble_training)
            return train_inq_from_scratch(model, images, masks, recipe, args.sa_epochs, seed)

        started = time.perf_counter()
        loop = AnnotationLoop(
            factory,
            x[start_idx],
            y[start_idx],
            x[pool_idx],
            y[pool_idx],
            n_models=settings.models,
            k=settings.selected,
            candidates=settings.candidates,
            uncertainty=settings.uncertainty,
            train_fn=train_fn,
            seed=args.seed,
            progress=args.progress,
        )
        loop.run(args.sa_rounds)
        print(f"# SA with {kind} models: {time.perf_counter() - started:.0f} s", flush=True)
        results[f"SA ({kind} ensemble)"] = (loop.images, loop.masks)
    random_idx = order[:n_final]
    results["random subset"] = (x[random_idx], y[random_idx])
    print()
    print(
        f"## b) suggestive annotation: {n_final} labelled crops ({args.sa_start} random + {args.sa_rounds} rounds x {settings.selected}), network trained with INQ 7 bit"
    )
    print("| labelled set | crops | dice (test frames) |")
    print("|---|---|---|")
    for name, (images, masks) in results.items():
        torch.manual_seed(args.seed)
        net = qseg.prepare(PaperUNet(widths=args.widths), sa, example_inputs=x[:1])
        train_inq_from_scratch(net, images, masks, sa, args.nt_epochs, args.seed)
        print(
            f"| {name} | {len(images)} | {dice_of(net, data.test_images, data.test_masks):.4f} |", flush=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smaller network, fewer epochs")
    parser.add_argument("--recipes", nargs="*", default=list(builtin_names()))
    parser.add_argument(
        "--lr-variants",
        nargs="*",
        default=["unet-bnn=0.01"],
        help="extra rows: a built-in with another learning rate, as name=lr",
    )
    parser.add_argument(
        "--tune-epochs", type=int, default=None, help="fine-tuning epochs per recipe (default 4, --quick 2)"
    )
    parser.add_argument("--sa-rounds", type=int, default=3)
    parser.add_argument("--skip-recipes", action="store_true")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quick = args.quick
    args.widths = (8, 16, 32, 32) if quick else (16, 32, 64, 64)
    args.float_epochs = 4 if quick else 6
    if args.tune_epochs is None:
        args.tune_epochs = 2 if quick else 4
    args.sa_widths = (8, 16, 16, 16)
    args.sa_start = 16
    args.sa_epochs = 4 if quick else 8
    args.nt_epochs = 30 if quick else 60
    data = load_hela(test_frames=4, downscale=2)
    x, y = tiles(data.train_images, data.train_masks, 96)
    print(f"# {cpu_name()}, {args.threads} threads, torch {torch.__version__}; {' '.join(sys.argv)}")
    print(f"# data: {HELA_SOURCE}; {len(x)} training crops 96x96, test frames {list(data.test_frames)}")
    print(
        f"# network: PaperUNet widths {args.widths}; float {args.float_epochs} epochs, then {args.tune_epochs} per recipe"
    )
    if not args.skip_recipes:
        part_a(args, data, x, y)
    if args.sa_rounds > 0:
        part_b(args, data, x, y)


if __name__ == "__main__":
    main()
