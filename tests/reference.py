"""Independent NumPy reference implementations of qseg's quantizer formulas.

Written from the formulas in ``/work/shared/PAPERS.md`` (paper A: AskariHemmat et al.
2019, paper B: Xu et al. 2018, and the methods they use: INQ, DoReFa, TWN, BNN,
TernaryNet), not from qseg's code, so that the tests in
``tests/quantizers/test_reference.py`` compare two implementations written apart.

Conventions:

- Pure NumPy, no torch and no qseg. Inputs are NumPy arrays (usually float32, as the
  tensors qseg sees); results are float64 unless a function says otherwise.
- ``np.round`` rounds half to even, as ``torch.round`` and ONNX ``QuantizeLinear`` do.
- NaN handling follows qseg's documentation where the formula alone does not decide it
  (each such case is marked "qseg doc:").
"""

import math

import numpy as np

__all__ = [
    "anneal_beta",
    "binary_mean",
    "binary_sign",
    "dorefa",
    "dorefa_codes",
    "dorefa_scaled",
    "fixed_point_max_code",
    "fixed_point_saturate",
    "fixed_point_wrap",
    "inq_bounds",
    "inq_grid",
    "inq_n1",
    "power_of_two",
    "power_of_two_fixed",
    "ternary",
    "ternary_tanh_hard",
    "ternary_tanh_soft",
    "uniform",
    "uniform_lsq_scale_grad",
    "uniform_range",
]


# --------------------------------------------------------------------------------------
# Fixed point (paper A)
# --------------------------------------------------------------------------------------


def fixed_point_max_code(int_bits: int, frac_bits: int) -> int:
    """Largest code magnitude of ``Q i.f``: ``2^(i+f) - 1`` (magnitude ``2^i - 2^-f``).

    >>> fixed_point_max_code(0, 4), fixed_point_max_code(6, 0)
    (15, 63)
    """
    return 2 ** (int_bits + frac_bits) - 1


def fixed_point_saturate(x: np.ndarray, int_bits: int, frac_bits: int, signed: bool = True) -> np.ndarray:
    """qseg's ``FixedPoint(i, f, signed, overflow="saturate")``, in float64.

    PAPERS.md, **qseg:** decision for paper A: step ``2^-f``, round to nearest with ties
    to even, magnitude saturating at ``2^i - 2^-f``, sign-magnitude (symmetric grid);
    unsigned clamps negatives to 0::

        code = clamp(round_half_even(x * 2^f), -(2^(i+f) - 1), 2^(i+f) - 1)   (signed)
        code = clamp(round_half_even(x * 2^f), 0, 2^(i+f) - 1)                (unsigned)
        out  = code * 2^-f

    ``x * 2^f`` is exact in float64 for any float32 ``x``, so the float64 result cast to
    float32 is the correctly rounded grid value. NaN stays NaN (``np.clip`` keeps it).

    >>> fixed_point_saturate(np.array([0.30, -0.97, 1.30, 0.03125]), 0, 4).tolist()
    [0.3125, -0.9375, 0.9375, 0.0]
    >>> fixed_point_saturate(np.array([-3.0, 62.5, 63.5, 100.0]), 6, 0, signed=False).tolist()
    [0.0, 62.0, 63.0, 63.0]
    """
    x = np.asarray(x, dtype=np.float64)
    m = fixed_point_max_code(int_bits, frac_bits)
    code = np.round(x * 2.0**frac_bits)
    code = np.clip(code, -m if signed else 0, m)
    return code * 2.0**-frac_bits


def _quantize_published(v: np.ndarray, n: int) -> np.ndarray:
    """Paper A's ``quantize(x, n) = round(clamp(x, n) * 2^n) / 2^n`` in float32 arithmetic,
    with ``clamp(x, n) = min(max(x, 0), 2^n - 1)``."""
    v = np.asarray(v, dtype=np.float32)
    c = np.minimum(np.maximum(v, np.float32(0.0)), np.float32(2.0**n - 1.0))
    scale = np.float32(2.0**n)
    return np.round(c * scale) / scale


def fixed_point_wrap(x: np.ndarray, int_bits: int, frac_bits: int, signed: bool = True) -> np.ndarray:
    """Paper A's published fixed-point formula (qseg's ``overflow="wrap"``), in float32.

    PAPERS.md, paper A::

        quantize(x, n) = round(clamp(x, n) * 2^n) / 2^n,  clamp(x, n) = min(max(x, 0), 2^n - 1)
        x_i = floor(|x|),  x_f = |x| - floor(|x|)
        out = sign(x) * quantize(x_i, i) + sign(x) * quantize(x_f, f)

    With ``signed=False`` negatives are first clamped to 0 (PAPERS.md, **qseg:**).

    Computed with float32 operations, as qseg does on float32 tensors. (For float32
    ``a >= 0``, ``a - floor(a)`` is exact in float32 anyway, by Sterbenz's lemma, and every
    later product/sum stays exact for ``i + f <= 16``, so float64 would give the same
    result; float32 is used so that the reference mirrors the documented arithmetic.)
    Known values at Q0.4: 1.3 -> 0.3125 (wrap), 0.97 -> 1.0 (no carry).

    >>> fixed_point_wrap(np.array([1.3, 0.97, -0.3], dtype=np.float32), 0, 4).tolist()
    [0.3125, 1.0, -0.3125]
    """
    x = np.asarray(x, dtype=np.float32)
    if not signed:
        x = np.maximum(x, np.float32(0.0))
    s = np.sign(x).astype(np.float32)
    a = np.abs(x)
    xi = np.floor(a)
    xf = a - xi
    out = s * _quantize_published(xi, int_bits) + s * _quantize_published(xf, frac_bits)
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------
# INQ power-of-two grid (paper B)
# --------------------------------------------------------------------------------------


def inq_n1(s: float) -> int:
    """INQ's ``n1 = floor(log2(4 s / 3))`` for ``s = max|W| > 0``, by exact comparisons.

    PAPERS.md, paper B: ``n1 = floor(log2(4s/3))``, i.e. the integer ``p`` with
    ``3 * 2^(p-2) <= s < 3 * 2^(p-1)``. No logarithm is rounded: a starting guess from
    the binary exponent is corrected with exact float64 comparisons (``3 * 2^k`` is exact).

    >>> inq_n1(0.75), inq_n1(float(np.nextafter(0.75, 0))), inq_n1(1.0), inq_n1(1.5)
    (0, -1, 0, 1)
    """
    s = float(s)
    if not (s > 0.0 and math.isfinite(s)):
        raise ValueError(f"n1 needs a finite s > 0, got {s}")
    _, e = math.frexp(s)  # s = m * 2^e, m in [0.5, 1)
    p = e
    while not math.ldexp(3.0, p - 2) <= s:
        p -= 1
    while not s < math.ldexp(3.0, p - 1):
        p += 1
    assert math.ldexp(3.0, p - 2) <= s < math.ldexp(3.0, p - 1)
    return p


def inq_bounds(s: float, bits: int) -> tuple[int, int]:
    """``(n1, n2)`` of INQ with ``b`` bits: ``n2 = n1 + 1 - 2^(b-1)/2 = n1 + 1 - 2^(b-2)``.

    >>> inq_bounds(0.9, 5)
    (0, -7)
    """
    n1 = inq_n1(s)
    return n1, n1 + 1 - 2 ** (bits - 2)


def inq_grid(n1: int, n2: int) -> np.ndarray:
    """Non-negative magnitudes of ``P = {0} U {+-2^p : n2 <= p <= n1}``, ascending, float64.

    >>> inq_grid(0, -2).tolist()
    [0.0, 0.25, 0.5, 1.0]
    """
    return np.array([0.0] + [math.ldexp(1.0, p) for p in range(n2, n1 + 1)], dtype=np.float64)


def power_of_two_fixed(x: np.ndarray, n1: int, n2: int, chunk: int = 4096) -> np.ndarray:
    """Nearest value of ``P = {0} U {+-2^p : n2 <= p <= n1}``, ties to the larger magnitude.

    PAPERS.md, **qseg:** decision for INQ: nearest value of ``P_l`` with saturation at
    ``2^n1`` (so ``|x| > 2^n1``, infinities included, give ``+-2^n1``); 0 when
    ``|x| < 2^(n2-1)``. Implemented as a brute-force search over the explicit grid
    (``argmin |x - g|``, the last minimum wins, i.e. the larger magnitude), deliberately
    unlike a logarithm-based rounding. qseg doc: NaN stays NaN where it is. Float64 out
    (grid values outside float32's range round to 0 or inf when cast).

    >>> power_of_two_fixed(np.array([0.9, 0.3, -0.1, 0.001, 0.75, -7.0]), 0, -7).tolist()
    [1.0, 0.25, -0.125, 0.0, 1.0, -1.0]
    """
    x = np.asarray(x, dtype=np.float64)
    flat = x.reshape(-1)
    grid = inq_grid(n1, n2)
    rev = grid[::-1]  # descending: argmin returns the first minimum = the larger magnitude
    out = np.empty_like(flat)
    for start in range(0, flat.size, chunk):
        a = np.abs(flat[start : start + chunk])
        with np.errstate(invalid="ignore"):
            d = np.abs(a[:, None] - rev[None, :])
        d = np.where(np.isnan(d), np.inf, d)  # NaN rows are overwritten below
        mag = rev[np.argmin(d, axis=1)]
        out[start : start + chunk] = np.where(np.signbit(flat[start : start + chunk]), -mag, mag)
    out[np.isnan(flat)] = np.nan
    return out.reshape(x.shape)


def power_of_two(x: np.ndarray, bits: int) -> np.ndarray:
    """INQ quantization with bounds from the input itself: ``s = max|x|``, then
    :func:`inq_bounds` and :func:`power_of_two_fixed`.

    qseg doc: a NaN or infinity in the input leaves no grid, the whole output is NaN; an
    all-zero input stays zero.

    >>> power_of_two(np.array([0.9, 0.3, -0.1, 0.001]), 5).tolist()
    [1.0, 0.25, -0.125, 0.0]
    """
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        return np.full_like(x, np.nan)
    s = float(np.max(np.abs(x))) if x.size else 0.0
    if s == 0.0:
        return np.zeros_like(x)
    n1, n2 = inq_bounds(s, bits)
    return power_of_two_fixed(x, n1, n2)


# --------------------------------------------------------------------------------------
# Binary (BNN, DoReFa 1 bit)
# --------------------------------------------------------------------------------------


def binary_sign(x: np.ndarray) -> np.ndarray:
    """BNN's ``sign(x)`` with ``sign(0) = +1`` (PAPERS.md, paper A's BNN); ``-0.0 -> +1``.

    NaN stays NaN (qseg doc).

    >>> binary_sign(np.array([0.3, -2.0, 0.0, -0.0])).tolist()
    [1.0, -1.0, 1.0, 1.0]
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.where(x >= 0.0, 1.0, -1.0)
    out[np.isnan(x)] = np.nan
    return out


def binary_mean(x: np.ndarray) -> np.ndarray:
    """DoReFa's 1-bit weight ``sign(w) * E|w|`` (PAPERS.md, paper B, ``k = 1``), with the
    mean over the whole tensor and BNN's ``sign(0) = +1``.

    A NaN anywhere makes the mean, hence every output, NaN.

    >>> binary_mean(np.array([0.5, -1.0, 1.5])).tolist()
    [1.0, -1.0, 1.0]
    """
    x = np.asarray(x, dtype=np.float64)
    return binary_sign(x) * np.mean(np.abs(x))


# --------------------------------------------------------------------------------------
# DoReFa k-bit weights (paper B)
# --------------------------------------------------------------------------------------


def dorefa_scaled(w: np.ndarray, bits: int) -> np.ndarray:
    """``w' (2^k - 1)`` before rounding, with ``w' = tanh(w) / (2 max|tanh(w)|) + 0.5``
    (PAPERS.md, paper B, DoReFa weights). Float64."""
    w = np.asarray(w, dtype=np.float64)
    t = np.tanh(w)
    return (t / (2.0 * np.max(np.abs(t))) + 0.5) * (2**bits - 1)


def dorefa_codes(w: np.ndarray, bits: int) -> np.ndarray:
    """Integer level ``j = round_half_even(w' (2^k - 1))`` in ``[0, 2^k - 1]`` (float64)."""
    return np.round(dorefa_scaled(w, bits))


def dorefa(w: np.ndarray, bits: int) -> np.ndarray:
    """DoReFa's ``k``-bit weight: ``q = j / (2^k - 1)``, output ``2q - 1`` (PAPERS.md).

    >>> dorefa(np.array([-1.0, -0.1, 0.1, 1.0]), 2).round(4).tolist()
    [-1.0, -0.3333, 0.3333, 1.0]
    """
    n = 2**bits - 1
    return 2.0 * dorefa_codes(w, bits) / n - 1.0


# --------------------------------------------------------------------------------------
# Ternary (TWN weights, TernaryNet activation)
# --------------------------------------------------------------------------------------


def _ternary_rows(rows: np.ndarray) -> np.ndarray:
    """TWN on each row of a 2-d float64 array."""
    out = np.empty_like(rows)
    for r, w in enumerate(rows):
        if not np.all(np.isfinite(w)):
            out[r] = np.nan  # qseg doc: a NaN or infinity in a slice makes that slice NaN
            continue
        a = np.abs(w)
        delta = 0.7 * np.mean(a)
        keep = a > delta
        alpha = np.mean(a[keep]) if np.any(keep) else 0.0
        out[r] = alpha * np.sign(w) * keep
    return out


def ternary(w: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
    """TWN (PAPERS.md, paper B): ``delta = 0.7 E|w|``, ``alpha = mean(|w| : |w| > delta)``
    (0 when no entry exceeds ``delta``), ``out = alpha * sign(w) * 1[|w| > delta]``.

    Per tensor (``channel_axis=None``) or with separate statistics for each slice along
    ``channel_axis`` (per output filter, paper A / TernaryNet). Float64.

    >>> ternary(np.array([0.9, -0.6, 0.1, -0.05])).tolist()
    [0.75, -0.75, 0.0, -0.0]
    """
    w = np.asarray(w, dtype=np.float64)
    if channel_axis is None:
        return _ternary_rows(w.reshape(1, -1)).reshape(w.shape)
    moved = np.moveaxis(w, channel_axis, 0)
    rows = _ternary_rows(moved.reshape(moved.shape[0], -1)).reshape(moved.shape)
    return np.moveaxis(rows, 0, channel_axis)


def anneal_beta(beta_start: float, beta_end: float, progress: float) -> float:
    """TernaryNet's annealing of ``b`` (3 -> 8 over training): linear in the progress."""
    return beta_start + (beta_end - beta_start) * progress


def ternary_tanh_soft(x: np.ndarray, beta: float) -> np.ndarray:
    """TernaryNet's training activation (PAPERS.md, paper A):
    ``0.5 tanh(2bx - b) - 0.5 tanh(-2bx - b)``. Float64.

    >>> round(float(ternary_tanh_soft(np.array(0.0), 3.0)), 12)
    0.0
    """
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * np.tanh(2.0 * beta * x - beta) - 0.5 * np.tanh(-2.0 * beta * x - beta)


def ternary_tanh_hard(x: np.ndarray) -> np.ndarray:
    """TernaryNet's inference activation: ``sign(x) * 1[|x| > 0.5]``; NaN stays NaN.

    >>> ternary_tanh_hard(np.array([-0.7, 0.2, 0.5, 0.51])).tolist()
    [-1.0, 0.0, 0.0, 1.0]
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.sign(x) * (np.abs(x) > 0.5)
    out[np.isnan(x)] = np.nan
    return out


# --------------------------------------------------------------------------------------
# Uniform integer grids with a data-derived scale (int8; LSQ, Esser et al. 2020)
# --------------------------------------------------------------------------------------


def uniform_range(bits: int, mode: str) -> tuple[int, int]:
    """Codes of a ``bits``-bit grid: symmetric narrow range ``[-(2^(b-1)-1), 2^(b-1)-1]``,
    unsigned and asymmetric ``[0, 2^b - 1]``.

    >>> uniform_range(8, "symmetric"), uniform_range(8, "unsigned")
    ((-127, 127), (0, 255))
    """
    if mode == "symmetric":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def uniform(x: np.ndarray, scale, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """``(clip(round(x / s) + z, qmin, qmax) - z) * s``, ties to even; ``scale`` a number
    or an array broadcasting against ``x``.

    >>> uniform(np.array([0.26, -1.0, 9.0]), 0.1, 0, -7, 7).round(6).tolist()
    [0.3, -0.7, 0.7]
    """
    x = np.asarray(x, dtype=np.float64)
    s = np.asarray(scale, dtype=np.float64)
    code = np.clip(np.round(x / s) + zero_point, qmin, qmax)
    return (code - zero_point) * s


def uniform_lsq_scale_grad(x: np.ndarray, scale: float, qmin: int, qmax: int) -> float:
    """LSQ's gradient of ``sum(quantize(x))`` with respect to the step ``s``, before the
    gradient scale: ``round(x/s) - x/s`` inside the range, ``qmin`` below, ``qmax`` above.

    >>> round(uniform_lsq_scale_grad(np.array([0.26, -1.0, 9.0]), 0.1, -7, 7), 9)
    0.4
    """
    v = np.asarray(x, dtype=np.float64) / scale
    inside = (v > qmin) & (v < qmax)
    return float(np.where(inside, np.round(v) - v, np.where(v <= qmin, qmin, qmax)).sum())
