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

from qseg.accumulator import AccumulatorLink, accumulator_bias
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
    # set by qseg.prepare where the layer's input lies on an activation grid (qseg/accumulator.py)
    qseg_accumulator: AccumulatorLink | None = None

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the layer uses it: on the quantizer's grid."""
        return self.weight_quant(self.weight)

    def layer_bias(self) -> torch.Tensor | None:
        """The bias as the layer adds it: in eval mode, on its accumulator grid where
        ``qseg.prepare`` linked it to its input's grid (as an int8 runtime adds it)."""
        if self.training or self.qseg_accumulator is None:
            return self.bias
        return accumulator_bias(self)


class QuantConv1d(_WeightQuant, nn.Conv1d):
    """``nn.Conv1d`` with a quantized weight.

    Built from a float layer by :func:`quantize_module` (what ``qseg.prepare``
    does); ``weight`` stays the float latent weight that the optimizer updates.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from qseg.quantizers import FixedPoint
        >>> conv = quantize_module(nn.Conv1d(1, 1, 2, bias=False), FixedPoint(0, 2))
        >>> with torch.no_grad():
        ...     _ = conv.weight.copy_(torch.tensor([[[0.3, -0.9]]]))
        >>> conv.quantized_weight().tolist()          # Q0.2: step 0.25, saturates at 0.75
        [[[0.25, -0.75]]]
        >>> conv(torch.tensor([[[1.0, 2.0, 3.0]]])).tolist()
        [[[-1.25, -1.75]]]
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.layer_bias())


class QuantConv2d(_WeightQuant, nn.Conv2d):
    """``nn.Conv2d`` with a quantized weight.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from qseg.quantizers import FixedPoint
        >>> _ = torch.manual_seed(0)
        >>> conv = quantize_module(nn.Conv2d(1, 2, 3), FixedPoint(0, 4))
        >>> x = torch.randn(1, 1, 8, 8)
        >>> conv(x).shape
        torch.Size([1, 2, 6, 6])
        >>> torch.equal(conv(x), torch.conv2d(x, conv.quantized_weight(), conv.bias))
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.layer_bias())


class QuantConv3d(_WeightQuant, nn.Conv3d):
    """``nn.Conv3d`` with a quantized weight.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from qseg.quantizers import Ternary
        >>> _ = torch.manual_seed(0)
        >>> conv = quantize_module(nn.Conv3d(1, 2, 2), Ternary(channel_axis=0))
        >>> conv(torch.randn(1, 1, 4, 4, 4)).shape
        torch.Size([1, 2, 3, 3, 3])
        >>> [len(f.unique()) for f in conv.quantized_weight()]   # {-alpha, 0, alpha} per filter
        [3, 3]
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.layer_bias())


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
            self.layer_bias(),
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )


class QuantConvTranspose1d(_QuantConvTranspose, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with a quantized weight.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from qseg.quantizers import Binary
        >>> up = quantize_module(nn.ConvTranspose1d(1, 1, 2, bias=False), Binary())
        >>> with torch.no_grad():
        ...     _ = up.weight.copy_(torch.tensor([[[0.3, -0.9]]]))
        >>> up(torch.tensor([[[1.0, 2.0]]])).tolist()   # the weight acts as [+1, -1]
        [[[1.0, 1.0, -2.0]]]
    """

    _dims = 1
    _conv = staticmethod(F.conv_transpose1d)


class QuantConvTranspose2d(_QuantConvTranspose, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with a quantized weight.

    Like the float layer, ``forward`` accepts ``output_size`` to pick among the
    output sizes a strided transposed convolution can produce.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from qseg.quantizers import FixedPoint
        >>> up = quantize_module(nn.ConvTranspose2d(4, 2, 2, stride=2), FixedPoint(0, 4))
        >>> x = torch.randn(1, 4, 4, 4)
        >>> up(x).shape, up(x, output_size=[9, 9]).shape
        (torch.Size([1, 2, 8, 8]), torch.Size([1, 2, 9, 9]))
    """

    _dims = 2
    _conv = staticmethod(F.conv_transpose2d)


class QuantConvTranspose3d(_QuantConvTranspose, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with a quantized weight.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from qseg.quantizers import DoReFa
        >>> _ = torch.manual_seed(0)
        >>> up = quantize_module(nn.ConvTranspose3d(2, 1, 2, stride=2), DoReFa(2))
        >>> up(torch.randn(1, 2, 3, 3, 3)).shape
        torch.Size([1, 1, 6, 6, 6])
        >>> [round(v, 4) for v in up.quantized_weight().unique().tolist()]   # 2-bit DoReFa levels
        [-1.0, -0.3333, 0.3333, 1.0]
    """

    _dims = 3
    _conv = staticmethod(F.conv_transpose3d)


class QuantLinear(_WeightQuant, nn.Linear):
    """``nn.Linear`` with a quantized weight.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from qseg.quantizers import FixedPoint
        >>> fc = quantize_module(nn.Linear(2, 1, bias=False), FixedPoint(0, 2))
        >>> with torch.no_grad():
        ...     _ = fc.weight.copy_(torch.tensor([[0.3, -0.9]]))
        >>> fc(torch.tensor([[1.0, 1.0]])).tolist()   # 0.25 - 0.75
        [[-0.5]]
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.layer_bias())


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
    # a grid set from data is set from the weights now, so that an optimizer built after
    # prepare holds a learned scale with its final (per-channel) shape
    quantizer.init_from(module.weight.detach())
    return module


QUANTIZED_NAMES = tuple(t.__name__ for t in QUANTIZED)


class ActQuant(nn.Module):
    """An activation quantizer placed in the graph by ``qseg.prepare``.

    ``rule`` records why it stands where it does (shown in the report and used
    by the exporters), e.g. ``"after BatchNorm"``.

    Example:
        >>> import torch
        >>> from qseg.quantizers import FixedPoint
        >>> act = ActQuant(FixedPoint(6, 0, signed=False), rule="after BatchNorm")   # paper A's Qa6.0
        >>> act(torch.tensor([-1.0, 2.4, 70.0]))
        tensor([ 0.,  2., 63.])
        >>> act.signed, act.rule
        (False, 'after BatchNorm')
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
    missing = set(incompatible.missing_keys)
    for name, m in module.named_modules():
        quantizer = getattr(m, "weight_quant", None)
        prefix = f"{name}.weight_quant." if name else "weight_quant."
        if isinstance(quantizer, Quantizer) and any(k.startswith(prefix) for k in missing):
            # a float checkpoint brought new weights: a grid set from the old ones is stale
            quantizer.init_from(m.weight.detach(), reset=True)
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(prefixes)]


def allow_float_checkpoints(model: nn.Module) -> None:
    """Let ``model.load_state_dict(float_state, strict=True)`` accept a checkpoint of
    the float model: the quantizers' own state (e.g. INQ bounds) may be missing
    from it and keeps its current value. Unexpected keys still fail.

    ``qseg.prepare`` calls it on the model it returns; call it yourself on a model
    built with :func:`quantize_module`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from qseg.quantizers import PowerOfTwo
        >>> float_model = nn.Sequential(nn.Linear(2, 2))
        >>> qmodel = nn.Sequential(quantize_module(nn.Linear(2, 2), PowerOfTwo(bits=5)))
        >>> qmodel.load_state_dict(float_model.state_dict())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: Error(s) in loading state_dict for Sequential:...
        >>> allow_float_checkpoints(qmodel)
        >>> qmodel.load_state_dict(float_model.state_dict())
        <All keys matched successfully>
        >>> torch.equal(qmodel[0].weight, float_model[0].weight)
        True
    """
    # a module-level function, so that a model holding the hook still pickles
    model.register_load_state_dict_post_hook(_skip_missing_quantizer_state)
