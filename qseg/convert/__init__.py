"""``qseg.convert``: freeze a prepared model for inference and export.

The converted model is what the exporters write and what the runtimes must
reproduce:

- activation quantizers with a uniform grid become :class:`FrozenActQuant`
  (``qseg::fake_quant``); a ReLU right after an unsigned one is removed (it is
  the identity on that grid, and a DequantizeLinear must feed the next conv);
- a quantized conv keeps its integer weight codes; a BatchNorm that follows it
  folds exactly into its per-channel scale, ``2^-f * gamma / sqrt(var + eps)``,
  and its bias; when the conv's input lies on a power-of-two grid it becomes an
  *integer* conv (``qseg::qconv``): int32 bias codes at scale
  ``s_in * s_w``, computed as an integer runtime computes it;
- a layer whose input lies on activation grids of one step keeps its bias (folded)
  rounded onto its accumulator grid, ``s_in * s_w``, as the prepared model adds it
  in eval mode and an int8 runtime adds it (``qseg/accumulator.py``);
- a layer with a non-uniform grid (INQ) keeps float weights that lie exactly on
  the grid, and its BatchNorm stays a separate op;
- float layers (first/last) are left as they are;
- a functional layer's weight quantizer (``F.conv2d(x, self.weight)`` in a model's
  own ``forward``) becomes a :class:`FrozenWeight` holding the integer codes;
- a quantized layer called more than once (a shared conv) freezes with a float
  input and no fold: its frozen module serves every call, and the calls may read
  other grids and feed other BatchNorms.

The decisions are taken once, on a graph of the prepared model, into a
:class:`~qseg.convert.plan.ConversionPlan` (``plan.py``), and carried out by one of
two appliers: ``apply_fx.py`` rewrites a ``torch.fx`` GraphModule; ``apply_swap.py``
swaps modules in an eager copy of a model prepared on the fallback path (swapped
modules and hooks, ``qseg/swap.py``), whose graph facts (which BatchNorm follows
which conv, which input lies on which grid) come from ``torch.export`` of a float
twin of the model on example inputs. The frozen modules live in ``frozen.py``, the
report in ``report.py``.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from qseg.convert.apply_fx import convert_fx
from qseg.convert.apply_swap import convert_swap
from qseg.convert.frozen import FrozenActQuant, FrozenLayer, FrozenWeight
from qseg.convert.report import ConvertReport
from qseg.errors import ExportError

__all__ = ["ConvertReport", "FrozenActQuant", "FrozenLayer", "FrozenWeight", "convert"]


def convert(qmodel: nn.Module, example_inputs: torch.Tensor | tuple | None = None) -> nn.Module:
    """An inference copy of a prepared model: eval mode, BatchNorm folded where it
    follows a quantized conv, weights frozen to integer codes, activation
    quantizers frozen; ``converted.qseg_convert`` says which layers became
    integer convs. Its outputs equal the prepared model's in eval mode without
    gradients (``torch.no_grad()``: validation, inference), where the prepared layers
    compute their folds as ``convert`` freezes them (``qseg/accumulator.py``); with
    gradients recorded the prepared model computes conv and BatchNorm apart, which
    rounds otherwise (an activation at a rounding tie can move by one step).

    A model prepared through torch.fx converts to a ``torch.fx.GraphModule``. A
    model prepared on the fallback (torch.export + module swap, for models FX
    cannot capture) converts to a copy of the eager model with the same changes
    made by module swap; its graph is read again with ``torch.export`` on
    ``example_inputs``, by default the ones ``prepare`` verified (kept on the model
    as ``qseg_example_inputs``, moved to its device).

    Raises:
        ExportError: the model was not returned by ``qseg.prepare``, a fallback
            model has no example inputs or cannot be exported on them,
            or a layer has non-finite weights (the message names the layer).

    Example:
        >>> import torch, qseg
        >>> from qseg.models import PaperUNet
        >>> q = qseg.prepare(PaperUNet(widths=(8, 16, 32, 32)), example_inputs=torch.randn(1, 1, 32, 32))
        >>> len(qseg.convert(q).qseg_convert.integer_layers)
        13
    """
    if not hasattr(qmodel, "qseg_report"):
        raise ExportError(f"convert takes a model returned by qseg.prepare; got {type(qmodel).__name__}")
    if isinstance(qmodel, fx.GraphModule):
        return convert_fx(qmodel)
    if example_inputs is None:
        example_inputs = getattr(qmodel, "qseg_example_inputs", None)
        if example_inputs is None:
            raise ExportError(
                f"{type(qmodel).__name__} was prepared on the torch.export + module swap fallback "
                "and carries no example inputs (a model saved and rebuilt without them): convert reads "
                "its graph again with torch.export, so pass the inputs: qseg.convert(qmodel, example_inputs=x)"
            )
        device = next((p.device for p in qmodel.parameters()), torch.device("cpu"))
        example_inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in example_inputs)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    return convert_swap(qmodel, inputs)
