"""What a training loop must do for a quantized model, in any loop: ``qseg.training_hooks``.

Some quantizers need more than a forward pass: TernaryNet's activation is annealed
over training, BNN's latent weights are kept in [-1, 1] after each step (paper A),
and late in quantization-aware training the learned scales (LSQ) and the BatchNorm
statistics are frozen so that the last epochs fine-tune the weights on a fixed grid.
``qseg.train.fit`` calls these hooks; a user's own loop calls them the same way::

    hooks = qseg.training_hooks(qmodel, freeze_ranges_at=0.8, freeze_norms_at=0.9)
    for epoch in range(epochs):
        qmodel.train()
        hooks.epoch(epoch / max(epochs - 1, 1))   # after train(): it may put norms in eval
        for x, y in loader:
            loss = criterion(qmodel(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            hooks.step()

INQ's stages have their own schedule (``qseg.inq.Schedule``: ``advance()`` between
stages), which ``fit`` runs alongside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qseg.errors import QuantizerError
from qseg.graph import BATCH_NORMS
from qseg.quantizers import Quantizer

__all__ = ["TrainingHooks", "training_hooks"]


def _fraction(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise QuantizerError(f"{name} must be a fraction of training in [0, 1] or None, got {value!r}")
    return float(value)


@dataclass
class TrainingHooks:
    """The per-epoch and per-step quantization behaviour of one prepared model.

    Built by :func:`training_hooks`; ``annealed``, ``clipped``, ``learned_scales``
    and ``norms`` list what each hook acts on, so ``print(hooks)`` shows what a
    loop that skipped them would lose.

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
        ...                       nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> qmodel = qseg.prepare(model, "unet-ternarynet", example_inputs=torch.randn(1, 1, 12, 12))
        >>> hooks = qseg.training_hooks(qmodel, freeze_norms_at=0.9)
        >>> print(hooks)
        training hooks: anneal 2 TernaryTanh, clip 0 BNN latent weights, freeze 0 learned scales (never), freeze 2 BatchNorms at 90%
        >>> hooks.epoch(0.5)
        >>> [round(float(m.beta), 2) for m in hooks.annealed]          # slope 3 -> 8, halfway
        [5.5, 5.5]
    """

    annealed: list[Quantizer] = field(default_factory=list)
    clipped: list[torch.Tensor] = field(default_factory=list)
    learned_scales: list[nn.Parameter] = field(default_factory=list)
    norms: list[nn.Module] = field(default_factory=list)
    freeze_ranges_at: float | None = None
    freeze_norms_at: float | None = None

    def epoch(self, progress: float) -> None:
        """Call at the start of every epoch, after ``model.train()``, with the training
        progress in ``[0, 1]`` (``epoch / (epochs - 1)``): anneals the quantizers that follow it
        (TernaryTanh's slope), and
        from the freeze points on keeps learned scales fixed and BatchNorms in eval mode.

        Example:
            >>> hooks = TrainingHooks(norms=[torch.nn.BatchNorm2d(2)], freeze_norms_at=0.5)
            >>> hooks.epoch(0.4); hooks.norms[0].training
            True
            >>> hooks.epoch(0.6); hooks.norms[0].training
            False
        """
        if not 0.0 <= progress <= 1.0:
            raise QuantizerError(f"progress must be in [0, 1], got {progress}")
        for module in self.annealed:
            module.anneal(progress)
        if self.freeze_ranges_at is not None:
            frozen = progress >= self.freeze_ranges_at
            for scale in self.learned_scales:
                scale.requires_grad_(not frozen)
        if self.freeze_norms_at is not None and progress >= self.freeze_norms_at:
            for norm in self.norms:
                norm.eval()  # running statistics stay as they are; the affine part trains on

    def step(self) -> None:
        """Call after every ``optimizer.step()``: keeps BNN's latent weights in [-1, 1],
        where the sign's straight-through gradient is non-zero (paper A).

        Example:
            >>> w = torch.nn.Parameter(torch.tensor([1.7, -0.2, -3.0]))
            >>> TrainingHooks(clipped=[w]).step()
            >>> w.data
            tensor([ 1.0000, -0.2000, -1.0000])
        """
        with torch.no_grad():
            for weight in self.clipped:
                weight.clamp_(-1.0, 1.0)

    def __str__(self) -> str:
        def when(at: float | None) -> str:
            return "never" if at is None else f"at {at:.0%}"

        return (
            f"training hooks: anneal {len(self.annealed)} TernaryTanh, clip {len(self.clipped)} BNN "
            f"latent weights, freeze {len(self.learned_scales)} learned scales "
            f"({when(self.freeze_ranges_at)}), freeze {len(self.norms)} BatchNorms "
            + ("(never)" if self.freeze_norms_at is None else when(self.freeze_norms_at))
        )


def training_hooks(
    qmodel: nn.Module, freeze_ranges_at: float | None = None, freeze_norms_at: float | None = None
) -> TrainingHooks:
    """The hooks a training loop calls for ``qmodel`` (see the module docstring).

    Args:
        qmodel: a prepared model (or any module holding qseg quantizers).
        freeze_ranges_at: the training progress from which learned scales (``int``
            quantizers with ``learn_scale``) stop training; ``None``: never.
        freeze_norms_at: the progress from which BatchNorm statistics stop updating;
            ``None``: never.

    Raises:
        QuantizerError: a freeze point outside [0, 1].

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> recipe = {"name": "w4", "weights": {"kind": "int", "bits": 4, "channel_axis": 0, "learn_scale": True}}
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> hooks = qseg.training_hooks(qseg.prepare(model, recipe, example_inputs=torch.randn(1, 1, 9, 9)),
        ...                             freeze_ranges_at=0.75)
        >>> hooks.epoch(0.8)
        >>> [scale.requires_grad for scale in hooks.learned_scales]
        [False]
    """
    hooks = TrainingHooks(
        freeze_ranges_at=_fraction("freeze_ranges_at", freeze_ranges_at),
        freeze_norms_at=_fraction("freeze_norms_at", freeze_norms_at),
    )
    for module in qmodel.modules():
        # each quantizer says what it needs (Quantizer.annealed, learned_range, clips_latent_weights)
        if isinstance(module, Quantizer):
            if module.annealed:
                hooks.annealed.append(module)
            hooks.learned_scales.extend(module.learned_range())
        elif isinstance(module, BATCH_NORMS):
            hooks.norms.append(module)
        quantizer = getattr(module, "weight_quant", None)
        if isinstance(quantizer, Quantizer) and quantizer.clips_latent_weights:
            hooks.clipped.append(module.weight)
    return hooks
