"""Invalid constructor arguments raise QuantizerError naming the argument and its range."""

from __future__ import annotations

import pytest

from qseg import QsegError, QuantizerError
from qseg.quantizers import Binary, DoReFa, FixedPoint, PowerOfTwo, Ternary, TernaryTanh

BAD = [
    (lambda: FixedPoint(-1, 4), r"int_bits must be in \[0, 16\], got -1"),
    (lambda: FixedPoint(0, 0), r"int_bits \+ frac_bits must be in \[1, 16\], got 0 \+ 0"),
    (lambda: FixedPoint(9, 8), r"int_bits \+ frac_bits must be in \[1, 16\], got 9 \+ 8"),
    (lambda: FixedPoint(0, 17), r"frac_bits must be in \[0, 16\], got 17"),
    (lambda: FixedPoint(0, 4.0), r"frac_bits must be an integer in \[0, 16\], got 4.0"),
    (lambda: FixedPoint(True, 4), r"int_bits must be an integer"),
    (lambda: FixedPoint(0, 4, signed="yes"), r"signed must be True or False"),
    (lambda: FixedPoint(0, 4, overflow="clip"), r"overflow must be one of 'saturate', 'wrap'; got 'clip'"),
    (lambda: FixedPoint(0, 4, ste="none"), r"ste must be one of 'clipped', 'identity'"),
    (lambda: PowerOfTwo(1), r"bits must be in \[2, 16\], got 1"),
    (lambda: PowerOfTwo(17), r"bits must be in \[2, 16\], got 17"),
    (lambda: DoReFa(0), r"bits must be in \[1, 16\], got 0"),
    (lambda: DoReFa(32), r"bits must be in \[1, 16\], got 32"),
    (lambda: Binary(scale="max"), r"scale must be one of 'none', 'mean'; got 'max'"),
    (lambda: Ternary(channel_axis=-1), r"channel_axis must be in \[0, 7\], got -1"),
    (lambda: Ternary(channel_axis="0"), r"channel_axis must be an integer"),
    (lambda: TernaryTanh(beta_start=0), r"beta_start must be a number in \(0, 1e4\), got 0"),
    (lambda: TernaryTanh(beta_end=float("nan")), r"beta_end must be a number"),
]


@pytest.mark.parametrize(("build", "message"), BAD, ids=[m for _, m in BAD])
def test_invalid_argument_names_itself(build, message):
    with pytest.raises(QuantizerError, match=message) as info:
        build()
    assert isinstance(info.value, QsegError) and isinstance(info.value, ValueError)


def test_binary_has_no_fraction_bits():
    # a binary quantizer takes no bit widths at all: a stray keyword is a TypeError from Python
    with pytest.raises(TypeError):
        Binary(frac_bits=2)
