"""qseg's quantizers against the independent NumPy reference in ``tests/reference.py``.

Every quantizer runs on float32 torch tensors built from (a) seeded random inputs of
several scales and (b) adversarial inputs: exact ties, grid bounds, neighbours of both
(``np.nextafter``), signed zeros, huge, tiny and subnormal values, infinities and NaN.

"Exact" below means equal as numbers: NaN where the reference has NaN, the same value
elsewhere. The sign of a zero output (``-0.0`` vs ``+0.0``) is not asserted: neither
PAPERS.md nor the formulas specify it.
"""

import math

import numpy as np
import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qseg.quantizers import Binary, DoReFa, FixedPoint, PowerOfTwo, Ternary, TernaryTanh

F32 = np.float32
TINY = [1e-30, 1e-38, 1e-40, 1e-44, float(np.nextafter(F32(0), F32(1)))]  # the last two are subnormal
HUGE = [1e30, float(np.finfo(np.float32).max)]
SEEDS = [0, 1, 2]
# Results that are float32 subnormals carry few significant bits, so relative tolerances
# mean nothing there: allow a few units of the smallest subnormal on top of rtol.
SUB_ATOL = 4 * 2.0**-149
SCALES = [1e-3, 0.1, 1.0, 10.0, 1e3]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def f32(values) -> np.ndarray:
    """Float32 array of ``values`` (constructed ties are exact in float32 by design; other
    probes such as 1e-30 are simply rounded to float32, which is then the input)."""
    a64 = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):
        a = a64.astype(np.float32)
    assert np.array_equal(np.isfinite(a), np.isfinite(a64)), "value overflows float32"
    return a


def both_signs(values) -> list[float]:
    return [v for x in values for v in (x, -x)]


def run(q, x: np.ndarray) -> np.ndarray:
    """``q`` applied to a float32 tensor holding ``x``; float32 NumPy out."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    with torch.no_grad():
        y = q(t)
    assert y.dtype == torch.float32
    assert tuple(y.shape) == x.shape
    return y.numpy()


def assert_exact(x: np.ndarray, got: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    """NaN exactly where ``expected`` is NaN, equal values elsewhere (``-0.0 == +0.0``)."""
    expected = np.asarray(expected)
    ok = np.where(np.isnan(expected), np.isnan(got), got == expected)
    if not ok.all():
        bad = np.flatnonzero(~ok.reshape(-1))
        rows = [
            f"  x={x.reshape(-1)[i]!r} expected={expected.reshape(-1)[i]!r} got={got.reshape(-1)[i]!r}"
            for i in bad[:10]
        ]
        pytest.fail(f"{what}: {bad.size} of {ok.size} differ\n" + "\n".join(rows))


def assert_close(x, got, expected, rtol=0.0, atol=0.0, what="") -> None:
    """NaN exactly where ``expected`` is NaN, ``|got - expected| <= atol + rtol |expected|``."""
    expected = np.asarray(expected, dtype=np.float64)
    got64 = got.astype(np.float64)
    with np.errstate(invalid="ignore"):
        close = np.abs(got64 - expected) <= atol + rtol * np.abs(expected)
    ok = np.where(np.isnan(expected), np.isnan(got64), close | (got64 == expected))
    if not ok.all():
        bad = np.flatnonzero(~ok.reshape(-1))
        rows = [
            f"  x={x.reshape(-1)[i]!r} expected={expected.reshape(-1)[i]!r} got={got.reshape(-1)[i]!r}"
            for i in bad[:10]
        ]
        pytest.fail(f"{what}: {bad.size} of {ok.size} differ\n" + "\n".join(rows))


def random_input(seed: int, scale: float, shape=(4096,)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# --------------------------------------------------------------------------------------
# the reference itself, on values fixed by the papers
# --------------------------------------------------------------------------------------


def test_reference_known_values():
    """The reference reproduces the values PAPERS.md states (guards the reference itself)."""
    # paper A's defects of the published formula at Q0.4
    assert ref.fixed_point_wrap(f32([1.3, 0.97]), 0, 4).tolist() == [0.3125, 1.0]
    # qseg's saturating Q0.4 and the unsigned Q6.0 quantized ReLU with levels 0..63
    assert ref.fixed_point_saturate(f32([1.3, 0.97, -0.97]), 0, 4).tolist() == [0.9375, 0.9375, -0.9375]
    levels = ref.fixed_point_saturate(np.arange(-5.0, 80.0, 0.25), 6, 0, signed=False)
    assert sorted(set(levels.tolist())) == [float(v) for v in range(64)]
    # INQ: n1 is the p with 3*2^(p-2) <= s < 3*2^(p-1); 2^(b-1) + 1 grid values
    for p in range(-140, 120, 7):
        lo = math.ldexp(3.0, p - 2)
        assert ref.inq_n1(lo) == p
        assert ref.inq_n1(float(np.nextafter(lo, 0.0))) == p - 1
        assert ref.inq_n1(float(np.nextafter(math.ldexp(3.0, p - 1), 0.0))) == p
    for b in (2, 3, 5, 7):
        n1, n2 = ref.inq_bounds(0.9, b)
        assert 2 * (ref.inq_grid(n1, n2).size - 1) + 1 == 2 ** (b - 1) + 1
    # ternary_tanh approaches the hard ternary function for large b
    x = np.array([-0.9, -0.2, 0.0, 0.3, 0.8])
    np.testing.assert_allclose(ref.ternary_tanh_soft(x, 200.0), ref.ternary_tanh_hard(x), atol=1e-12)


# --------------------------------------------------------------------------------------
# FixedPoint, overflow="saturate"
# --------------------------------------------------------------------------------------

FP_CONFIGS = [
    (0, 4, True),  # paper A's Qw0.4
    (0, 4, False),
    (6, 0, False),  # paper A's Qa6.0 (quantized ReLU)
    (8, 8, True),
    (8, 8, False),
    (8, 0, True),
    (0, 8, True),
    (4, 2, True),
    (2, 6, False),
    (0, 1, True),
    (1, 0, True),
    (16, 0, True),
    (0, 16, True),
    (3, 13, False),
]


def fixed_point_adversarial(i: int, f: int) -> np.ndarray:
    """Grid values, midpoints (ties), saturation bounds and their float32 neighbours."""
    step = 2.0**-f
    m = ref.fixed_point_max_code(i, f)
    codes = sorted({0, 1, 2, 3, 4, 5, m // 2 - 1, m // 2, m // 2 + 1, m - 3, m - 2, m - 1, m, m + 1, m + 2})
    base = [c * step for c in codes if c >= 0]  # grid values (and beyond the grid)
    mids = [(c + 0.5) * step for c in codes if c >= 0]  # exact ties, incl. the one at the bound
    vals = base + mids
    near = [float(np.nextafter(F32(v), F32(d))) for v in vals for d in (-np.inf, np.inf)]
    extra = [0.3, 0.97, 1.3, 2.0**i, 2.0**i - step / 2, 2.0**i + step / 2]
    out = both_signs(vals + near + extra + HUGE + TINY + [np.inf])
    return f32([*out, 0.0, -0.0, np.nan])


@pytest.mark.parametrize(("i", "f", "signed"), FP_CONFIGS)
@pytest.mark.parametrize("seed", SEEDS)
def test_fixed_point_saturate_random(i, f, signed, seed):
    """Seeded normals at scales well inside, around and far beyond the grid: bit-equal."""
    q = FixedPoint(i, f, signed=signed)
    for scale in [*SCALES, 2.0**i]:
        x = random_input(seed, scale)
        expected = ref.fixed_point_saturate(x, i, f, signed).astype(np.float32)
        assert_exact(x, run(q, x), expected, f"Q{i}.{f} signed={signed} scale={scale}")


@pytest.mark.parametrize(("i", "f", "signed"), FP_CONFIGS)
def test_fixed_point_saturate_adversarial(i, f, signed):
    """Ties (half to even), bounds +-(2^i - 2^-f) and the tie just past them, nextafter
    neighbours, +-0, huge/inf (saturate), tiny/subnormal (-> 0), NaN (-> NaN)."""
    x = fixed_point_adversarial(i, f)
    expected = ref.fixed_point_saturate(x, i, f, signed).astype(np.float32)
    assert_exact(x, run(FixedPoint(i, f, signed=signed), x), expected, f"Q{i}.{f} signed={signed}")


@settings(max_examples=150, derandomize=True, deadline=None, database=None)
@given(
    config=st.sampled_from(FP_CONFIGS),
    values=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=32),
)
def test_fixed_point_saturate_any_float32(config, values):
    """Any float32 at all (hypothesis, derandomized so the run is deterministic)."""
    i, f, signed = config
    x = np.array(values, dtype=np.float32)
    expected = ref.fixed_point_saturate(x, i, f, signed).astype(np.float32)
    assert_exact(x, run(FixedPoint(i, f, signed=signed), x), expected, f"Q{i}.{f} signed={signed}")


# --------------------------------------------------------------------------------------
# FixedPoint, overflow="wrap" (paper A's published formula)
# --------------------------------------------------------------------------------------


def test_fixed_point_wrap_known_values():
    """PAPERS.md: at Q0.4, 1.3 -> 0.3125 (wraps) and 0.97 -> 1.0 (no carry)."""
    x = f32([1.3, 0.97, -1.3, -0.97])
    got = run(FixedPoint(0, 4, overflow="wrap"), x)
    assert_exact(x, got, f32([0.3125, 1.0, -0.3125, -1.0]), "Q0.4 wrap")


@pytest.mark.parametrize(("i", "f", "signed"), FP_CONFIGS)
@pytest.mark.parametrize("seed", SEEDS)
def test_fixed_point_wrap_random(i, f, signed, seed):
    """Seeded normals with |x| < 1000 (the formula's float32 arithmetic is exact there)."""
    q = FixedPoint(i, f, signed=signed, overflow="wrap")
    for scale in [1e-3, 0.1, 1.0, 10.0, 200.0]:
        x = np.clip(random_input(seed, scale), F32(-999.0), F32(999.0))
        expected = ref.fixed_point_wrap(x, i, f, signed)
        assert_exact(x, run(q, x), expected, f"Q{i}.{f} wrap signed={signed} scale={scale}")


@pytest.mark.parametrize(("i", "f", "signed"), FP_CONFIGS)
def test_fixed_point_wrap_adversarial(i, f, signed):
    """Ties, integer/fraction boundaries, wrap-around past 2^i, +-0, huge, tiny, NaN.
    (Infinities are left out: the published formula computes ``inf - floor(inf)``.)"""
    x = fixed_point_adversarial(i, f)
    x = x[~np.isinf(x)]
    fracs = [k * 2.0**-f for k in range(2 ** min(f, 4))] + [1.0 - 2.0 ** -(f + 1), 0.97, 0.3]
    ints = [0.0, 1.0, 2.0**i - 1, 2.0**i, 2.0**i + 1, 500.0]
    mixed = [a + b for a in ints for b in fracs if a + b < 1000]
    near = [float(np.nextafter(F32(v), F32(d))) for v in mixed for d in (-np.inf, np.inf)]
    x = np.concatenate([x, f32(both_signs(mixed + near))])
    expected = ref.fixed_point_wrap(x, i, f, signed)
    got = run(FixedPoint(i, f, signed=signed, overflow="wrap"), x)
    assert_exact(x, got, expected, f"Q{i}.{f} wrap signed={signed}")


# --------------------------------------------------------------------------------------
# PowerOfTwo (INQ)
# --------------------------------------------------------------------------------------

P2_BITS = [2, 3, 5, 7, 8]


def power_of_two_probes(n1: int, n2: int, limit: float) -> list[float]:
    """Grid values, ties between neighbours (3*2^(p-1)), the tie 2^(n2-1) between 0 and
    2^n2, and their float32 neighbours, all with magnitude <= limit, float32-exact."""
    vals = [math.ldexp(1.0, p) for p in range(n2 - 2, n1 + 2)]
    vals += [math.ldexp(3.0, p - 1) for p in range(n2 - 2, n1 + 1)]
    vals += [math.ldexp(1.0, n2 - 1)]
    vals = [v for v in vals if 0 < v < 3.4e38 and F32(v) == v]
    vals += [float(np.nextafter(F32(v), F32(d))) for v in vals for d in (0.0, np.inf)]
    return [v for v in vals if 0 < v <= limit and np.isfinite(F32(v))]


@pytest.mark.parametrize("bits", P2_BITS)
@pytest.mark.parametrize("seed", SEEDS)
def test_power_of_two_random(bits, seed):
    """Bounds from the input (s = max|x|) and nearest-grid rounding, seeded normals."""
    q = PowerOfTwo(bits=bits)
    for scale in [*SCALES, 1e-20, 1e20]:
        x = random_input(seed, scale, shape=(64, 32))
        n1, n2 = ref.inq_bounds(float(np.max(np.abs(x))), bits)
        assert q.bounds(torch.from_numpy(x)) == (n1, n2)
        expected = ref.power_of_two(x, bits).astype(np.float32)
        assert_exact(x, run(q, x), expected, f"PowerOfTwo({bits}) scale={scale}")


@pytest.mark.parametrize("bits", [2, 5])
def test_power_of_two_n1_at_interval_bounds(bits):
    """n1 is the p with 3*2^(p-2) <= s < 3*2^(p-1), exactly, over float32's whole range:
    s on the lower end (where s itself is a tie and goes up to 2^p) and one ulp below
    either end."""
    q = PowerOfTwo(bits=bits)
    for p in range(-147, 128):
        lo = math.ldexp(3.0, p - 2)
        for s, n1 in [
            (lo, p),
            (float(np.nextafter(F32(lo), F32(0))), p - 1),
            (float(np.nextafter(F32(math.ldexp(3.0, p - 1)), F32(0))), p),
        ]:
            x = f32([s, -s])
            assert ref.inq_n1(s) == n1
            assert q.bounds(torch.from_numpy(x)) == ref.inq_bounds(s, bits), f"s={s!r}"
            expected = ref.power_of_two(x, bits).astype(np.float32)
            assert_exact(x, run(q, x), expected, f"PowerOfTwo({bits}) s={s!r}")


ANCHORS = [
    1.0,
    0.75,  # s exactly 3*2^(n1-2): n1 = 0, s rounds (tie) up to 1
    float(np.nextafter(F32(0.75), F32(0))),  # n1 = -1
    float(np.nextafter(F32(1.5), F32(0))),  # n1 = 0, s -> 1
    1.5,  # n1 = 1, s -> 2
    0.9,
    3.0 * 2.0**-10,
    1e-5,
    1e30,
    1e-38,
    1e-40,  # subnormal s: most of the grid underflows float32
    2.0**-149,  # the smallest subnormal
    2.0**100,
]


@pytest.mark.parametrize("bits", P2_BITS)
@pytest.mark.parametrize("anchor", ANCHORS)
def test_power_of_two_adversarial(bits, anchor):
    """Bounds from the input; exact ties (to the larger magnitude), the 0 / 2^n2 tie,
    nextafter neighbours, s at an n1 interval boundary, +-0, tiny and huge tensors."""
    s = float(F32(anchor))
    n1, n2 = ref.inq_bounds(s, bits)
    rng = np.random.default_rng(7)
    probes = power_of_two_probes(n1, n2, s) + (rng.uniform(0, s, 64)).tolist() + TINY
    probes = sorted({float(F32(p)) for p in probes} - {0.0})
    # +-0 with a grid reaching below float32's subnormals: test_power_of_two_zero_stays_zero_...
    zeros = [0.0, -0.0] if n2 - 1 >= -149 else []
    x = f32([s, -s, *zeros, *both_signs([p for p in probes if p <= s])])
    q = PowerOfTwo(bits=bits)
    assert q.bounds(torch.from_numpy(x)) == (n1, n2)
    expected = ref.power_of_two(x, bits).astype(np.float32)
    assert_exact(x, run(q, x), expected, f"PowerOfTwo({bits}) s={s!r} (n1={n1}, n2={n2})")


@pytest.mark.parametrize("bits", P2_BITS)
@pytest.mark.parametrize("seed", SEEDS)
def test_power_of_two_fixed_bounds(bits, seed):
    """``fix_bounds(w)`` keeps (n1, n2) of ``w``; later inputs use them: |x| past the grid
    (and +-inf) saturate at +-2^n1, the tie 3*2^(n1-1) too, NaN stays NaN in place."""
    w = random_input(seed, 0.5, shape=(32, 16))
    n1, n2 = ref.inq_bounds(float(np.max(np.abs(w))), bits)
    q = PowerOfTwo(bits=bits)
    assert q.fix_bounds(torch.from_numpy(w)) == (n1, n2)
    assert_exact(w, run(q, w), ref.power_of_two_fixed(w, n1, n2).astype(np.float32), "the fixing tensor")

    probes = power_of_two_probes(n1, n2, math.ldexp(1.0, n1 + 3))
    x = np.concatenate(
        [
            random_input(seed + 100, 3.0, shape=(512,)),  # moves past the fixed grid
            f32(both_signs([*probes, math.ldexp(3.0, n1 - 1), *HUGE, *TINY, np.inf])),
            f32([0.0, -0.0, np.nan]),
        ]
    )
    assert q.bounds(torch.from_numpy(x)) == (n1, n2)
    expected = ref.power_of_two_fixed(x, n1, n2).astype(np.float32)
    assert_exact(x, run(q, x), expected, f"PowerOfTwo({bits}) fixed (n1={n1}, n2={n2})")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_power_of_two_nonfinite_bounds_from_input(bad):
    """qseg doc: with bounds from the input a NaN or infinity leaves no grid: all NaN;
    an all-zero input stays zero."""
    x = f32([0.5, -0.25, bad, 0.0])
    assert_exact(x, run(PowerOfTwo(bits=5), x), ref.power_of_two(x, 5).astype(np.float32), "non-finite")
    z = f32([0.0, -0.0, 0.0])
    assert_exact(z, run(PowerOfTwo(bits=5), z), np.zeros(3, dtype=np.float32), "all zero")


# --------------------------------------------------------------------------------------
# Binary
# --------------------------------------------------------------------------------------

BINARY_SPECIAL = f32(
    [0.0, -0.0, *both_signs([1.0, 0.5, 1e-45, 1e-40, 1e-30, 1e30, float(np.finfo(np.float32).max)])]
)


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_sign(seed):
    """BNN ``sign(x)`` with sign(+-0) = +1; seeded inputs, +-0, subnormal, huge, inf, NaN."""
    q = Binary(scale="none")
    for scale in SCALES:
        x = random_input(seed, scale)
        assert_exact(x, run(q, x), ref.binary_sign(x).astype(np.float32), f"Binary scale={scale}")
    x = np.concatenate([BINARY_SPECIAL, f32([np.inf, -np.inf, np.nan])])
    assert_exact(x, run(q, x), ref.binary_sign(x).astype(np.float32), "Binary special")


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_mean(seed):
    """``sign(x) * mean|x|`` over the whole tensor (rtol 1e-6: float32 vs float64 sums)."""
    q = Binary(scale="mean")
    for scale in SCALES:
        x = random_input(seed, scale, shape=(16, 8, 3, 3))
        assert_close(x, run(q, x), ref.binary_mean(x), rtol=1e-6, what=f"Binary mean scale={scale}")
    x = BINARY_SPECIAL[np.abs(BINARY_SPECIAL) < 1e31]  # float32 max: see test_means_near_float32_max
    assert_close(x, run(q, x), ref.binary_mean(x), rtol=1e-6, what="Binary mean special")
    x = f32([0.0, -0.0, 1e-45, 1e-40])  # subnormal mean, signed zeros -> +mean
    assert_close(x, run(q, x), ref.binary_mean(x), rtol=1e-6, atol=SUB_ATOL, what="Binary mean tiny")


def test_binary_mean_nan():
    """A NaN anywhere makes every output NaN (the mean is NaN)."""
    x = f32([0.5, np.nan, -1.0, 0.0])
    got = run(Binary(scale="mean"), x)
    assert np.isnan(ref.binary_mean(x)).all()
    assert np.isnan(got).all(), got


# --------------------------------------------------------------------------------------
# DoReFa
# --------------------------------------------------------------------------------------

DOREFA_BITS = [2, 3, 4, 8, 16]


def check_dorefa(x: np.ndarray, bits: int, what: str, count_near_ties: bool = False) -> None:
    """Codes exact except where ``w'(2^k-1)`` lies within float32 noise of a half integer,
    values to rtol 1e-6.

    qseg evaluates tanh, the max and the division in float32, the reference in float64;
    float32's error in ``w'(2^k-1)`` is a few ulps, below ``n * 2.5e-7``. Where the exact
    value is closer than ``n * 1e-6`` to a tie, the code may legitimately be either
    neighbour, so only that is asserted there. (``w = 0`` gives an exact tie in both
    precisions, which rounds half to even; :func:`test_dorefa_adversarial` asserts that
    code separately.)
    """
    n = 2**bits - 1
    got = run(DoReFa(bits), x)
    scaled = ref.dorefa_scaled(x, bits)
    codes = ref.dorefa_codes(x, bits)
    got_codes_f = (got.astype(np.float64) + 1.0) * n / 2.0
    got_codes = np.round(got_codes_f)
    assert np.all(np.abs(got_codes_f - got_codes) < 1e-3 * max(1, n / 1000)), f"{what}: output off grid"
    assert np.all((got_codes >= 0) & (got_codes <= n)), what
    near_tie = np.abs(np.abs(scaled - np.floor(scaled)) - 0.5) <= n * 1e-6
    exact = ~near_tie
    assert_exact(x[exact], got_codes[exact], codes[exact], f"{what} codes")
    lo, hi = np.floor(scaled[near_tie]), np.ceil(scaled[near_tie])
    g = got_codes[near_tie]
    assert np.all((g == lo) | (g == hi)), f"{what}: near-tie code not a neighbour"
    expected = 2.0 * got_codes / n - 1.0  # the value of the code qseg chose
    assert_close(x, got, expected, rtol=1e-6, what=f"{what} values")
    assert_close(x[exact], got[exact], ref.dorefa(x, bits)[exact], rtol=1e-6, what=f"{what} ref values")
    if count_near_ties and bits <= 8:  # for random data the near-tie band is a sliver
        assert near_tie.sum() <= max(2, x.size // 200), f"{what}: too many near ties ({near_tie.sum()})"


@pytest.mark.parametrize("bits", DOREFA_BITS)
@pytest.mark.parametrize("seed", SEEDS)
def test_dorefa_random(bits, seed):
    for scale in [*SCALES, 1e-20]:
        x = random_input(seed, scale, shape=(32, 8, 3, 3))
        check_dorefa(x, bits, f"DoReFa({bits}) scale={scale}", count_near_ties=True)


@pytest.mark.parametrize("bits", DOREFA_BITS)
def test_dorefa_adversarial(bits):
    """+-0 (an exact tie: w' (2^k-1) = 2^(k-1) - 1/2, half to even gives 2^(k-1)), the
    extremes +-max|w| (codes n and 0), huge (tanh = 1), tiny and subnormal entries."""
    n = 2**bits - 1
    base = f32([0.0, -0.0, 0.7, -0.7, 0.2, -0.05, *TINY, *[-t for t in TINY]])
    x = base.copy()
    got = run(DoReFa(bits), x)
    codes = np.round((got.astype(np.float64) + 1.0) * n / 2.0)
    assert codes[0] == codes[1] == 2 ** (bits - 1), "w = +-0: half to even"
    assert codes[2] == n and codes[3] == 0, "+-max|w| -> +-1"
    check_dorefa(x, bits, f"DoReFa({bits}) moderate")
    check_dorefa(f32([*base, 1e30, -3.0, 20.0]), bits, f"DoReFa({bits}) huge")
    check_dorefa(f32([*base, np.finfo(np.float32).max]), bits, f"DoReFa({bits}) float32 max")


@pytest.mark.parametrize("bits", DOREFA_BITS)
def test_dorefa_all_subnormal(bits):
    """A tensor whose largest entry is subnormal still has ``max|tanh w| > 0``: the formula
    is well defined and maps +-max|w| to +-1 (codes n and 0)."""
    x = f32([1e-40, -1e-40, 1e-44, 0.0, 3e-41])
    check_dorefa(x, bits, f"DoReFa({bits}) all subnormal")


def test_dorefa_nan():
    """A NaN anywhere makes every output NaN (the max defines the grid)."""
    x = f32([0.5, np.nan, -1.0, 0.0])
    assert np.isnan(run(DoReFa(4), x)).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_dorefa_one_bit_is_binary_mean(seed):
    """k = 1 is ``sign(w) * E|w|`` (PAPERS.md), i.e. Binary(scale="mean")."""
    x = np.concatenate([random_input(seed, 0.3, shape=(256,)), f32([0.0, -0.0])])
    got = run(DoReFa(1), x)
    assert_exact(x, got, run(Binary(scale="mean"), x), "DoReFa(1) vs Binary(mean)")
    assert_close(x, got, ref.binary_mean(x), rtol=1e-6, what="DoReFa(1) vs reference")


# --------------------------------------------------------------------------------------
# Ternary (TWN)
# --------------------------------------------------------------------------------------


def away_from_delta(w: np.ndarray, channel_axis) -> np.ndarray:
    """Seeded data whose entries are all >1e-5 (relative) away from their slice's delta,
    so float32 vs float64 evaluation of ``0.7 E|w|`` cannot flip a ``|w| > delta``."""
    moved = np.moveaxis(w, channel_axis, 0) if channel_axis is not None else w.reshape(1, -1)
    rows = moved.reshape(moved.shape[0], -1).astype(np.float64)
    delta = 0.7 * np.abs(rows).mean(axis=1, keepdims=True)
    assert np.all(np.abs(np.abs(rows) - delta) > 1e-5 * delta), "pick another seed"
    return w


TERNARY_CASES = [
    (None, (4096,)),
    (None, (16, 8, 3, 3)),
    (0, (16, 8, 3, 3)),  # conv weight, per output filter
    (1, (8, 16, 3, 3)),  # transposed conv weight
    (0, (32, 64)),  # linear weight
]


@pytest.mark.parametrize(("axis", "shape"), TERNARY_CASES)
@pytest.mark.parametrize("seed", SEEDS)
def test_ternary_random(axis, shape, seed):
    """TWN per tensor and per channel on seeded normals (and a channel-scaled tensor),
    rtol 1e-6 (alpha is a mean summed in a different order)."""
    q = Ternary(channel_axis=axis)
    for scale in [*SCALES, 1e-20, 1e20]:
        x = away_from_delta(random_input(seed, scale, shape), axis)
        assert_close(x, run(q, x), ref.ternary(x, axis), rtol=1e-6, what=f"Ternary({axis}) scale={scale}")
    if axis is not None:  # slices of very different scales: per-channel statistics must differ
        sizes = [1] * len(shape)
        sizes[axis] = shape[axis]
        factors = (10.0 ** np.linspace(-3, 3, shape[axis])).reshape(sizes)
        x = away_from_delta((random_input(seed, 1.0, shape) * factors).astype(np.float32), axis)
        assert_close(x, run(q, x), ref.ternary(x, axis), rtol=1e-6, what=f"Ternary({axis}) mixed scales")


def test_ternary_threshold_tie():
    """``|w| == delta`` is not kept (strict ``>``): mean|w| = 10 gives delta = 7 exactly in
    float32 and float64; its float32 successor is kept."""
    x = f32([7.0, -7.0, 16.0, -10.0])
    expected = ref.ternary(x)
    assert expected.tolist() == [0.0, 0.0, 13.0, -13.0]
    assert_close(x, run(Ternary(), x), expected, rtol=1e-6, what="tie at delta")
    above = float(np.nextafter(F32(7.0), F32(8.0)))
    x = f32([above, -7.0, 16.0, -10.0])  # delta moves by ~1e-7 only: 7 < delta < above
    assert_close(x, run(Ternary(), x), ref.ternary(x), rtol=1e-6, what="just above delta")


def test_ternary_special_slices():
    """Per channel: an all-zero slice gets alpha = 0; NaN / inf make only their slice NaN;
    +-0, subnormal-only and huge slices."""
    x = np.zeros((7, 6), dtype=np.float32)
    x[1] = [0.0, -0.0, 0.0, 0.0, 0.0, 0.0]
    x[2] = [0.5, np.nan, -1.0, 0.0, 0.2, 0.1]
    x[3] = [0.5, np.inf, -1.0, 0.0, 0.2, 0.1]
    x[4] = [1e-40, -1e-44, 3e-41, 0.0, -0.0, 2e-40]
    x[5] = [1e30, -2e30, 1e-30, 0.0, 5e29, -1e29]
    x[6] = [0.9, -0.6, 0.1, -0.05, 0.0, -0.0]
    got = run(Ternary(channel_axis=0), x)
    assert_close(x, got, ref.ternary(x, 0), rtol=1e-6, atol=SUB_ATOL, what="Ternary special slices")
    assert np.isnan(got[2]).all() and np.isnan(got[3]).all()
    assert np.isnan(run(Ternary(), x)).all(), "per tensor: one NaN makes all NaN"


# --------------------------------------------------------------------------------------
# TernaryTanh (TernaryNet activation)
# --------------------------------------------------------------------------------------

TT_SPECIAL = [0.0, -0.0, 0.25, 0.5, 0.75, 1.0, 1e30, *TINY, np.inf]
TT_SPECIAL += [float(np.nextafter(F32(0.5), F32(d))) for d in (0.0, 1.0)]


@pytest.mark.parametrize(("beta_start", "beta_end"), [(3.0, 8.0), (1.0, 20.0)])
@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_ternary_tanh_train(beta_start, beta_end, progress):
    """Training mode: ``0.5 tanh(2bx - b) - 0.5 tanh(-2bx - b)`` with the annealed b,
    atol 1e-6; NaN -> NaN."""
    act = TernaryTanh(beta_start=beta_start, beta_end=beta_end).train()
    assert float(act.beta) == beta_start
    act.anneal(progress)
    beta = ref.anneal_beta(beta_start, beta_end, progress)
    assert float(act.beta) == pytest.approx(beta, rel=1e-6)
    x = np.concatenate(
        [random_input(s, sc) for s, sc in zip(SEEDS, [0.3, 1.0, 100.0], strict=True)]
        + [f32([*both_signs(TT_SPECIAL), np.nan])]
    )
    assert_close(x, run(act, x), ref.ternary_tanh_soft(x, beta), atol=1e-6, what=f"TernaryTanh b={beta}")


@pytest.mark.parametrize("progress", [0.0, 1.0])
def test_ternary_tanh_eval(progress):
    """Eval mode: ``sign(x) * 1[|x| > 0.5]`` exactly, whatever b; 0.5 -> 0, its successor
    -> 1; NaN -> NaN."""
    act = TernaryTanh()
    act.anneal(progress)
    act.eval()
    x = np.concatenate(
        [random_input(s, 0.6) for s in SEEDS] + [f32([*both_signs(TT_SPECIAL), -np.inf, np.nan])]
    )
    assert_exact(x, run(act, x), ref.ternary_tanh_hard(x).astype(np.float32), "TernaryTanh eval")


# --------------------------------------------------------------------------------------
# extremes of float32's range
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", P2_BITS)
@pytest.mark.parametrize("s", [1e-38, 1e-40, 2.0**-149])
def test_power_of_two_zero_stays_zero_for_tiny_grids(bits, s):
    """0 is in P and is the nearest grid value of +-0, also when the grid's lower powers
    (and the 0 / 2^n2 tie 2^(n2-1)) lie below float32's smallest subnormal."""
    x = f32([s, -s, 0.0, -0.0])
    expected = ref.power_of_two(x, bits).astype(np.float32)
    assert expected[2] == 0 and expected[3] == 0
    assert_exact(x, run(PowerOfTwo(bits=bits), x), expected, f"PowerOfTwo({bits}) s={s}")


def test_means_near_float32_max():
    """Finite inputs near float32's max: ``E|x|`` is finite and representable, so
    Binary(mean) and Ternary must not turn it into inf or NaN (a float32 sum overflows)."""
    big = float(np.finfo(np.float32).max)
    x = f32([big, -big, 0.5 * big, 1.0, 0.0, -0.0])
    assert_close(x, run(Binary(scale="mean"), x), ref.binary_mean(x), rtol=1e-6, what="Binary mean")
    assert_close(x, run(Ternary(), x), ref.ternary(x), rtol=1e-6, what="Ternary")
