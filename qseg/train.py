"""A small training loop that follows a recipe's :class:`~qseg.recipes.Training`.

qseg's models train in any loop (``prepare`` returns a plain module); this one
exists so that the demo, suggestive annotation and the accuracy benchmark train
the way the papers did without each writing its own: the recipe's optimizer,
learning-rate schedule, loss, epochs and batch size, the TernaryNet slope
annealed over training, and INQ stages advanced when a schedule is given.

Binary segmentation has one logit channel and 0 / 1 masks ``N x 1 x H x W``;
segmentation into ``K > 1`` classes has ``K`` logit channels and class-index
masks ``N x H x W`` or ``N x 1 x H x W``. The recipe's loss names carry over:
``bce`` becomes cross entropy, ``dice`` the soft dice of the softmax averaged
over the classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qseg.errors import DataError, ModelError
from qseg.hooks import training_hooks
from qseg.recipes.training import Training

if TYPE_CHECKING:
    from qseg.inq import Schedule

__all__ = ["fit", "loss_function", "make_optimizer", "predict", "segmentation_logits"]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def segmentation_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The segmentation logits ``model(x)`` returns: the output itself when it is a tensor,
    else its first entry (a tuple or list, as DCAN-style two-head models return) or first
    value (a mapping, as torchvision's segmentation models return ``{"out": ...}``).

    Raises:
        ModelError: the output holds no tensor in first place.

    Example:
        >>> class TwoHeads(nn.Module):
        ...     def forward(self, x):
        ...         return {"out": x + 1, "aux": x - 1}
        >>> segmentation_logits(TwoHeads(), torch.zeros(1, 1, 2, 2)).flatten().tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    output = model(x)
    while not isinstance(output, torch.Tensor):
        if isinstance(output, (tuple, list)) and output:
            output = output[0]
        elif isinstance(output, dict) and output:
            output = next(iter(output.values()))
        else:
            raise ModelError(
                f"{type(model).__name__} returned {type(output).__name__}; segmentation needs logits "
                "(a tensor, or a tuple/list/dict whose first entry is one)"
            )
    return output


def _class_indices(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``target`` as class indices ``N x H x W`` (int64) for ``N x K x H x W`` logits."""
    spatial = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) not in (spatial, (spatial[0], 1, *spatial[1:])):
        raise DataError(
            f"logits {tuple(logits.shape)} need class-index masks {spatial} or "
            f"{(spatial[0], 1, *spatial[1:])}; got {tuple(target.shape)}"
        )
    return target.reshape(spatial).long()


def _bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, _class_indices(logits, target))


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 1:
        prob = torch.sigmoid(logits)
        inter = (prob * target).sum()
        # +1 keeps the loss defined on a batch with no foreground at all
        return 1.0 - (2.0 * inter + 1.0) / (prob.sum() + target.sum() + 1.0)
    classes = logits.shape[1]
    prob = logits.softmax(dim=1)
    onehot = F.one_hot(_class_indices(logits, target), classes).movedim(-1, 1).to(prob.dtype)
    # each class's dice over the whole batch, then their mean: a rare class counts as much as
    # the background, which a dice pooled over all classes would let dominate
    dims = (0, *range(2, logits.dim()))
    dice = (2.0 * (prob * onehot).sum(dims) + 1.0) / (prob.sum(dims) + onehot.sum(dims) + 1.0)
    return 1.0 - dice.mean()


def _bce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * _bce(logits, target) + 0.5 * _soft_dice_loss(logits, target)


def loss_function(name: str) -> Loss:
    """The loss a recipe names, as ``loss(logits, target) -> scalar``.

    One logit channel (``target`` of 0 / 1, the logits' shape): ``dice`` is the soft
    dice of the sigmoid over the whole batch, ``bce`` the binary cross-entropy on
    logits. ``K > 1`` channels (``target`` of class indices ``N x H x W`` or
    ``N x 1 x H x W``): ``dice`` is the soft dice of the softmax, per class over the
    whole batch, averaged over the classes; ``bce`` is the cross entropy.
    ``bce_dice`` is the mean of the two (paper A's EM loss).

    Example:
        >>> loss = loss_function("bce_dice")
        >>> float(loss(torch.full((1, 1, 2, 2), 20.0), torch.ones(1, 1, 2, 2))) < 1e-3
        True
        >>> logits = torch.tensor([[-20.0, 20.0], [20.0, -20.0]]).view(1, 2, 1, 2)  # class 1, class 0
        >>> float(loss(logits, torch.tensor([[[1, 0]]]))) < 1e-3
        True
    """
    losses: dict[str, Loss] = {"dice": _soft_dice_loss, "bce": _bce, "bce_dice": _bce_dice}
    if name not in losses:
        raise DataError(f"unknown loss {name!r}; one of dice, bce, bce_dice")
    return losses[name]


def make_optimizer(model: nn.Module, training: Training) -> torch.optim.Optimizer:
    """The optimizer a :class:`Training` names, over the model's trainable parameters.

    Example:
        >>> make_optimizer(nn.Conv2d(1, 1, 3), Training(optimizer="sgd", lr=0.1)).defaults["momentum"]
        0.9
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if training.optimizer == "adam":
        return torch.optim.Adam(params, lr=training.lr, weight_decay=training.weight_decay)
    if training.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)
    return torch.optim.SGD(
        params, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay
    )


def _check_data(images: torch.Tensor, masks: torch.Tensor) -> None:
    """The checks that do not depend on the model's number of output channels."""
    if not (isinstance(images, torch.Tensor) and isinstance(masks, torch.Tensor)):
        raise DataError("images and masks must be tensors (N x C x H x W and N x 1 x H x W)")
    if (
        images.ndim != 4
        or masks.ndim not in (3, 4)
        or (masks.ndim == 4 and masks.shape[1] != 1)
        or len(images) != len(masks)
        or len(images) == 0
    ):
        raise DataError(
            f"expected images N x C x H x W and masks N x 1 x H x W (or class indices N x H x W) "
            f"with the same N > 0; got {tuple(images.shape)} and {tuple(masks.shape)}"
        )
    if images.shape[-2:] != masks.shape[-2:]:
        raise DataError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} differ in H x W")


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _output_channels(model: nn.Module, images: torch.Tensor) -> int:
    """The number of logit channels, from one image in eval mode (which changes no state:
    BatchNorm statistics move only in train mode, and qseg's quantizers move only when
    annealed or advanced)."""
    mode = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = segmentation_logits(model, images[:1].to(_device(model)))
    finally:
        model.train(mode)
    if logits.ndim != 4 or logits.shape[-2:] != images.shape[-2:] or logits.shape[1] < 1:
        raise DataError(
            f"the model maps an image {tuple(images[:1].shape)} to {tuple(logits.shape)}; fit needs "
            "logits 1 x K x H x W of the image's H x W"
        )
    return int(logits.shape[1])


def _targets(masks: torch.Tensor, classes: int) -> torch.Tensor:
    """``masks`` checked against ``classes`` logit channels, in the form the loss takes."""
    if classes == 1:
        if masks.ndim != 4:
            raise DataError(
                f"the model has one output channel, so masks must be binary N x 1 x H x W; got "
                f"{tuple(masks.shape)} (class indices N x H x W need one logit channel per class)"
            )
        if not bool(((masks == 0) | (masks == 1)).all()):
            raise DataError("masks must hold only 0 and 1")
        # bool or integer 0 / 1 masks: binary cross-entropy takes float targets only
        return masks if masks.is_floating_point() else masks.to(torch.get_default_dtype())
    if masks.is_floating_point() and not bool((masks == masks.round()).all()):
        raise DataError(f"masks must hold class indices 0..{classes - 1}; found values that are not integers")
    low, high = masks.min().item(), masks.max().item()
    if low < 0 or high >= classes:
        raise DataError(
            f"masks must hold class indices in [0, {classes}) for the model's {classes} output "
            f"channels; found values from {low:g} to {high:g}"
        )
    return masks.reshape(len(masks), *masks.shape[-2:]).long()


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips and (for square crops) quarter turns: the symmetries of a microscope image."""
    if torch.rand((), generator=gen) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    if torch.rand((), generator=gen) < 0.5:
        x, y = x.flip(-2), y.flip(-2)
    if x.shape[-1] == x.shape[-2] and torch.rand((), generator=gen) < 0.5:
        x, y = x.transpose(-1, -2), y.transpose(-1, -2)
    return x, y


def fit(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    training: Training | None = None,
    *,
    epochs: int | None = None,
    seed: int = 0,
    augment: bool = True,
    inq: Schedule | None = None,
    progress: bool = True,
    description: str = "train",
) -> list[float]:
    """Train ``model`` on ``images`` / ``masks`` as ``training`` says.

    The number of logit channels decides the task: one channel is binary
    segmentation (masks of 0 / 1), ``K > 1`` channels are ``K`` classes (masks of
    class indices in ``[0, K)``); see :func:`loss_function` for the losses.
    The learning rate follows the schedule per epoch (``Training.lr_at``);
    :class:`~qseg.quantizers.TernaryTanh` activations are annealed from their start to
    end slope; latent weights of BNN layers (weight quantizer ``Binary()``) are
    clipped to [-1, 1] after each step (paper A); with an INQ ``inq`` schedule the epochs are split evenly over its
    remaining stages and the schedule advances before each (so a float model
    trains on its 50 % stage first). Batches are drawn in a seeded order, with
    random flips when ``augment``, both from a generator of this call's own, so
    the global RNG neither decides nor feels them. Batches move to the device of
    the model's parameters. The model is left in eval mode.

    Args:
        model: a float or prepared module mapping ``N x C x H x W`` to ``N x K x H x W``
            logits (or a tuple / list / dict whose first entry they are).
        images: ``N x C x H x W`` float tensor.
        masks: ``N x 1 x H x W`` of 0 / 1 for ``K = 1``; class indices ``N x H x W`` or
            ``N x 1 x H x W`` (integer or integer-valued float) for ``K > 1``.
        training: the setup (a recipe's ``training``); default :class:`Training()`.
        epochs: overrides ``training.epochs`` (fast runs, tests).
        seed: seeds the batch order and the augmentation.
        augment: random flips / transposes of each batch.
        inq: an INQ :class:`~qseg.inq.Schedule` of this model, advanced stage by stage.
        progress: show a tqdm progress bar.
        description: the progress bar's label.

    Returns:
        The mean training loss of each epoch.

    Raises:
        DataError: images, masks or their shapes do not fit each other or the model,
            ``epochs`` is not a positive integer (or fewer than the INQ stages left),
            or the loss stops being finite.

    Example:
        >>> from qseg.data import synthetic_nuclei
        >>> x, y = synthetic_nuclei(8, size=16)
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> losses = fit(net, x, y, Training(lr=0.05, epochs=20, batch_size=4), progress=False)
        >>> losses[-1] < losses[0]
        True
        >>> three = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
        >>> classes = y.squeeze(1).long() * 2  # background 0, nuclei 2, no class 1
        >>> losses = fit(three, x, classes, Training(lr=0.05, epochs=20, loss="bce_dice"), progress=False)
        >>> losses[-1] < losses[0]
        True
    """
    training = training or Training()
    _check_data(images, masks)
    epochs = training.epochs if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise DataError(f"epochs must be a positive integer, got {epochs!r}")
    stages: list[int] = []
    if inq is not None:
        remaining = len(inq.portions) - inq.stage
        if remaining < 1:
            raise DataError("the INQ schedule is already at its last stage; nothing is left to train")
        if epochs < remaining:
            raise DataError(f"INQ needs at least one epoch per remaining stage ({remaining}); got {epochs}")
        # the first epoch of each stage, stages as even as integers allow
        stages = [math.floor(i * epochs / remaining) for i in range(remaining)]
    targets = _targets(masks, _output_channels(model, images))
    loss_of = loss_function(training.loss)
    optimizer = make_optimizer(model, training)
    if inq is not None:
        inq.attach(optimizer)
    hooks = training_hooks(model)  # TernaryTanh annealing, BNN latent-weight clipping
    device = _device(model)
    gen = torch.Generator().manual_seed(seed)
    batch = training.batch_size
    steps = math.ceil(len(images) / batch)
    history: list[float] = []
    model.train()
    with tqdm(total=epochs * steps, desc=description, disable=not progress, unit="step", leave=False) as bar:
        for epoch in range(epochs):
            if epoch in stages:
                inq.advance()  # type: ignore[union-attr]
            for group in optimizer.param_groups:
                group["lr"] = training.lr_at(epoch / epochs)
            hooks.epoch(epoch / max(epochs - 1, 1))
            order = torch.randperm(len(images), generator=gen)
            total = 0.0
            for start in range(0, len(images), batch):
                idx = order[start : start + batch]
                x, y = images[idx], targets[idx]
                if augment:
                    x, y = _augment(x, y, gen)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_of(segmentation_logits(model, x.to(device)), y.to(device))
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise DataError(f"the training loss became {value} at epoch {epoch + 1}; lower lr")
                loss.backward()
                optimizer.step()
                hooks.step()
                total += value * len(idx)
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{value:.4f}")
            history.append(total / len(images))
    model.eval()
    return history


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 4, multiple: int = 8) -> torch.Tensor:
    """The model's logits on ``images`` in eval mode, any H x W.

    Images are padded by reflection to a multiple of ``multiple`` (a U-Net with
    three poolings needs 8) and the logits cropped back. A model returning a
    tuple, list or dict gives its first entry (:func:`segmentation_logits`).

    Example:
        >>> net = nn.Conv2d(1, 1, 3, padding=1)
        >>> predict(net, torch.zeros(3, 1, 10, 13)).shape
        torch.Size([3, 1, 10, 13])
    """
    model.eval()
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        out.append(segmentation_logits(model, x)[..., :height, :width])
    return torch.cat(out)
