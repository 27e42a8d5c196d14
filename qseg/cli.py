"""The ``qseg`` command: ``demo``, ``recipes``, ``inspect``, ``export`` and ``predict``.

Every error qseg raises on bad input (:class:`~qseg.errors.QsegError`) ends the
command with its message on stderr and exit status 2, the status argparse uses
for a bad command line; a traceback means a bug in qseg.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from qseg.errors import DataError, ExportError, ModelError, QsegError

__all__ = ["build_parser", "load_factory", "main", "parse_shape"]

#: exit status of a command that failed on bad input (argparse uses it for a bad command line)
EXIT_BAD_INPUT = 2

CHECKPOINT_HELP = """\
CHECKPOINT is the state_dict of a *prepared* model, saved with
    torch.save(qmodel.state_dict(), "model.pt")
where qmodel = qseg.prepare(FACTORY(), RECIPE, example_inputs=...). The command rebuilds
that model (FACTORY() -> qseg.prepare(RECIPE) -> load_state_dict(strict=True)), converts
it (qseg.convert) and writes it. --model, --recipe and --input-shape must describe the
model the checkpoint was saved from; a layer or buffer that does not match is an error."""


def parse_shape(text: str, option: str = "--input-shape", example: str = "1,1,64,64") -> tuple[int, ...]:
    """The input shape ``"1,1,64,64"`` (of command-line ``option``) as a tuple of positive integers.

    Raises:
        ModelError: ``text`` is not a comma-separated list of positive integers.

    Example:
        >>> parse_shape("1,1,64,64")
        (1, 1, 64, 64)
        >>> parse_shape("1x64")
        Traceback (most recent call last):
        ...
        qseg.errors.ModelError: --input-shape takes comma-separated positive integers such as 1,1,64,64; got '1x64'
    """
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ModelError(f"{option} takes comma-separated positive integers such as {example}; got {text!r}")
    return tuple(int(p) for p in parts)


def load_factory(spec: str) -> Callable:
    """The callable named by ``MODULE:FACTORY`` (``FACTORY`` may be dotted: ``Class.build``).

    The current directory is importable, so a ``models.py`` beside the user
    works as ``models:make_model``.

    Raises:
        ModelError: the spec is malformed, the module cannot be imported, the
            attribute does not exist or is not callable.

    Example:
        >>> load_factory("qseg.models:PaperUNet").__name__
        'PaperUNet'
        >>> load_factory("qseg.models:NoSuchNet")
        Traceback (most recent call last):
        ...
        qseg.errors.ModelError: module 'qseg.models' has no attribute 'NoSuchNet' (from 'qseg.models:NoSuchNet')
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ModelError(
            f"a model factory is written MODULE:FACTORY, e.g. qseg.models:PaperUNet; got {spec!r}"
        )
    # a console script's sys.path starts at its own directory, not the user's
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import module {module_name!r} (from {spec!r}): {exc}") from exc
    for i, attr in enumerate(attr_path.split(".")):
        if not hasattr(target, attr):
            owner = ".".join([module_name, *attr_path.split(".")[:i]])
            raise ModelError(f"module {owner!r} has no attribute {attr!r} (from {spec!r})")
        target = getattr(target, attr)
    if not callable(target):
        raise ModelError(f"{spec!r} is a {type(target).__name__}, not a callable that returns a model")
    return target


def _build_model(spec: str):
    from torch import nn

    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as exc:
        raise ModelError(f"calling {spec}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _example_input(shape: tuple[int, ...]):
    import torch

    # seeded, so two runs on one model capture and report identically
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator)


def _prepare(args: argparse.Namespace):
    import qseg

    model = _build_model(args.model)
    x = _example_input(parse_shape(args.input_shape))
    return qseg.prepare(model, args.recipe, example_inputs=x, leaf_modules=args.leaf_module), x


# ---- commands ------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise QsegError(f"--threads must be a positive integer, got {args.threads}")
    try:
        demo = importlib.import_module("qseg.demo")
    except ModuleNotFoundError as exc:
        raise QsegError(
            f"the demo needs packages that are not installed ({exc.name}); "
            'install them with: pip install "qseg[demo]"'
        ) from exc
    result = demo.run(
        out=Path(args.out), seed=args.seed, fast=args.fast, threads=args.threads, recipe=args.recipe
    )
    print(result.table)
    print(f"figure: {result.figure}")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from qseg import recipes

    if args.action == "show":
        import yaml

        recipe = recipes.load(args.recipe)
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False, width=100).rstrip())
        return 0
    described = recipes.list()
    width = max(len(name) for name in described)
    for name, text in described.items():
        print(f"{name.ljust(width)}  {_headline(text)}")
    print(f"\n{len(described)} built-in recipes; `qseg recipes show NAME` prints one as YAML")
    return 0


def _headline(description: str) -> str:
    """The short title of a recipe description: its text up to the first colon
    ("Paper A's Qa6.0/Qw0.4 U-Net: weights in ..."), or its shortened start."""
    text = " ".join(description.split())
    head, sep, _ = text.partition(": ")
    if sep and len(head) <= 70:
        return head
    return textwrap.shorten(text, width=70, placeholder=" ...")


def _cmd_inspect(args: argparse.Namespace) -> int:
    qmodel, _ = _prepare(args)
    print(qmodel.qseg_report)
    return 0


def _load_checkpoint(path: str) -> dict:
    import torch

    file = Path(path)
    if not file.is_file():
        raise ExportError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(
            f"cannot read checkpoint {path!r} as a state_dict ({type(exc).__name__}: {exc}); "
            "save it with torch.save(qmodel.state_dict(), path)"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ExportError(
            f"checkpoint {path!r} holds a {type(state).__name__}, not a state_dict; "
            "save it with torch.save(qmodel.state_dict(), path)"
        )
    return state


def _state_mismatch(expected: dict, got: dict, shown: int = 3) -> str:
    """Why ``got`` does not load into a model whose state_dict is ``expected``
    (a few names of each kind of problem), or an empty string."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k} {tuple(got[k].shape)} in the checkpoint, {tuple(expected[k].shape)} in the model"
        for k in expected
        if k in got and hasattr(got[k], "shape") and got[k].shape != expected[k].shape
    ]
    parts = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("mismatched shapes", shapes),
    ):
        if items:
            more = f" and {len(items) - shown} more" if len(items) > shown else ""
            parts.append(f"{len(items)} {label} ({'; '.join(items[:shown])}{more})")
    return ", ".join(parts)


def _cmd_export(args: argparse.Namespace) -> int:
    import qseg

    state = _load_checkpoint(args.checkpoint)
    qmodel, x = _prepare(args)
    mismatch = _state_mismatch(qmodel.state_dict(), state)
    if mismatch:
        raise ExportError(
            f"checkpoint {args.checkpoint!r} does not fit {args.model}() prepared with recipe "
            f"{args.recipe!r}: {mismatch}. Pass the --model, --recipe and --input-shape the "
            "checkpoint was saved with."
        )
    qmodel.load_state_dict(state, strict=True)
    deployable = qseg.convert(qmodel)
    try:
        with warnings.catch_warnings():
            # raised inside torch.export's own pytree handling, not by qseg or the user's model
            warnings.filterwarnings(
                "ignore", "`isinstance\\(treespec, LeafSpec\\)` is deprecated", FutureWarning
            )
            if args.format == "onnx":
                path = qseg.export_onnx(deployable, x, args.out, weights=args.weights)
            else:
                path = qseg.export_openvino(deployable, x, args.out, weights=args.weights)
    except ModuleNotFoundError as exc:
        extra = "onnx" if args.format == "onnx" else "onnx,openvino"
        raise ExportError(
            f"exporting to {args.format} needs {exc.name}, which is not installed; "
            f'install it with: pip install "qseg[{extra}]"'
        ) from exc
    print(deployable.qseg_convert)
    files = [path, path.with_suffix(".bin")] if args.format == "openvino" else [path]
    for file in files:
        print(f"wrote {file} ({file.stat().st_size / 1e6:.3f} MB)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    import numpy as np

    from qseg.images import read_image, write_mask
    from qseg.runtime.predict import predict
    from qseg.runtime.settings import InferenceSettings, read_settings

    _check_writable(Path(args.out))
    model = Path(args.model)
    settings = read_settings(model) or InferenceSettings()
    if args.roi is not None:
        settings = dataclasses.replace(settings, roi_size=parse_shape(args.roi, "--roi", "256,256"))
    if settings.roi_size is None:
        raise DataError(
            f"{model} records no window (export it with inference={{'roi_size': ...}}): pass --roi"
        )
    roi = settings.roi_size
    if len(roi) not in (2, 3):
        raise DataError(f"--roi gives the window of a 2d (H,W) or 3d (D,H,W) model; got {args.roi!r}")
    overlap = args.overlap if args.overlap is not None else settings.overlap
    normalize = args.normalize if args.normalize is not None else settings.normalize
    runner = model
    if model.suffix == ".xml":
        from qseg.runtime.openvino import compile_openvino

        # compiled once for every file: the window shape does not depend on the image
        runner = compile_openvino(
            model, threads=args.threads, config={"PERFORMANCE_HINT": "THROUGHPUT"},
            shapes=[(args.batch_size, _model_channels(model), *roi)],
        )  # fmt: skip
    for name in args.inputs:
        image = read_image(name, spatial_dims=len(roi))
        start = time.perf_counter()
        out = predict(
            runner, image.array, roi, overlap=overlap, blend=settings.blend, batch_size=args.batch_size,
            threads=args.threads, normalize=normalize,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        if not isinstance(out, np.ndarray):
            raise ExportError(
                f"{args.model} has several outputs; qseg predict writes the mask of a one-output model"
            )
        written = write_mask(image, settings.mask(out), args.out)
        voxels = int(np.prod(image.array.shape[1:]))
        print(
            f"{image.path}: {'x'.join(map(str, image.array.shape[1:]))} in {seconds:.2f} s "
            f"({voxels / seconds / 1e6:.2f} Mvoxel/s) -> {written} ({written.stat().st_size / 1e6:.3f} MB)",
            flush=True,
        )
    return 0


def _check_writable(folder: Path) -> None:
    """Fail before any work when the masks could not be written."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise DataError(f"cannot write masks into {folder}: {exc.strerror or exc}") from exc


def _model_channels(xml: Path) -> int:
    """The input channels of an IR, which the window batch must give."""
    import openvino as ov

    try:
        shape = ov.Core().read_model(str(xml)).input(0).get_partial_shape()
    except Exception as exc:
        raise ExportError(f"OpenVINO cannot read {xml}: {exc}") from exc
    if shape.rank.is_dynamic or shape[1].is_dynamic:
        raise ExportError(f"{xml}: its input channels are not fixed ({shape}); predict needs them")
    return shape[1].get_length()


# ---- parser --------------------------------------------------------------------------------


class _Formatter(argparse.HelpFormatter):
    """Wraps one-line descriptions to the terminal; keeps text that has its own
    line breaks (the epilogs' examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _leaf_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--leaf-module",
        action="append",
        default=[],
        metavar="NAME",
        help="dotted name of a submodule that capture keeps whole (it stays float), e.g. one whose forward "
        "has data-dependent control flow; repeat for several",
    )


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help="a callable that takes no arguments and returns the float nn.Module, e.g. qseg.models:PaperUNet "
        "(the current directory is importable)",
    )
    parser.add_argument(
        "--input-shape",
        required=True,
        metavar="N,C,H,W",
        help="shape of the example input (random values) used to capture the model, e.g. 1,1,64,64",
    )
    parser.add_argument(
        "--recipe",
        required=True,
        metavar="NAME|PATH",
        help="the recipe the model was prepared with: a built-in name (`qseg recipes`) or a YAML file",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qseg`` command.

    Example:
        >>> args = build_parser().parse_args(["inspect", "qseg.models:PaperUNet", "--input-shape", "1,1,64,64"])
        >>> args.command, args.model, args.recipe
        ('inspect', 'qseg.models:PaperUNet', 'unet-qa6.0-qw0.4')
    """
    from qseg import __version__
    from qseg.recipes import DEFAULT

    parser = argparse.ArgumentParser(
        prog="qseg",
        description="Quantization-aware training and QDQ ONNX / OpenVINO export for PyTorch segmentation models.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"qseg {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="train a float and a quantized U-Net on bundled microscopy, export, compare (needs qseg[demo])",
        description="Train paper A's U-Net in float and with its Qa6.0/Qw0.4 recipe on the bundled "
        "microscopy images, export the quantized one to ONNX and OpenVINO, and print a table of "
        "dice, size and speed; writes a figure of predictions.",
        formatter_class=_Formatter,
    )
    demo.add_argument(
        "--out",
        default="qseg-demo",
        metavar="DIR",
        help="directory for the figure and files (default: qseg-demo)",
    )
    demo.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default: 0)")
    demo.add_argument(
        "--fast", action="store_true", help="a short run (fewer images and steps) to try it out"
    )
    demo.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: torch's)")
    demo.add_argument(
        "--recipe",
        default=DEFAULT,
        metavar="NAME",
        help=f"built-in recipe to quantize with (default: {DEFAULT}; unet-qa6.0-qw0.4-exact deploys bit-exact)",
    )
    demo.set_defaults(run=_cmd_demo)

    recipes = commands.add_parser(
        "recipes",
        help="list the built-in recipes, or show one as YAML",
        description="Without an action: list the built-in recipes. `show NAME|PATH`: print a recipe "
        "(built-in or YAML file) as the YAML qseg reads, with every default filled in.",
        formatter_class=_Formatter,
    )
    recipes.set_defaults(run=_cmd_recipes, action="list")
    actions = recipes.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", help="list the built-in recipes (the default)", formatter_class=_Formatter)
    show = actions.add_parser(
        "show",
        help="print one recipe as YAML",
        description="Print a recipe as YAML: a starting point for your own file.",
        formatter_class=_Formatter,
    )
    show.add_argument("recipe", metavar="NAME|PATH", help="a built-in recipe name or a YAML file")

    inspect_ = commands.add_parser(
        "inspect",
        help="prepare a model and print its layer report",
        description="Build a model from a factory, prepare it with a recipe and print the report: per "
        "layer, quantized how or kept float and why, and the weight sizes.",
        epilog="example:\n  qseg inspect qseg.models:PaperUNet --input-shape 1,1,64,64 --recipe unet-qa6.0-qw0.4",
        formatter_class=_Formatter,
    )
    inspect_.add_argument("model", metavar="MODULE:FACTORY", help="e.g. qseg.models:PaperUNet")
    inspect_.add_argument(
        "--input-shape", required=True, metavar="N,C,H,W", help="shape of the example input, e.g. 1,1,64,64"
    )
    inspect_.add_argument(
        "--recipe",
        default=DEFAULT,
        metavar="NAME|PATH",
        help=f"a built-in recipe (`qseg recipes`) or a YAML file (default: {DEFAULT})",
    )
    _leaf_argument(inspect_)
    inspect_.set_defaults(run=_cmd_inspect)

    export = commands.add_parser(
        "export",
        help="write a trained prepared model (its state_dict) as QDQ ONNX or OpenVINO IR",
        description="Rebuild a prepared model from its state_dict, convert it and write it as QDQ ONNX "
        "or OpenVINO IR.",
        epilog=CHECKPOINT_HELP
        + "\n\nexample:\n  qseg export model.pt --model qseg.models:PaperUNet --input-shape 1,1,64,64 \\\n"
        "      --recipe unet-qa6.0-qw0.4 --format openvino --out unet.xml",
        formatter_class=_Formatter,
    )
    export.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="state_dict of the prepared model (see below)"
    )
    _model_arguments(export)
    _leaf_argument(export)
    export.add_argument("--format", required=True, choices=("onnx", "openvino"), help="what to write")
    export.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="the file to write (.onnx; .xml for OpenVINO, plus its .bin)",
    )
    export.add_argument(
        "--weights",
        default="int8",
        choices=("int8", "int4", "float"),
        help="weight storage: integer codes (int8; int16 for wider grids), INT4 (grids of at most 4 bits) "
        "or dequantized float (default: int8)",
    )
    export.set_defaults(run=_cmd_export)

    predict = commands.add_parser(
        "predict",
        help="segment whole images and volumes (TIFF, NIfTI, .npy) with an exported model",
        description="Run an exported model (.xml on OpenVINO, .onnx on onnxruntime) on each input by "
        "overlapping windows blended as MONAI's sliding_window_inference does (qseg.predict), and write "
        "its mask (score above the recorded threshold, logit > 0 by default, for one channel; argmax for several; uint8) into --out under the input's "
        "name, in its format (a NIfTI mask keeps the image's affine). A mask is written to a temporary "
        "name and renamed when complete. The window, overlap, normalization and how to read the output "
        "default to what the exporter recorded in the file (export_onnx / export_openvino inference=).",
        epilog="example:\n  qseg predict unet.xml frames/*.tif --out masks --roi 256,256 --normalize percentile",
        formatter_class=_Formatter,
    )
    predict.add_argument("model", metavar="MODEL", help="an OpenVINO IR (.xml) or ONNX file (.onnx)")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="images: .tif/.tiff, .nii/.nii.gz, .npy")
    predict.add_argument("--out", required=True, metavar="DIR", help="folder for the masks (created)")
    predict.add_argument(
        "--roi",
        default=None,
        metavar="H,W|D,H,W",
        help="the window: the model's training crop, e.g. 256,256 (default: the one the file records)",
    )
    predict.add_argument(
        "--overlap",
        type=float,
        default=None,
        help="fraction of a window its neighbour overlaps (default: the file's, else 0.25)",
    )
    predict.add_argument(
        "--batch-size", type=int, default=4, metavar="N", help="windows per call (default: 4)"
    )
    predict.add_argument(
        "--normalize",
        choices=("none", "percentile", "zscore"),
        default=None,
        help="per-channel scaling the model was trained with: percentile (1st/99.8th -> 0/1, as qseg's "
        "HeLa data), zscore, or none (default: the file's, else none)",
    )
    predict.add_argument(
        "--threads", type=int, default=None, metavar="N", help="inference threads (default: all)"
    )
    predict.set_defaults(run=_cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``qseg`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0 on success (``--help`` and ``--version`` included), 2 on a bad command
    line or when qseg rejects the input (the message goes to stderr).

    Example:
        >>> main(["--version"])  # doctest: +ELLIPSIS
        qseg ...
        0
        >>> main(["recipes", "show", "no-such-recipe"])
        2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse exits for --help, --version and usage errors; callers get the status
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return args.run(args)
    except QsegError as exc:
        print(f"qseg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
