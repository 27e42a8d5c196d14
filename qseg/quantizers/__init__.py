"""The quantizers of both papers, one module per family.

Each is an ``nn.Module`` with a straight-through backward, a ``bits`` property
that counts every stored bit (sign included) and ``spec(x)``, the integer grid
the exporters use (``None`` for a non-uniform grid).
"""

from qseg.quantizers.base import Quantizer, QuantSpec
from qseg.quantizers.binary import Binary
from qseg.quantizers.dorefa import DoReFa
from qseg.quantizers.fixed_point import FixedPoint
from qseg.quantizers.power_of_two import PowerOfTwo
from qseg.quantizers.ternary import Ternary, TernaryTanh
from qseg.quantizers.uniform import Uniform

__all__ = [
    "Binary",
    "DoReFa",
    "FixedPoint",
    "PowerOfTwo",
    "QuantSpec",
    "Quantizer",
    "Ternary",
    "TernaryTanh",
    "Uniform",
]
