"""The quantizers of both papers, one module per family, and the kinds recipes name them by.

Each is an ``nn.Module`` with a straight-through backward, a ``bits`` property
that counts every stored bit (sign included) and ``spec(x)``, the integer grid
the exporters use (``None`` for a non-uniform grid). Each module registers its
classes as recipe kinds (:func:`register_kind`, in :mod:`qseg.quantizers.registry`).
"""

# isort: off
# the modules register their kinds on import, in this order, which is the order
# recipe errors list the kinds in
from qseg.quantizers.base import Quantizer, QuantSpec
from qseg.quantizers.registry import QuantizerKind, get_kind, kind_names, register_kind, unregister_kind
from qseg.quantizers.fixed_point import FixedPoint
from qseg.quantizers.power_of_two import PowerOfTwo
from qseg.quantizers.uniform import Uniform
from qseg.quantizers.binary import Binary
from qseg.quantizers.dorefa import DoReFa
from qseg.quantizers.ternary import Ternary, TernaryTanh

# isort: on

__all__ = [
    "Binary",
    "DoReFa",
    "FixedPoint",
    "PowerOfTwo",
    "QuantSpec",
    "Quantizer",
    "QuantizerKind",
    "Ternary",
    "TernaryTanh",
    "Uniform",
    "get_kind",
    "kind_names",
    "register_kind",
    "unregister_kind",
]
