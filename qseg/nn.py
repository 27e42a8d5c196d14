"""Quantized layers: torch.nn conv / transposed conv / linear whose weight passes
through a quantizer, and :class:`ActQuant`, an activation quantizer in the graph.

The wrappers are subclasses of the torch.nn layers they replace and keep their
parameters under the same names (``weight``, ``bias``); the quantizer is the child
module ``weight_quant``. They are plain modules, so ``state_dict``, DDP and
``torch.compile`` work as for the float layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qseg.quantizers import Quantizer

__all__ = [
    "ActQuant",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "QuantLinear",
    "allow_float_checkpoints",
    "quantize_module",
]


class _WeightQuant:
    """Mixin: the quantized weight of a layer whose quantizer is ``self.weight_quant``."""

    weight: nn.Parameter
    weight_quant: Quantizer

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the layer uses it: on the quantizer's grid."""
        return self.weight_quant(self.weight)


class QuantConv1d(_WeightQuant, nn.Conv1d):
    """``nn.Conv1d`` with a quantized weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantConv2d(_WeightQuant, nn.Conv2d):
    """``nn.Conv2d`` with a quantized weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantConv3d(_WeightQuant, nn.Conv3d):
    """``nn.Conv3d`` with a quantized weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class _QuantConvTranspose(_WeightQuant):
    _dims: int
    _conv: staticmethod

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"only 'zeros' padding is supported for {type(self).__name__}")
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, self._dims, self.dilation
        )
        return self._conv(
            x,
            self.quantized_weight(),
            self.bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )


class QuantConvTranspose1d(_QuantConvTranspose, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with a quantized weight."""

    _dims = 1
    _conv = staticmethod(F.conv_transpose1d)


class QuantConvTranspose2d(_QuantConvTranspose, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with a quantized weight."""

    _dims = 2
    _conv = staticmethod(F.conv_transpose2d)


class QuantConvTranspose3d(_QuantConvTranspose, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with a quantized weight."""

    _dims = 3
    _conv = staticmethod(F.conv_transpose3d)


class QuantLinear(_WeightQuant, nn.Linear):
    """``nn.Linear`` with a quantized weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


#: float layer type -> its quantized subclass
QUANTIZED: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d,
    nn.Linear: QuantLinear,
}


def quantize_module(module: nn.Module, quantizer: Quantizer) -> nn.Module:
    """Turn a torch.nn conv / linear layer into its quantized subclass, in place.

    The module keeps its parameters, buffers and hooks (only its class changes
    and it gains the child ``weight_quant``), so parameter names and anything
    holding a reference to it stay valid. Only exact torch.nn types qualify: a
    subclass may override ``forward``, and replacing that would change the model.

    Example:
        >>> from qseg.quantizers import FixedPoint
        >>> conv = quantize_module(nn.Conv2d(1, 4, 3), FixedPoint(0, 4))
        >>> type(conv).__name__, sorted(conv.state_dict())
        ('QuantConv2d', ['bias', 'weight'])
    """
    cls = QUANTIZED.get(type(module))
    if cls is None:
        raise TypeError(f"cannot quantize a {type(module).__name__}; supported: {', '.join(QUANTIZED_NAMES)}")
    module.__class__ = cls
    module.add_module("weight_quant", quantizer)
    return module


QUANTIZED_NAMES = tuple(t.__name__ for t in QUANTIZED)


class ActQuant(nn.Module):
    """An activation quantizer placed in the graph by ``qseg.prepare``.

    ``rule`` records why it stands where it does (shown in the report and used
    by the exporters), e.g. ``"after BatchNorm"``.
    """

    def __init__(self, quantizer: Quantizer, rule: str = "") -> None:
        super().__init__()
        self.quantizer = quantizer
        self.rule = rule

    @property
    def signed(self) -> bool:
        """Whether the grid holds negative values."""
        return getattr(self.quantizer, "signed", True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(x)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}" if self.rule else ""


def _skip_missing_quantizer_state(module: nn.Module, incompatible: object) -> None:
    prefixes = tuple(f"{name}." for name, m in module.named_modules() if isinstance(m, Quantizer) and name)
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(prefixes)]


def allow_float_checkpoints(model: nn.Module) -> None:
    """Let ``model.load_state_dict(float_state, strict=True)`` accept a checkpoint of
    the float model: the quantizers' own state (e.g. INQ bounds) may be missing
    from it and keeps its current value. Unexpected keys still fail."""
    # a module-level function, so that a model holding the hook still pickles
    model.register_load_state_dict_post_hook(_skip_missing_quantizer_state)
