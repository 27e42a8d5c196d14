"""The selection math of suggestive annotation: greedy max-cover against brute force,
candidate ranking, tie rules and invariants of ``select``."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qseg.active import (
    AnnotationError,
    cosine_similarity,
    coverage,
    greedy_cover,
    image_uncertainty,
    select,
    top_uncertain,
)
from qseg.errors import ModelError, QsegError


@st.composite
def eighths(draw: st.DrawFn, max_rows: int = 6, max_cols: int = 6) -> torch.Tensor:
    """A similarity matrix of multiples of 1/8 in [0, 1]: every sum is exact in binary
    floating point, so exact ties are common and comparisons need no tolerance."""
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    values = draw(st.lists(st.integers(0, 8), min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(values, dtype=torch.float32).reshape(rows, cols) / 8


def exact_coverage(sim: torch.Tensor, chosen: list[int]) -> Fraction:
    """F(S_a, S_u) in exact rational arithmetic, row by row: the reference for greedy_cover."""
    if not chosen:
        return Fraction(0)
    return sum((max(Fraction(float(sim[x, j])) for j in chosen) for x in range(sim.shape[0])), Fraction(0))


@given(sim=eighths(), k=st.integers(1, 7))
def test_each_greedy_step_is_the_argmax_with_lowest_index_on_ties(sim: torch.Tensor, k: int) -> None:
    chosen = greedy_cover(sim, k)
    assert len(chosen) == min(k, sim.shape[1])
    for step, pick in enumerate(chosen):
        before = chosen[:step]
        values = {j: exact_coverage(sim, [*before, j]) for j in range(sim.shape[1]) if j not in before}
        best = max(values.values())
        assert pick == min(j for j, v in values.items() if v == best), (step, values)


@given(sim=eighths(), k=st.integers(1, 6))
def test_greedy_value_is_within_one_minus_one_over_e_of_the_optimum(sim: torch.Tensor, k: int) -> None:
    size = min(k, sim.shape[1])
    optimum = max(exact_coverage(sim, list(s)) for s in itertools.combinations(range(sim.shape[1]), size))
    value = exact_coverage(sim, greedy_cover(sim, k))
    assert value <= optimum
    assert float(value) >= (1 - 1 / math.e) * float(optimum) - 1e-12


def test_greedy_on_continuous_similarities_matches_brute_force_at_each_step() -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        sim = torch.rand(9, 7, generator=gen)
        chosen = greedy_cover(sim, 4)
        for step, pick in enumerate(chosen):
            values = [coverage(sim, [*chosen[:step], j]) for j in range(7)]
            for j in chosen[:step]:
                values[j] = -math.inf
            assert pick == max(range(7), key=lambda j, v=values: (v[j], -j))
        best = max(coverage(sim, list(s)) for s in itertools.combinations(range(7), 4))
        assert coverage(sim, chosen) >= (1 - 1 / math.e) * best


def test_greedy_can_be_suboptimal_and_the_bound_is_what_is_promised() -> None:
    # the classic case: one column covering half of each pair looks best first
    sim = torch.tensor([[1.0, 0.0, 0.6], [0.0, 1.0, 0.6]])
    assert greedy_cover(sim, 1) == [2]
    assert greedy_cover(sim, 2) == [2, 0]
    assert coverage(sim, [2, 0]) == pytest.approx(1.6)
    assert coverage(sim, [0, 1]) == pytest.approx(2.0)  # the optimum greedy missed


def test_all_equal_similarities_pick_the_lowest_indices_in_order() -> None:
    assert greedy_cover(torch.ones(4, 6), 3) == [0, 1, 2]
    assert greedy_cover(torch.zeros(4, 6), 3) == [0, 1, 2]


def test_ties_within_float32_rounding_go_to_the_lowest_index() -> None:
    # two mutually closest images: F ties exactly in real numbers, float32 self-similarities
    # of 1 - 2^-24 and 1 make one side a rounding error larger
    just_below_one = 1 - 2**-24
    assert greedy_cover(torch.tensor([[1.0, 0.5], [0.5, just_below_one]]), 1) == [0]
    assert greedy_cover(torch.tensor([[just_below_one, 0.5], [0.5, 1.0]]), 1) == [0]
    # float64 input: the same gap is a real difference
    assert greedy_cover(torch.tensor([[just_below_one, 0.5], [0.5, 1.0]], dtype=torch.float64), 1) == [1]


def test_negative_similarities_keep_f_of_the_empty_set_at_zero() -> None:
    # F is not monotone with negative similarities: the first pick lowers F below F(empty) = 0,
    # and the greedy still grows the set to k
    sim = torch.tensor([[-0.5, -0.125], [-0.25, -0.75]])
    assert greedy_cover(sim, 1) == [0]
    assert greedy_cover(sim, 2) == [0, 1]
    assert coverage(sim, []) == 0.0
    assert coverage(sim, [0]) == -0.75
    assert coverage(sim, [0, 1]) == -0.375


def test_top_uncertain_sorts_descending_and_breaks_ties_by_index() -> None:
    u = torch.tensor([0.2, 0.9, 0.2, 0.9, 0.5])
    assert top_uncertain(u, 5) == [1, 3, 4, 0, 2]
    assert top_uncertain(u, 2) == [1, 3]
    assert top_uncertain(u, 10) == [1, 3, 4, 0, 2]


def test_top_uncertain_rejects_nan() -> None:
    with pytest.raises(ModelError, match="non-finite"):
        top_uncertain(torch.tensor([0.1, float("nan")]), 1)


def test_cosine_similarity_is_scale_invariant_and_zero_safe() -> None:
    d = torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.0, 0.0], [-1.0, -2.0]])
    sim = cosine_similarity(d)
    assert sim[0, 1] == pytest.approx(1.0)
    assert sim[0, 3] == pytest.approx(-1.0)
    assert torch.equal(sim[2], torch.zeros(4)) and torch.equal(sim[:, 2], torch.zeros(4))
    assert torch.allclose(sim, sim.T)
    assert torch.allclose(cosine_similarity(d, d[[3, 0]]), sim[:, [3, 0]])


def test_image_uncertainty_matches_a_hand_computation() -> None:
    # K=3 models, N=2 images, C=1, 2 pixels; image 1: all models agree
    p = torch.tensor(
        [
            [[[0.0, 0.5]], [[0.3, 0.3]]],
            [[[0.5, 0.5]], [[0.3, 0.3]]],
            [[[1.0, 0.5]], [[0.3, 0.3]]],
        ]
    ).unsqueeze(2)
    std0 = math.sqrt(((0.0 - 0.5) ** 2 + 0 + (1.0 - 0.5) ** 2) / 3)  # population std, pixel 0
    assert image_uncertainty(p).tolist() == pytest.approx([std0 / 2, 0.0])
    assert image_uncertainty(p, "variance").tolist() == pytest.approx([std0**2 / 2, 0.0])


# ---- select: invariants -------------------------------------------------------------------


@st.composite
def pools(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous uncertainty and non-negative descriptors (ties have probability 0)."""
    n = draw(st.integers(1, 12))
    d = draw(st.integers(2, 4))  # one dimension makes every cosine 1: ties everywhere
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.rand(n, generator=gen), torch.rand(n, d, generator=gen)


@given(
    data=pools(),
    k=st.integers(1, 10),
    n_cand=st.integers(1, 14),
    universe=st.sampled_from(["pool", "candidates"]),
)
def test_select_invariants(
    data: tuple[torch.Tensor, torch.Tensor], k: int, n_cand: int, universe: str
) -> None:
    u, d = data
    s = select(u, d, k, n_cand, universe=universe)
    n_c = min(n_cand, len(u))
    assert s.candidates == torch.argsort(u, descending=True)[:n_c].tolist()
    assert len(s.indices) == min(k, n_c)
    assert len(set(s.indices)) == len(s.indices)
    assert set(s.indices) <= set(s.candidates)
    if k >= n_c:
        assert set(s.indices) == set(s.candidates)
    assert s.similarity.shape == (len(u), n_c)
    # F grows with each step for non-negative similarities, and the last value is F(S_a, S_u)
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(s.coverage))
    rows = list(range(len(u))) if universe == "pool" else s.candidates
    full = cosine_similarity(d)[rows]
    assert s.coverage[-1] == pytest.approx(coverage(full, s.indices), rel=1e-6)


@given(data=pools(), k=st.integers(1, 6), n_cand=st.integers(1, 8), seed=st.integers(0, 1000))
def test_select_is_invariant_to_permuting_the_pool(
    data: tuple[torch.Tensor, torch.Tensor], k: int, n_cand: int, seed: int
) -> None:
    u, d = data
    perm = torch.randperm(len(u), generator=torch.Generator().manual_seed(seed))
    base = select(u, d, k, n_cand)
    moved = select(u[perm], d[perm], k, n_cand)
    # image perm[i] of the original pool is image i of the permuted one
    assert [int(perm[i]) for i in moved.candidates] == base.candidates
    assert moved.coverage == pytest.approx(base.coverage, rel=1e-6)
    if not near_tie(base):  # a tie within float rounding may go either way
        assert [int(perm[i]) for i in moved.indices] == base.indices


def near_tie(s) -> bool:
    """Whether some greedy step of ``s`` had a runner-up within 1e-4 of its best gain
    (two images always tie exactly: F({a}) = 1 + sim(a, b) = F({b}))."""
    column = {c: j for j, c in enumerate(s.candidates)}
    for step in range(len(s.indices)):
        taken = [column[i] for i in s.indices[:step]]
        values = sorted(
            (coverage(s.similarity, [*taken, j]) for j in range(len(s.candidates)) if j not in taken),
            reverse=True,
        )
        if len(values) > 1 and values[0] - values[1] < 1e-4:
            return True
    return False


def test_universe_changes_what_is_represented() -> None:
    # candidates 0, 1 (most uncertain) sit in a corner; the pool's mass lies near candidate 2
    u = torch.tensor([0.9, 0.8, 0.7, 0.0, 0.0, 0.0])
    d = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.05, 1.0], [0.1, 1.0], [0.0, 1.0]])
    assert select(u, d, 1, 3, universe="pool").indices == [2]
    # among the candidates alone, candidate 1 is the most central
    assert select(u, d, 1, 3, universe="candidates").indices == [1]


def test_equal_descriptors_pick_the_lowest_pool_indices_among_candidates() -> None:
    u = torch.tensor([0.1, 0.5, 0.4, 0.9, 0.3])
    s = select(u, torch.ones(5, 3), k=2, candidates=3)
    assert s.candidates == [3, 1, 2]
    assert s.indices == [1, 2]  # all gains equal: lowest pool index first, not highest uncertainty


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: select(torch.rand(3), torch.rand(3, 2), k=0), "k must be a positive integer"),
        (lambda: select(torch.rand(3), torch.rand(3, 2), candidates=1.5), "candidates must be"),
        (lambda: select(torch.rand(3), torch.rand(3, 2), universe="all"), "universe must be"),
        (lambda: select(torch.rand(3), torch.rand(4, 2)), r"descriptors must be \(N, D\)"),
        (lambda: select(torch.rand(0), torch.rand(0, 2)), "the pool is empty"),
        (lambda: greedy_cover(torch.rand(3), 1), "similarity must be"),
        (lambda: image_uncertainty(torch.rand(2, 3), "entropy"), "uncertainty must be 'std' or 'variance'"),
        (lambda: cosine_similarity(torch.rand(2, 3), torch.rand(2, 4)), "same D"),
    ],
)
def test_bad_arguments_raise_annotation_errors(call, match: str) -> None:
    with pytest.raises(AnnotationError, match=match) as info:
        call()
    assert isinstance(info.value, QsegError) and isinstance(info.value, ValueError)
