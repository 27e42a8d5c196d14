"""Graph rewrites, one per module, each ``GraphModule -> GraphModule``.

Every pass copies its input and returns the rewritten copy (``inplace=True``
rewrites the input itself, for callers that own it), so each can be run and tested alone: ``strip_dropout``, ``quantize_weights``, ``insert_act_quant``, ``rescale``.
``mark_overwritable_inputs`` and ``absorb_relus`` change no node: they tell the activation
quantizers whose input nothing else reads that they may compute in its buffer, and those
read by a ReLU alone that they may give its gradient (the ReLU then passes their output on).
"""

from qseg.passes.absorb_relu import absorb_relus
from qseg.passes.insert_act_quant import insert_act_quant
from qseg.passes.overwrite_inputs import mark_overwritable_inputs
from qseg.passes.quantize_weights import quantize_weights
from qseg.passes.rescale import RescalePlan, plan_rescale, rescale
from qseg.passes.strip_dropout import dropout_names, strip_dropout

__all__ = [
    "RescalePlan",
    "absorb_relus",
    "dropout_names",
    "insert_act_quant",
    "mark_overwritable_inputs",
    "plan_rescale",
    "quantize_weights",
    "rescale",
    "strip_dropout",
]
