"""Figures for people: prediction overlays, weight histograms with the quantization
grid, and the uncertainty maps of suggestive annotation.

matplotlib is optional (``pip install "qseg[plot]"``) and imported only when a
figure is drawn. Figures are rendered with the Agg backend through matplotlib's
object API, so drawing never changes the pyplot state or backend of the caller
(a notebook keeps its own). Each function writes one file, its format following
the suffix (PNG for ``.png``), and returns its path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from qseg.errors import QsegError
from qseg.metrics import dice_score
from qseg.quantizers import Quantizer

__all__ = ["prediction_overlay", "quantizer_grid", "uncertainty_map", "weight_histograms"]

# overlay colours (RGB): agreement in light grey so it stands out from the black background
TRUE_POSITIVE = (0.85, 0.85, 0.85)
FALSE_POSITIVE = (0.9, 0.1, 0.1)
FALSE_NEGATIVE = (0.15, 0.4, 1.0)
# beyond this many grid values in view, lines would merge into a block: the title gives the step instead
MAX_GRID_LINES = 160


def _figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas, without pyplot."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise QsegError(
            'qseg.plots needs matplotlib, which is not installed: pip install "qseg[plot]"'
        ) from exc
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def _as_2d(array: object, name: str) -> np.ndarray:
    """A 2-D float array from a numpy array or tensor, leading singleton dims dropped."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    out = np.asarray(array)
    while out.ndim > 2 and out.shape[0] == 1:
        out = out[0]
    if out.ndim != 2:
        raise QsegError(f"{name} must be a 2-D image (H, W), got shape {np.shape(array)}")
    return out


def _as_mask(array: object, name: str) -> np.ndarray:
    mask = _as_2d(array, name)
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        raise QsegError(
            f"{name} must be a binary mask (bool or 0/1); threshold probabilities first, e.g. prob > 0.5"
        )
    return mask.astype(bool)


def _overlay_rgb(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """RGB image: true negatives black, the other outcomes in their colours."""
    rgb = np.zeros((*prediction.shape, 3))
    rgb[prediction & truth] = TRUE_POSITIVE
    rgb[prediction & ~truth] = FALSE_POSITIVE
    rgb[~prediction & truth] = FALSE_NEGATIVE
    return rgb


def prediction_overlay(
    image: object,
    truth: object,
    predictions: Mapping[str, object],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """One row of panels: the input, the ground truth, then one panel per prediction
    showing true positives in light grey, false positives in red and false
    negatives in blue, with the prediction's dice in its title.

    Args:
        image: the input image, ``(H, W)`` (or with leading singleton dims).
        truth: the ground-truth mask, same size, bool or 0/1.
        predictions: name -> binary mask, e.g. ``{"float": ..., "quantized (OpenVINO)": ...}``.
        path: the file to write (``.png``).
        title: a title over the whole figure.

    Raises:
        QsegError: matplotlib is missing, a mask is not binary, or sizes differ.

    Example:
        >>> import numpy as np, tempfile, os
        >>> truth = np.zeros((16, 16), bool); truth[4:12, 4:12] = True
        >>> out = prediction_overlay(np.random.rand(16, 16), truth, {"float": truth},
        ...                          os.path.join(tempfile.mkdtemp(), "overlay.png"))
        >>> out.read_bytes()[:4]
        b'\\x89PNG'
    """
    picture = _as_2d(image, "image")
    gold = _as_mask(truth, "truth")
    masks = {name: _as_mask(mask, f"prediction {name!r}") for name, mask in predictions.items()}
    if not masks:
        raise QsegError("predictions is empty: pass at least one name -> mask")
    for name, mask in [("truth", gold), *masks.items()]:
        if mask.shape != picture.shape:
            label = name if name == "truth" else f"prediction {name!r}"
            raise QsegError(f"{label} has shape {mask.shape}, the image {picture.shape}: they must match")
    panels = 2 + len(masks)
    figure = _figure(2.6 * panels, 3.2)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(picture, cmap="gray")
    axes[0].set_title("input")
    axes[1].imshow(gold, cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("ground truth")
    for ax, (name, mask) in zip(axes[2:], masks.items(), strict=True):
        ax.imshow(_overlay_rgb(mask, gold))
        ax.set_title(f"{name}\ndice {dice_score(mask, gold):.3f}")
    for ax in axes:
        ax.set_axis_off()
    from matplotlib.patches import Patch

    legend = [
        Patch(color=TRUE_POSITIVE, label="true positive"),
        Patch(color=FALSE_POSITIVE, label="false positive"),
        Patch(color=FALSE_NEGATIVE, label="false negative"),
    ]
    figure.legend(handles=legend, loc="outside lower center", ncols=3, frameon=False)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def quantizer_grid(quantizer: Quantizer, x: torch.Tensor) -> np.ndarray:
    """The sorted values ``quantizer`` can output for the tensor ``x``
    (:meth:`~qseg.quantizers.Quantizer.grid_values`, each once).

    Fixed point: every ``k * 2^-f`` within saturation; power of two: ``0`` and
    ``+-2^p`` for ``n2 <= p <= n1`` (bounds fixed, or those of ``x``); binary,
    DoReFa and ternary: the levels their statistics of ``x`` give (for a
    per-channel ternary, the union over channels). A quantizer without a uniform
    grid description yields the distinct values of ``quantizer(x)``.

    Example:
        >>> import torch
        >>> from qseg.quantizers import FixedPoint, PowerOfTwo
        >>> quantizer_grid(FixedPoint(0, 2), torch.zeros(3)).tolist()
        [-0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75]
        >>> quantizer_grid(PowerOfTwo(bits=3), torch.tensor([0.9])).tolist()
        [-1.0, -0.5, 0.0, 0.5, 1.0]
    """
    with torch.no_grad():
        values = quantizer.grid_values(x.detach()).numpy()
    return np.unique(values)


def _quantized_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, Quantizer]]:
    """layer name -> (latent float weight, its quantizer), in model order."""
    found: dict[str, tuple[torch.Tensor, Quantizer]] = {}
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quant", None)
        weight = getattr(module, "weight", None)
        if isinstance(quantizer, Quantizer) and isinstance(weight, torch.Tensor):
            found[name] = (weight, quantizer)
    if isinstance(model, fx.GraphModule):
        # a functional conv's weight reaches its quantizer through a get_attr node
        for node in model.graph.nodes:
            if node.op != "call_module" or not node.args:
                continue
            source = node.args[0]
            module = model.get_submodule(node.target)
            if isinstance(module, Quantizer) and isinstance(source, fx.Node) and source.op == "get_attr":
                owner = source.target.rsplit(".", 1)[0] if "." in source.target else source.target
                found[owner] = (model.get_parameter(source.target), module)
    return found


def _describe(quantizer: Quantizer) -> str:
    return f"{type(quantizer).__name__}({quantizer.extra_repr()}), {quantizer.bits} bits"


def weight_histograms(model: nn.Module, path: str | os.PathLike, layers: Sequence[str] | None = None) -> Path:
    """Per quantized layer, a histogram of its latent float weights with the values of
    its quantizer's grid drawn as vertical lines (as in paper A's supplementary figure).

    The view spans the weights and the grid values they round to; when more than
    160 grid values fall in it (a fine grid such as Q8.8), the lines are left out
    and the title gives the step.

    Args:
        model: a model returned by ``qseg.prepare`` (before ``convert``).
        path: the file to write (``.png``).
        layers: names of the layers to draw (as in ``qmodel.qseg_report``); all
            quantized layers by default.

    Raises:
        QsegError: matplotlib is missing, the model has no quantized layer, or a
            name in ``layers`` is not a quantized layer.

    Example:
        >>> import torch, qseg, tempfile, os
        >>> from qseg.models import PaperUNet
        >>> q = qseg.prepare(PaperUNet(widths=(4, 8, 8, 8)), example_inputs=torch.randn(1, 1, 16, 16))
        >>> out = weight_histograms(q, os.path.join(tempfile.mkdtemp(), "w.png"), layers=["enc1.conv2"])
        >>> out.stat().st_size > 0
        True
    """
    available = _quantized_weights(model)
    if not available:
        raise QsegError(
            f"{type(model).__name__} has no quantized layer: pass a model returned by qseg.prepare"
        )
    names = list(available) if layers is None else list(layers)
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        raise QsegError(
            f"not quantized layers of this model: {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {', '.join(available)}"
        )
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    figure = _figure(4.2 * cols, 3.0 * rows)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        weight, quantizer = available[name]
        grid = quantizer_grid(quantizer, weight)
        with torch.no_grad():
            latent = weight.detach().double().flatten().cpu().numpy()
            used = quantizer(weight.detach()).double().flatten().cpu().numpy()
        lo = min(latent.min(), used.min())
        hi = max(latent.max(), used.max())
        pad = 0.05 * (hi - lo) if hi > lo else 0.5
        lo, hi = lo - pad, hi + pad
        ax.hist(latent, bins=80, range=(lo, hi), color="0.35")
        shown = grid[(grid >= lo) & (grid <= hi)]
        title = f"{name}\n{_describe(quantizer)}"
        if len(shown) <= MAX_GRID_LINES:
            ax.vlines(shown, 0, 1, transform=ax.get_xaxis_transform(), colors="C1", linewidth=0.7, alpha=0.8)
        else:
            steps = np.diff(shown)
            title += f"\ngrid step {steps.min():.3g}: {len(shown)} levels in view, not drawn"
        ax.set_xlim(lo, hi)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    figure.suptitle("latent float weights (grey) and the quantization grid (orange lines)", fontsize=10)
    return _save(figure, path)


def _stack(items: object, name: str) -> list[np.ndarray]:
    if isinstance(items, torch.Tensor):
        items = items.detach().cpu().numpy()
    if isinstance(items, np.ndarray):
        if items.ndim < 3:
            raise QsegError(f"{name} must hold one 2-D map per image, (N, H, W); got shape {items.shape}")
        items = list(items)
    out = [_as_2d(item, f"{name}[{i}]") for i, item in enumerate(items)]
    if not out:
        raise QsegError(f"{name} is empty")
    return out


def uncertainty_map(
    images: object,
    uncertainty_maps: object,
    path: str | os.PathLike,
    scores: Sequence[float] | None = None,
) -> Path:
    """Per image, the image above its per-pixel uncertainty map (the std across the
    ensemble's predictions in suggestive annotation), all maps on one colour scale.

    Args:
        images: ``N`` images, ``(N, H, W)`` or ``(N, 1, H, W)`` or a sequence of 2-D arrays.
        uncertainty_maps: the ``N`` maps, each the size of its image.
        path: the file to write (``.png``).
        scores: one number per image for its title (e.g. its uncertainty score);
            by default the mean of its map.

    Raises:
        QsegError: matplotlib is missing, or the counts or sizes do not match.

    Example:
        >>> import numpy as np, tempfile, os
        >>> maps = np.random.rand(3, 8, 8) * 0.2
        >>> out = uncertainty_map(np.random.rand(3, 8, 8), maps, os.path.join(tempfile.mkdtemp(), "u.png"))
        >>> out.suffix
        '.png'
    """
    pictures = _stack(images, "images")
    maps = _stack(uncertainty_maps, "uncertainty_maps")
    if len(pictures) != len(maps):
        raise QsegError(f"{len(pictures)} images but {len(maps)} uncertainty maps: pass one map per image")
    for i, (picture, m) in enumerate(zip(pictures, maps, strict=True)):
        if picture.shape != m.shape:
            raise QsegError(
                f"image {i} has shape {picture.shape}, its uncertainty map {m.shape}: they must match"
            )
    if scores is not None and len(scores) != len(maps):
        raise QsegError(f"{len(scores)} scores for {len(maps)} images: pass one score per image")
    cols = min(8, len(maps))
    blocks = math.ceil(len(maps) / cols)
    figure = _figure(2.2 * cols + 0.8, 4.4 * blocks)
    axes = figure.subplots(2 * blocks, cols, squeeze=False)
    top = max(float(np.nanmax(m)) for m in maps) or 1.0
    drawn = None
    map_axes = []
    for i, (picture, m) in enumerate(zip(pictures, maps, strict=True)):
        block, col = divmod(i, cols)
        image_ax, map_ax = axes[2 * block, col], axes[2 * block + 1, col]
        score = float(np.nanmean(m)) if scores is None else float(scores[i])
        image_ax.imshow(picture, cmap="gray")
        image_ax.set_title(f"#{i}  {'mean std' if scores is None else 'score'} {score:.3g}", fontsize=8)
        drawn = map_ax.imshow(m, cmap="magma", vmin=0.0, vmax=top)
        map_axes.append(map_ax)
    for ax in axes.ravel():
        ax.set_axis_off()
    figure.colorbar(drawn, ax=map_axes, shrink=0.8, label="std across models")
    return _save(figure, path)
