"""Quantized layers: torch.nn conv / transposed conv / linear whose weight passes
through a quantizer, and :class:`ActQuant`, an activation quantizer in the graph.

The wrappers are subclasses of the torch.nn layers they replace and keep their
parameters under the same names (``weight``, ``bias``); the quantizer is the child
module ``weight_quant``. They are plain modules, so ``state_dict``, DDP and
``torch.compile`` work as for the float layer. :class:`FoldedNorm` is the BatchNorm that
``convert`` folds into such a layer, which the layer computes itself in eval mode without
gradients (``qseg/accumulator.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qseg.accumulator import AccumulatorLink, accumulator_bias, eval_forward, folds_norm
from qseg.quantizers import Quantizer

__all__ = [
    "FOLDED_NORMS",
    "ActQuant",
    "FoldedNorm",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "QuantLinear",
    "ReLUAfterQuant",
    "allow_float_checkpoints",
    "fold_norm_into",
    "quantize_module",
    "unfold_norm",
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

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not folds_norm(self):
            return self.quantized_forward(x, *args, **kwargs)
        if args or kwargs:
            # a transposed conv told its output size: the frozen form has the one its
            # parameters give, so the layer applies its BatchNorm (which passes this through)
            norm = self.qseg_accumulator.norm
            y = self.quantized_forward(x, *args, **kwargs)
            return F.batch_norm(
                y, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps
            )
        # validation and inference: the layer as convert freezes it, its BatchNorm folded in
        # (which then passes its input through), so both compute alike
        return eval_forward(self, x)

    def quantized_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The layer on its quantized weight and its bias (:meth:`layer_bias`), without a
        BatchNorm folded in: what ``forward`` computes wherever
        :func:`qseg.accumulator.folds_norm` does not hold (training, or gradients recorded).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from qseg.quantizers import FixedPoint
            >>> conv = quantize_module(nn.Conv2d(1, 2, 3), FixedPoint(0, 4))
            >>> x = torch.randn(1, 1, 5, 5)
            >>> torch.equal(conv.quantized_forward(x), conv(x))   # no BatchNorm to fold
            True
        """
        return self._weighted(x, self.quantized_weight(), self.layer_bias(), *args, **kwargs)


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

    def _weighted(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)


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

    def _weighted(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)


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

    def _weighted(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)


class _QuantConvTranspose(_WeightQuant):
    _dims: int
    _conv: staticmethod

    def _weighted(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        output_size: list[int] | None = None,
    ) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"only 'zeros' padding is supported for {type(self).__name__}")
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, self._dims, self.dilation
        )
        return self._conv(
            x,
            weight,
            bias,
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

    def _weighted(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


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


class FoldedNorm:
    """Mixin: a BatchNorm that ``convert`` folds into the quantized layer before it
    (:attr:`qseg_folded_into`). Where that layer computes the fold itself (eval mode,
    no gradients: :func:`qseg.accumulator.folds_norm`), the BatchNorm passes its input
    through; otherwise it normalizes as a BatchNorm does. ``qseg.prepare`` gives a
    BatchNorm its folded subclass (:data:`FOLDED_NORMS`, :func:`fold_norm_into`); its
    parameters, buffers and ``state_dict`` stay as they were.

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
        ...                       nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> x = torch.rand(2, 1, 12, 12)
        >>> qmodel = qseg.prepare(model, "int8", example_inputs=x)
        >>> _ = qseg.calibrate(qmodel, [x], progress=False)
        >>> norm = qmodel.get_submodule("3")
        >>> type(norm).__name__, norm.qseg_folded_into is qmodel.get_submodule("2")
        ('FoldedBatchNorm2d', True)
        >>> with torch.no_grad():                       # the prepared model computes the fold
        ...     torch.equal(qmodel.eval()(x), qseg.convert(qmodel)(x))
        True
    """

    @property
    def qseg_folded_into(self) -> nn.Module:
        """The quantized layer this BatchNorm folds into (not a child module: the layer
        belongs to the model, not to the BatchNorm)."""
        return self.__dict__["_qseg_folded_into"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` itself where the layer before computed the fold, else the BatchNorm of ``x``.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> conv, norm = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)
            >>> fold_norm_into(norm, conv)         # a float conv never folds: a plain BatchNorm
            True
            >>> x = torch.randn(2, 2, 3, 3)
            >>> torch.equal(norm(x), nn.functional.batch_norm(x, None, None, training=True))
            True
        """
        if folds_norm(self.qseg_folded_into):
            return x
        return super().forward(x)


class FoldedBatchNorm1d(FoldedNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` folded into the quantized layer before it (:class:`FoldedNorm`)."""


class FoldedBatchNorm2d(FoldedNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` folded into the quantized layer before it (:class:`FoldedNorm`)."""


class FoldedBatchNorm3d(FoldedNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` folded into the quantized layer before it (:class:`FoldedNorm`)."""


class FoldedSyncBatchNorm(FoldedNorm, nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` folded into the quantized layer before it (:class:`FoldedNorm`)."""


#: BatchNorm type -> its folded subclass
FOLDED_NORMS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: FoldedBatchNorm1d,
    nn.BatchNorm2d: FoldedBatchNorm2d,
    nn.BatchNorm3d: FoldedBatchNorm3d,
    nn.SyncBatchNorm: FoldedSyncBatchNorm,
}


def fold_norm_into(norm: nn.Module, layer: nn.Module) -> bool:
    """Make the BatchNorm ``norm`` a :class:`FoldedNorm` of the quantized ``layer``, in
    place; ``False`` (nothing changed) for a type other than the torch.nn BatchNorms,
    whose ``forward`` may do more than normalize.

    Example:
        >>> norm = nn.BatchNorm2d(4)
        >>> fold_norm_into(norm, nn.Conv2d(4, 4, 1)), type(norm).__name__, sorted(norm.state_dict())[:2]
        (True, 'FoldedBatchNorm2d', ['bias', 'num_batches_tracked'])
        >>> fold_norm_into(nn.LayerNorm(4), nn.Linear(4, 4))
        False
    """
    cls = FOLDED_NORMS.get(type(norm))
    if cls is None:
        return False
    norm.__class__ = cls
    norm.__dict__["_qseg_folded_into"] = layer
    return True


def unfold_norm(norm: nn.Module) -> None:
    """Make a :class:`FoldedNorm` a plain torch.nn BatchNorm again, in place.

    Example:
        >>> norm = nn.BatchNorm3d(2)
        >>> _ = fold_norm_into(norm, nn.Conv3d(2, 2, 1))
        >>> unfold_norm(norm)
        >>> type(norm) is nn.BatchNorm3d, hasattr(norm, "qseg_folded_into")
        (True, False)
    """
    if isinstance(norm, FoldedNorm):
        norm.__class__ = next(c for c, folded in FOLDED_NORMS.items() if folded is type(norm))
        del norm.__dict__["_qseg_folded_into"]


class ReLUAfterQuant(nn.ReLU):
    """A ReLU whose only input is an unsigned activation quantizer's output (``prepare``
    gives such a ReLU this class, in place; same ``inplace`` flag, no state).

    The quantizer's grid starts at 0, so the ReLU changes no value. While training, that
    quantizer (``Quantizer.absorbs_relu``) gives the ReLU's gradient itself and marks its
    result's ``grad_fn`` ``relu_applied``; such an input is returned as it is, which
    spares a full-size output and a backward pass per step. Any other input (eval, no
    gradient, a quantizer bypassed by hand) is rectified exactly as by ``nn.ReLU``.

    Example:
        >>> import torch
        >>> from qseg.quantizers import Uniform
        >>> q = Uniform(8, mode="unsigned")
        >>> q.observe_range(torch.tensor(0.0), torch.tensor(2.55))
        >>> q.absorbs_relu = True
        >>> x = torch.tensor([-1.0, 0.004, 0.5, 3.0], requires_grad=True)
        >>> y = ReLUAfterQuant()(q(x * 1.0))
        >>> y.sum().backward()
        >>> y.detach(), x.grad                   # codes 0 and 255 pass nothing back, as a ReLU
        (tensor([0.0000, 0.0000, 0.5000, 2.5500]), tensor([0., 0., 1., 0.]))
        >>> ReLUAfterQuant()(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(x.grad_fn, "relu_applied", False):
            return x
        return super().forward(x)


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
