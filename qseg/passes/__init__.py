"""Graph rewrites, one per module, each ``GraphModule -> GraphModule``.

Every pass copies its input and returns the rewritten copy (``inplace=True``
rewrites the input itself, for callers that own it), so each can be run and tested alone: ``strip_dropout``, ``quantize_weights``, ``insert_act_quant``.
"""

from qseg.passes.insert_act_quant import insert_act_quant
from qseg.passes.quantize_weights import quantize_weights
from qseg.passes.strip_dropout import dropout_names, strip_dropout

__all__ = ["dropout_names", "insert_act_quant", "quantize_weights", "strip_dropout"]
