"""What the ``K`` models say about the pool: per-image uncertainty and descriptors.

The descriptor layer is found in the model's graph (:func:`descriptor_layer`);
:func:`score_pool` runs every model over the pool once and reads both.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from tqdm import tqdm

from qseg import graph as g
from qseg.active._checks import UncertaintyKind, _check_count, _check_kind
from qseg.errors import AnnotationError, ModelError
from qseg.train import segmentation_logits

__all__ = ["PoolScores", "descriptor_layer", "foreground_probabilities", "image_uncertainty", "score_pool"]

Pool = torch.Tensor | Sequence[torch.Tensor] | Iterable


def foreground_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class probabilities from logits ``(N, C, *spatial)``.

    One channel: ``sigmoid`` (the foreground probability). Several channels:
    ``softmax`` over the channels, every class kept; for two classes the std of the
    background probability equals that of the foreground, so averaging over classes
    gives the foreground's uncertainty.

    Example:
        >>> import torch
        >>> foreground_probabilities(torch.zeros(1, 1, 2, 2)).flatten().tolist()
        [0.5, 0.5, 0.5, 0.5]
        >>> foreground_probabilities(torch.zeros(1, 4, 1, 1)).flatten().tolist()
        [0.25, 0.25, 0.25, 0.25]
    """
    if logits.dim() < 2:
        raise ModelError(f"segmentation logits must be (N, C, ...), got shape {tuple(logits.shape)}")
    return logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(dim=1)


def image_uncertainty(probabilities: torch.Tensor, kind: UncertaintyKind = "std") -> torch.Tensor:
    """Per-image uncertainty ``(N,)`` from the ``K`` models' probabilities ``(K, N, C, *spatial)``.

    The std (population, so that ``K`` equal predictions give exactly 0) or the
    variance across the ``K`` models at each pixel and class, averaged over pixels
    and classes.

    Example:
        >>> import torch
        >>> p = torch.tensor([[[[0.0, 1.0]]], [[[1.0, 1.0]]]]).unsqueeze(1)  # K=2, N=1, C=1, 1x2
        >>> image_uncertainty(p).tolist(), image_uncertainty(p, "variance").tolist()
        ([0.25], [0.125])
    """
    _check_kind(kind)
    if probabilities.dim() < 3:
        raise AnnotationError(f"probabilities must be (K, N, C, ...), got shape {tuple(probabilities.shape)}")
    spread = probabilities.var(dim=0, correction=0)
    if kind == "std":
        spread = spread.sqrt()
    return spread.flatten(1).mean(dim=1)


def _first_output_node(arg: object) -> fx.Node | None:
    """The graph node of the output :func:`~qseg.train.segmentation_logits` picks."""
    while not isinstance(arg, fx.Node):
        if isinstance(arg, (tuple, list)) and arg:
            arg = arg[0]
        elif isinstance(arg, dict) and arg:
            arg = next(iter(arg.values()))
        else:
            return None
    return arg


def _last_weighted_on_path(gm: fx.GraphModule) -> str | None:
    """Module name of the last weighted layer, in graph order, among the ancestors of the
    output the logits come from (so a two-head model's other head is not picked)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    target = _first_output_node(output.args[0])
    if target is None:
        return None
    ancestors: set[str] = set()
    stack = [target]
    while stack:
        node = stack.pop()
        if node.name not in ancestors:
            ancestors.add(node.name)
            stack.extend(node.all_input_nodes)
    layers = [layer for layer in g.weighted_layers(gm) if layer.node in ancestors]
    return layers[-1].name if layers else None


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return bool(name)


def _last_conv_module(model: nn.Module) -> str | None:
    names = [name for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return names[-1] if names else None


def descriptor_layer(model: nn.Module, example: torch.Tensor) -> str:
    """Name of the module whose *input* gives the descriptor: the last weighted layer.

    Paper B takes "the last conv layer's feature maps". In a segmentation network the
    last conv is the classifier (a 1x1 conv to one logit channel), so its output is the
    prediction itself: a one-dimensional "descriptor" whose cosine similarity is
    ±1 for every pair. Yang et al.'s descriptor is the encoding the classifier reads,
    so qseg uses the feature maps the last weighted layer *consumes* (its input).

    The layer is found in the graph, not by name: the last weighted op (conv,
    transposed conv, linear; quantized or float) in execution order among those
    that lead to the output the logits come from (the first output of a multi-head
    model). The graph is the model itself when it is a ``torch.fx.GraphModule``
    (``qseg.prepare``'s result), else a verified FX capture on ``example``, else
    the module-level graph of ``torch.export``. When no graph can be had, the last
    ``_ConvNd`` module in ``named_modules()`` order is used: registration order,
    which matches execution order in models that define layers as they use them.
    A functional layer's name is its weight's owning module, whose forward pre-hook
    then sees the input.

    Raises:
        ModelError: the model has no conv / linear layer.

    Example:
        >>> import torch
        >>> from qseg.models import PaperUNet, TwoHeadFCN
        >>> descriptor_layer(PaperUNet(widths=(2, 2, 2, 2)), torch.rand(1, 1, 16, 16))
        'head'
        >>> descriptor_layer(TwoHeadFCN(widths=(2, 2, 2)), torch.rand(1, 3, 16, 16))
        'object_head.classifier'
    """
    name: str | None = None
    if isinstance(model, fx.GraphModule):
        name = _last_weighted_on_path(model)
    else:
        captured = g.capture(model, (example,))
        gm = captured.graph_module
        if gm is None:
            try:
                gm = g.export_module_graph(model, (example,))
            except Exception:
                gm = None  # no graph at all: the documented named_modules() fallback below
        if gm is not None:
            name = _last_weighted_on_path(gm)
    if name is not None and not _has_module(model, name):
        name = None  # a functional conv on a parameter of the root: no module to hook
    if name is None:
        name = _last_conv_module(model)
    if name is None:
        raise ModelError(
            f"{type(model).__name__} has no convolution or linear layer whose input could serve as the "
            "image descriptor; pass layer='<module name>' to name the module whose input to use"
        )
    return name


@dataclass
class PoolScores:
    """What the ``K`` models say about each pool image: ``uncertainty`` ``(N,)``,
    ``descriptors`` ``(N, D)`` and the descriptor layer of each model.

    Example:
        >>> import torch
        >>> PoolScores(torch.zeros(2), torch.ones(2, 3), ["head"]).descriptors.shape
        torch.Size([2, 3])
    """

    uncertainty: torch.Tensor
    descriptors: torch.Tensor
    layers: list[str]


def _images(pool: Pool) -> Iterator[torch.Tensor]:
    """Every image ``(C, *spatial)`` of a pool, in order."""
    if isinstance(pool, torch.Tensor):
        if pool.dim() < 4:
            raise AnnotationError(
                f"a pool tensor must be (N, C, H, W) (or (N, C, D, H, W)), got shape {tuple(pool.shape)}"
            )
        yield from pool
        return
    items = (pool[i] for i in range(len(pool))) if hasattr(pool, "__len__") else iter(pool)
    for item in items:
        image = item[0] if isinstance(item, (tuple, list)) else item  # (image, mask) datasets
        if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4):
            raise AnnotationError(
                "pool items must be images (C, H, W), blocks of images (N, C, H, W) or tuples whose first "
                f"entry is one; got {type(image).__name__} {tuple(getattr(image, 'shape', ()))}"
            )
        if image.dim() == 4:
            yield from image
        else:
            yield image


def _batches(pool: Pool, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive images stacked in batches of up to ``batch_size``; a change of image size
    starts a new batch (uncertainty and descriptors are per image, so sizes may differ)."""
    batch: list[torch.Tensor] = []
    for image in _images(pool):
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield torch.stack(batch)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def score_pool(
    models: Sequence[nn.Module],
    pool: Pool,
    *,
    uncertainty: UncertaintyKind = "std",
    layer: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> PoolScores:
    """Run the ``K`` models over the pool once: per-image uncertainty and descriptors.

    Models run in eval mode under ``no_grad`` and get their mode back afterwards.
    The descriptor is read by a forward pre-hook on the layer :func:`descriptor_layer`
    finds in each model (or on the module named ``layer`` in every model).

    Args:
        models: ``K >= 2`` models returning logits ``(N, C, *spatial)`` (float or quantized).
        pool: a tensor ``(N, C, H, W)``, a sequence of images ``(C, H, W)`` or image blocks
            ``(n, C, H, W)``, or a dataset yielding images or ``(image, ...)`` tuples.
        uncertainty: ``"std"`` (paper B) or ``"variance"``.
        layer: the module whose input is the descriptor, by name; default found in the graph.
        batch_size: images per forward pass.
        progress: show a progress bar over batches.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> nets = [nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU(), nn.Conv2d(3, 1, 1)) for _ in range(2)]
        >>> s = score_pool(nets, torch.rand(5, 1, 4, 4))
        >>> s.uncertainty.shape, s.descriptors.shape, s.layers
        (torch.Size([5]), torch.Size([5, 3]), ['2', '2'])
    """
    _check_kind(uncertainty)
    _check_count("batch_size", batch_size)
    models = list(models)
    if len(models) < 2 or not all(isinstance(m, nn.Module) for m in models):
        raise AnnotationError(
            f"models must be at least 2 nn.Modules (the uncertainty is their disagreement), got {len(models)}"
        )
    layers: list[str] = []
    captured: list[torch.Tensor | None] = [None] * len(models)
    handles = []
    modes = [m.training for m in models]
    uncertainties: list[torch.Tensor] = []
    descriptors: list[torch.Tensor] = []
    try:
        for model in models:
            model.eval()
        batches = _batches(pool, batch_size)
        first = next(batches, None)
        if first is None:
            raise AnnotationError("the pool is empty: there is nothing to suggest")
        for i, model in enumerate(models):
            name = layer if layer is not None else descriptor_layer(model, first[:1].to(_device(model)))
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ModelError(f"{type(model).__name__} has no module named {name!r} (layer=)") from None
            layers.append(name)

            def hook(_module: nn.Module, args: tuple, i: int = i) -> None:
                captured[i] = args[0].detach()  # a module called twice: its last call wins

            handles.append(module.register_forward_pre_hook(hook))
        bar = tqdm(desc="scoring pool", unit="img", disable=not progress, leave=False)
        with torch.no_grad(), bar:
            for batch in _chain(first, batches):
                probs, feats = [], []
                for i, model in enumerate(models):
                    captured[i] = None
                    logits = segmentation_logits(model, batch.to(_device(model)))
                    if captured[i] is None:
                        raise ModelError(
                            f"{type(model).__name__}: the descriptor layer {layers[i]!r} was not called "
                            "in forward; pass layer='<module name>' naming a module that is"
                        )
                    probs.append(foreground_probabilities(logits.float()).cpu())
                    f = captured[i].float().cpu()
                    feats.append(f.flatten(2).mean(dim=2) if f.dim() > 2 else f.flatten(1))
                _check_same(models, [p.shape for p in probs], "prediction shape")
                _check_same(models, [f.shape for f in feats], "descriptor size")
                uncertainties.append(image_uncertainty(torch.stack(probs), uncertainty))
                descriptors.append(torch.stack(feats).mean(dim=0))
                bar.update(len(batch))
    finally:
        for handle in handles:
            handle.remove()
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)
    return PoolScores(torch.cat(uncertainties), torch.cat(descriptors), layers)


def _chain(first: torch.Tensor, rest: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield first
    yield from rest


def _check_same(models: Sequence[nn.Module], shapes: list[torch.Size], what: str) -> None:
    if len(set(shapes)) > 1:
        listed = ", ".join(f"{type(m).__name__} {tuple(s)}" for m, s in zip(models, shapes, strict=True))
        raise ModelError(f"the models disagree on the {what} ({listed}): use K copies of one architecture")
