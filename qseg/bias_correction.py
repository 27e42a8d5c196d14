"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2, with
statistics from data): quantized weights shift the mean of a layer's output, and that
shift, unlike rounding noise, does not average out downstream. For each quantized layer
with a bias, the mean over the data of ``float_layer(x) - quantized_layer(x)`` per output
channel, with ``x`` the input the quantized model gives the layer, is added to its bias.
All layers are measured in one pass, before any is corrected (so a layer's correction does
not see how the corrections upstream move its input; one pass keeps it as cheap as the
ranges pass).

:func:`qseg.calibrate` runs it after setting the ranges, with ``bias_correction=True``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from qseg.accumulator import folds_norm
from qseg.errors import DataError
from qseg.nn import QUANTIZED

__all__ = ["BiasCorrection", "correct_biases"]

# the float class each quantized layer class was swapped from (QuantConv2d -> nn.Conv2d):
# its forward computes the layer with the float weight, without calling the hooks
_FLOAT_OF = {quant: float_ for float_, quant in QUANTIZED.items()}


@dataclass(frozen=True)
class BiasCorrection:
    """What bias correction did to one layer: ``shift_max`` and ``shift_mean`` are the
    largest and the mean magnitude of the per-channel shift added to its bias, or
    ``skipped`` says why the layer kept its bias.

    Example:
        >>> BiasCorrection("enc1.conv1", 0.012, 0.003).skipped is None
        True
    """

    name: str
    shift_max: float = 0.0
    shift_mean: float = 0.0
    skipped: str | None = None


class _MeanError:
    """A forward hook that sums, per output channel, the float layer's output minus the
    quantized layer's output."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        float_output = _FLOAT_OF[type(module)].forward(module, *args)
        if folds_norm(module):
            # in eval mode the output has the layer's BatchNorm folded in (qseg/accumulator.py):
            # the layer's own output is what its weights' error shows in
            output = module.quantized_forward(*args)
        error = (float_output - output).detach().double()
        channel = -1 if isinstance(module, nn.Linear) else 1
        error = error.movedim(channel, 0).reshape(error.shape[channel], -1)
        total = error.sum(dim=1)
        # in eval mode the layer adds its bias on its accumulator grid (qseg/accumulator.py):
        # measure against its own bias, which the correction moves
        added = module.layer_bias()
        if added is not None and added is not module.bias:
            total = total + (added - module.bias).detach().double() * error.shape[1]
        self.total = total if self.total is None else self.total + total
        self.count += error.shape[1]


def correct_biases(qmodel: nn.Module, batches: Iterable[tuple]) -> list[BiasCorrection]:
    """Add to each quantized layer's bias the mean error its weight quantization makes on
    ``batches`` (tuples of positional model inputs, already on the model's device).

    Layers without a bias are listed as skipped (their error is not corrected: a norm
    that follows removes a per-channel shift anyway, and adding a bias would change the
    model's parameters). Returns one row per quantized layer, in model order.

    Raises:
        DataError: ``batches`` yields nothing (an iterator already used up by the ranges
            pass: pass a list or a DataLoader, which can be iterated twice).

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 3, bias=False))
        >>> recipe = {"name": "w4", "weights": {"kind": "int", "bits": 4, "channel_axis": 0},
        ...           "keep_float": {"first": False, "last": False}}
        >>> qmodel = qseg.prepare(model, recipe, example_inputs=torch.randn(1, 1, 8, 8))
        >>> rows = correct_biases(qmodel, [(torch.randn(2, 1, 8, 8),)])
        >>> [(r.name, r.skipped) for r in rows]
        [('0', None), ('2', 'no bias')]
        >>> rows[0].shift_max > 0
        True
    """
    layers = {name: m for name, m in qmodel.named_modules() if type(m) in _FLOAT_OF}
    hooks = {name: _MeanError() for name, m in layers.items() if m.bias is not None}
    handles = [layers[name].register_forward_hook(hook) for name, hook in hooks.items()]
    training = qmodel.training
    seen = 0
    try:
        qmodel.eval()
        with torch.no_grad():
            for args in batches:
                qmodel(*args)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        qmodel.train(training)
    if seen == 0:
        raise DataError(
            "bias correction got no data: the data was used up by the ranges pass; "
            "pass a list or a DataLoader (something that can be iterated twice)"
        )
    rows = []
    for name, module in layers.items():
        hook = hooks.get(name)
        if hook is None:
            rows.append(BiasCorrection(name, skipped="no bias"))
            continue
        if hook.total is None:
            rows.append(BiasCorrection(name, skipped="never called on the data"))
            continue
        shift = (hook.total / hook.count).to(module.bias.dtype)
        with torch.no_grad():
            module.bias += shift.to(module.bias.device)
        rows.append(BiasCorrection(name, float(shift.abs().max()), float(shift.abs().mean())))
    return rows
