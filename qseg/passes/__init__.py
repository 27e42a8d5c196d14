"""Graph rewrites, one per module, each ``GraphModule -> GraphModule``.

Every pass copies its input and returns the rewritten copy (``inplace=True``
rewrites the input itself, for callers that own it), so each can be run and tested alone: ``strip_dropout``, ``quantize_weights``, ``insert_act_quant``, ``rescale``.
"""

from qseg.passes.insert_act_quant import insert_act_quant
from qseg.passes.quantize_weights import quantize_weights
from qseg.passes.rescale import RescalePlan, plan_rescale, rescale
from qseg.passes.strip_dropout import dropout_names, strip_dropout

__all__ = [
    "RescalePlan",
    "dropout_names",
    "insert_act_quant",
    "plan_rescale",
    "quantize_weights",
    "rescale",
    "strip_dropout",
]
