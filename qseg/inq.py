"""Incremental network quantization (INQ, Zhou et al. 2017), as paper B trains its FCNs.

The weights of every layer whose weight quantizer is a
:class:`~qseg.quantizers.PowerOfTwo` are quantized in accumulated portions
(default ``0.5, 0.75, 0.875, 1.0``). Between stages the model trains: the
weights already on the grid are frozen, the others stay float and compensate.

qseg's reading of the method (PAPERS.md, paper B):

- stage 0 is the float network: building a :class:`Schedule` switches the
  quantizers to incremental mode with nothing frozen, so the model computes
  with its float weights;
- :meth:`Schedule.advance` starts the next stage. In each layer it freezes the
  largest-magnitude weights among those still float (ties: the lower flat index
  first) until ``frozen_count(portion, numel)`` are frozen, and writes their grid
  values into the weight itself. The frozen set only grows;
- a layer's bounds ``(n1, n2)`` are fixed from its whole weight at the first
  stage and kept;
- frozen weights get zero gradient, and :meth:`Schedule.attach` hooks an
  optimizer so that momentum, Adam's moments and weight decay cannot move them.

All state (masks, stage, bounds) lives in buffers of the quantizers, so
``qmodel.state_dict()`` carries it. To resume, load the checkpoint into a
freshly prepared model and build ``Schedule(qmodel, portions)`` again: the
constructor reads the stage from the buffers (there is no separate schedule
state to save).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import fx, nn

from qseg.errors import QuantizerError
from qseg.graph import get_attr
from qseg.nn import QUANTIZED
from qseg.quantizers import PowerOfTwo

__all__ = ["DEFAULT_PORTIONS", "Attachment", "Schedule", "frozen_count"]

#: Paper B's accumulated portions (those of Zhou et al.).
DEFAULT_PORTIONS = (0.5, 0.75, 0.875, 1.0)


def frozen_count(portion: float, numel: int) -> int:
    """How many of a layer's ``numel`` weights are frozen once ``portion`` is reached:
    ``ceil(portion * numel)``.

    The portion is read as the decimal it is written as (``0.1`` is one tenth,
    not the binary float just above it), so ``0.1`` of 30 weights is 3, not 4.
    Rounding up means every layer reaches at least its portion, and a small layer
    freezes at least one weight at the first stage.

    Example:
        >>> frozen_count(0.5, 9), frozen_count(0.875, 8), frozen_count(0.1, 30), frozen_count(1.0, 5)
        (5, 7, 3, 5)
    """
    return math.ceil(Fraction(repr(float(portion))) * numel)


def _check_portions(portions: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in portions)
    except (TypeError, ValueError):
        raise QuantizerError(f"portions must be a sequence of numbers, got {portions!r}") from None
    if not values:
        raise QuantizerError("portions must hold at least one value (the last one 1.0)")
    for p in values:
        if not 0.0 < p <= 1.0:
            raise QuantizerError(f"portions must lie in (0, 1], got {p} in {list(values)}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise QuantizerError(f"portions must be strictly increasing, got {list(values)}")
    if values[-1] != 1.0:
        raise QuantizerError(
            f"the last portion must be 1.0 (every weight on the grid at the end), got {list(values)}"
        )
    return values


@dataclass(frozen=True)
class _Layer:
    name: str
    weight: nn.Parameter
    quantizer: PowerOfTwo


def _owner(target: str) -> str:
    return target.rsplit(".", 1)[0] if "." in target else target


def _scheduled_layers(model: nn.Module) -> list[_Layer]:
    found = []
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quant", None)
        # INQ is an algorithm of the power-of-two grid (its incremental mode lives on
        # PowerOfTwo): the class, not a capability, says which weights it schedules
        if type(module) in QUANTIZED.values() and isinstance(quantizer, PowerOfTwo):
            found.append(_Layer(name, module.weight, quantizer))
    for name, module in model.named_modules():
        if isinstance(module, fx.GraphModule):
            # functional conv/linear calls: the quantizer is a graph node fed by the parameter
            prefix = f"{name}." if name else ""
            for node in module.graph.nodes:
                source = node.args[0] if node.op == "call_module" and node.args else None
                if not (isinstance(source, fx.Node) and source.op == "get_attr"):
                    continue
                quantizer, param = module.get_submodule(node.target), get_attr(module, source.target)
                if isinstance(quantizer, PowerOfTwo) and isinstance(param, nn.Parameter):
                    found.append(_Layer(prefix + _owner(source.target), param, quantizer))
    seen_weights: dict[int, str] = {}
    seen_quantizers: dict[int, str] = {}
    for layer in found:
        for seen, key, what in (
            (seen_weights, id(layer.weight), "weight"),
            (seen_quantizers, id(layer.quantizer), "quantizer"),
        ):
            if key in seen:
                raise QuantizerError(
                    f"layers {seen[key]} and {layer.name} share one {what}: INQ needs one "
                    "PowerOfTwo quantizer per weight tensor; give each its own"
                )
            seen[key] = layer.name
    return found


class Attachment:
    """The optimizer hooks installed by :meth:`Schedule.attach`; :meth:`remove`
    takes them off again.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from qseg.nn import quantize_module
        >>> from qseg.quantizers import PowerOfTwo
        >>> model = nn.Sequential(quantize_module(nn.Linear(3, 2), PowerOfTwo(7)))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> hooks = Schedule(model).attach(optimizer)
        >>> hooks.remove()
    """

    def __init__(self, optimizer: torch.optim.Optimizer, handles: Sequence) -> None:
        self.optimizer = optimizer
        self._handles = list(handles)

    def remove(self) -> None:
        """Take the hooks off the optimizer: frozen weights are no longer restored.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from qseg.nn import quantize_module
            >>> from qseg.quantizers import PowerOfTwo
            >>> layer = quantize_module(nn.Linear(3, 2), PowerOfTwo(7))
            >>> schedule = Schedule(nn.Sequential(layer))
            >>> optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, weight_decay=0.5)
            >>> hooks = schedule.attach(optimizer)
            >>> _ = schedule.advance()
            >>> hooks.remove()
            >>> frozen, before = layer.weight_quant.frozen, layer.weight.detach().clone()
            >>> layer(torch.ones(1, 3)).sum().backward()
            >>> optimizer.step()                          # weight decay now moves frozen weights
            >>> torch.equal(layer.weight[frozen], before[frozen])
            False
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class Schedule:
    """INQ's incremental schedule over the ``PowerOfTwo`` weight quantizers of a model.

    Building a schedule on a prepared model that no schedule has touched puts
    it at stage 0: every scheduled layer computes with its float weight. On a
    model whose quantizers already hold a schedule's state (loaded from a
    checkpoint, or left by another ``Schedule``), the constructor resumes at the
    stored stage after checking that the masks agree with ``portions``.

    Stage ``s`` (after ``s`` calls of :meth:`advance`) has ``frozen_count(portions[s-1],
    numel)`` weights of each layer frozen on the grid; the last stage has them
    all. Layers kept float by the recipe have no weight quantizer and are not
    scheduled.

    Args:
        qmodel: a model prepared with a ``power_of_two`` weight recipe (or any
            module holding qseg layers whose ``weight_quant`` is a ``PowerOfTwo``).
        portions: accumulated portions, strictly increasing in ``(0, 1]``, the
            last one ``1.0``.

    Raises:
        QuantizerError: no layer has a ``PowerOfTwo`` weight quantizer, the
            portions are invalid, or the stored state does not match them.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from qseg.nn import quantize_module
        >>> from qseg.quantizers import PowerOfTwo
        >>> layer = quantize_module(nn.Linear(4, 2, bias=False), PowerOfTwo(7))
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[0.9, -0.3, 0.2, 0.05], [-0.6, 0.4, -0.1, 0.7]]))
        >>> schedule = Schedule(nn.Sequential(layer), portions=[0.5, 1.0])
        >>> schedule.stage, schedule.frozen_fraction()
        (0, {'0': 0.0})
        >>> schedule.advance()
        1
        >>> layer.weight                    # the largest half is on the grid, the rest float
        Parameter containing:
        tensor([[ 1.0000, -0.3000,  0.2000,  0.0500],
                [-0.5000,  0.5000, -0.1000,  0.5000]], requires_grad=True)
        >>> schedule.advance(), schedule.done
        (2, True)
    """

    def __init__(self, qmodel: nn.Module, portions: Sequence[float] = DEFAULT_PORTIONS) -> None:
        self._portions = _check_portions(portions)
        self._layers = _scheduled_layers(qmodel)
        if not self._layers:
            raise QuantizerError(
                "no layer of this model has a PowerOfTwo weight quantizer, so INQ has nothing to "
                "schedule: prepare it with a recipe whose weights are {kind: power_of_two}"
            )
        modes = {layer.name: bool(layer.quantizer.incremental) for layer in self._layers}
        if not any(modes.values()):
            for layer in self._layers:
                layer.quantizer.begin_incremental(layer.weight)
        elif not all(modes.values()):
            fresh = sorted(name for name, on in modes.items() if not on)
            raise QuantizerError(
                f"layers {fresh} hold no INQ state while the others do: load the whole "
                "checkpoint (model.state_dict()) before building the Schedule"
            )
        self._check_state()

    def _check_state(self) -> None:
        stages = {layer.name: int(layer.quantizer.stage) for layer in self._layers}
        if len(set(stages.values())) > 1:
            raise QuantizerError(
                f"the layers are at different INQ stages {stages}: load one checkpoint whole"
            )
        stage = next(iter(stages.values()))
        if stage > len(self._portions):
            raise QuantizerError(
                f"the model is at INQ stage {stage}, beyond the {len(self._portions)} stages of "
                f"portions {list(self._portions)}: pass the portions it was trained with"
            )
        portion = self._portions[stage - 1] if stage else 0.0
        for layer in self._layers:
            frozen = layer.quantizer.frozen
            if frozen.shape != layer.weight.shape:
                raise QuantizerError(
                    f"layer {layer.name}: INQ mask of shape {tuple(frozen.shape)} for a weight of "
                    f"shape {tuple(layer.weight.shape)}: the checkpoint is from another model"
                )
            want, have = frozen_count(portion, layer.weight.numel()), int(frozen.sum())
            if have != want:
                raise QuantizerError(
                    f"layer {layer.name}: {have} of {layer.weight.numel()} weights frozen at stage "
                    f"{stage}, but portion {portion} asks for {want}: pass the portions the model "
                    "was trained with"
                )

    @property
    def portions(self) -> tuple[float, ...]:
        """The accumulated portions, one per stage after stage 0."""
        return self._portions

    @property
    def stage(self) -> int:
        """How many stages have been started: 0 (float) to ``len(portions)``."""
        return int(self._layers[0].quantizer.stage)

    @property
    def done(self) -> bool:
        """Whether the last stage has started: every scheduled weight is on its grid."""
        return self.stage == len(self._portions)

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the scheduled layers: qseg layers in module order, then functional
        calls (named after their weight's owner, as in the report)."""
        return tuple(layer.name for layer in self._layers)

    def frozen_fraction(self) -> dict[str, float]:
        """Per layer, the share of its weights frozen on the grid.

        Example:
            >>> from torch import nn
            >>> from qseg.nn import quantize_module
            >>> from qseg.quantizers import PowerOfTwo
            >>> model = nn.Sequential(quantize_module(nn.Linear(3, 3), PowerOfTwo(7)))
            >>> schedule = Schedule(model)
            >>> _ = schedule.advance()
            >>> schedule.frozen_fraction()                # ceil(0.5 * 9) = 5 of 9
            {'0': 0.5555555555555556}
        """
        return {
            layer.name: float(layer.quantizer.frozen.sum()) / layer.weight.numel() for layer in self._layers
        }

    def advance(self) -> int:
        """Start the next stage and return its number.

        In each layer, the largest-magnitude float weights are frozen until the
        stage's portion is reached, and their grid values are written into the
        weight. At the first stage the layer's bounds ``(n1, n2)`` are fixed from
        its whole weight.

        Raises:
            QuantizerError: the schedule is done, or a layer's weight holds NaN
                or infinity (nothing is changed then).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from qseg.nn import quantize_module
            >>> from qseg.quantizers import PowerOfTwo
            >>> layer = quantize_module(nn.Linear(2, 1, bias=False), PowerOfTwo(7))
            >>> with torch.no_grad():
            ...     _ = layer.weight.copy_(torch.tensor([[0.3, -0.7]]))
            >>> schedule = Schedule(nn.Sequential(layer), portions=[0.5, 1.0])
            >>> schedule.advance(), layer.weight.tolist()
            (1, [[0.30000001192092896, -0.5]])
            >>> schedule.advance(), layer.weight.tolist()
            (2, [[0.25, -0.5]])
        """
        stage = self.stage
        if self.done:
            raise QuantizerError(
                f"the INQ schedule is done: all {len(self._portions)} stages of portions "
                f"{list(self._portions)} have started and every weight is on its grid; "
                "convert the model instead of calling advance() again"
            )
        with torch.no_grad():
            # check every layer first, so that a failure leaves no layer a stage ahead
            for layer in self._layers:
                w = layer.weight.detach()
                if not torch.isfinite(w).all():
                    raise QuantizerError(
                        f"layer {layer.name}: its weight holds NaN or infinite values; INQ cannot rank "
                        "or quantize it (check the learning rate and the loss)"
                    )
                if stage == 0 and w.numel() and not bool((w != 0).any()):
                    raise QuantizerError(
                        f"layer {layer.name}: its weight is all zero, which gives no power-of-two "
                        "bounds; initialise or train it before the first stage"
                    )
            for layer in self._layers:
                self._freeze(layer, self._portions[stage], first=stage == 0)
        return stage + 1

    @staticmethod
    def _freeze(layer: _Layer, portion: float, first: bool) -> None:
        quantizer, weight = layer.quantizer, layer.weight
        w = weight.detach()
        if first:
            quantizer.fix_bounds(w)
        frozen = quantizer.frozen.flatten()
        need = frozen_count(portion, w.numel()) - int(frozen.sum())
        # frozen entries rank below every float one (magnitudes are >= 0)
        magnitude = w.abs().flatten().masked_fill(frozen, -1.0)
        order = torch.sort(magnitude, descending=True, stable=True).indices
        more = torch.zeros_like(frozen)
        more[order[:need]] = True
        quantizer.freeze(more.view(quantizer.frozen.shape))
        # frozen entries already lie on the grid, float ones pass through: only the new ones change
        weight.copy_(quantizer(w))

    def attach(self, optimizer: torch.optim.Optimizer) -> Attachment:
        """Hook ``optimizer`` so that its steps leave frozen weights exactly as they are.

        The gradient of a frozen weight is already zero, but momentum, Adam's
        running moments and weight decay would still move it: the hooks save
        the scheduled weights before each ``optimizer.step()`` and write the
        frozen entries back after it. The hooks read the masks at every step,
        so one attachment serves all stages.

        Raises:
            QuantizerError: ``optimizer`` updates none of the scheduled weights.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from qseg.nn import quantize_module
            >>> from qseg.quantizers import PowerOfTwo
            >>> layer = quantize_module(nn.Linear(4, 4), PowerOfTwo(7))
            >>> schedule = Schedule(nn.Sequential(layer))
            >>> optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
            >>> _ = schedule.attach(optimizer)
            >>> _ = schedule.advance()
            >>> frozen = layer.weight_quant.frozen
            >>> before = layer.weight.detach().clone()
            >>> layer(torch.randn(8, 4)).sum().backward()
            >>> optimizer.step()
            >>> torch.equal(layer.weight[frozen], before[frozen])
            True
        """
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        layers = [layer for layer in self._layers if id(layer.weight) in held]
        if not layers:
            raise QuantizerError(
                "the optimizer updates none of the weights this INQ schedule freezes: build it "
                "over the prepared model's parameters"
            )
        saved: list[torch.Tensor] = []

        def save(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:  # noqa: ARG001
            saved[:] = [layer.weight.detach().clone() for layer in layers]

        def restore(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:  # noqa: ARG001
            with torch.no_grad():
                for layer, before in zip(layers, saved, strict=True):
                    layer.weight.copy_(torch.where(layer.quantizer.frozen, before, layer.weight))
            saved.clear()

        handles = (optimizer.register_step_pre_hook(save), optimizer.register_step_post_hook(restore))
        return Attachment(optimizer, handles)

    def __repr__(self) -> str:
        return (
            f"Schedule(stage {self.stage} of {len(self._portions)}, portions {list(self._portions)}, "
            f"{len(self._layers)} layers)"
        )
