"""Choosing what to annotate: similarity, the most uncertain candidates, greedy max-cover.

:func:`select` works on per-image scores alone (no models); :func:`suggest` first has
the models score the pool (:func:`~qseg.active.scoring.score_pool`), then selects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qseg.active._checks import UncertaintyKind, Universe, _check_count, _check_universe
from qseg.active.scoring import Pool, score_pool
from qseg.errors import AnnotationError, ModelError

__all__ = [
    "Suggestion",
    "cosine_similarity",
    "coverage",
    "greedy_cover",
    "select",
    "suggest",
    "top_uncertain",
]


def cosine_similarity(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity between the rows of ``a`` ``(N, D)`` and of ``b`` ``(M, D)`` (default ``a``).

    A zero row is similar to nothing (0), rather than NaN.

    Example:
        >>> import torch
        >>> cosine_similarity(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])).round(decimals=4)
        tensor([[1.0000, 0.7071, 0.0000],
                [0.7071, 1.0000, 0.0000],
                [0.0000, 0.0000, 0.0000]])
    """
    b = a if b is None else b
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise AnnotationError(
            f"descriptors must be two (N, D) matrices with the same D, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def top_uncertain(uncertainty: torch.Tensor, n: int) -> list[int]:
    """Indices of the ``n`` most uncertain images, most uncertain first; equal values by lowest index.

    Example:
        >>> import torch
        >>> top_uncertain(torch.tensor([0.1, 0.5, 0.3, 0.5]), 3)
        [1, 3, 2]
    """
    _check_count("candidates", n)
    if uncertainty.dim() != 1:
        raise AnnotationError(f"uncertainty must be one value per image (N,), got {tuple(uncertainty.shape)}")
    if not torch.isfinite(uncertainty).all():
        raise ModelError("the models' predictions give a non-finite uncertainty: check them for NaN")
    order = torch.sort(uncertainty, descending=True, stable=True).indices
    return order[:n].tolist()


def coverage(similarity: torch.Tensor, selected: Sequence[int]) -> float:
    """``F(S_a, S_u)``: the sum over the rows (``S_u``) of the largest similarity to a selected column.

    ``similarity[x, j]`` is ``sim(I_x, candidate j)``; ``F`` of an empty selection is 0.

    Example:
        >>> import torch
        >>> sim = torch.tensor([[1.0, 0.25], [0.5, 0.75], [0.25, 0.125]])
        >>> coverage(sim, []), coverage(sim, [0]), coverage(sim, [0, 1])
        (0.0, 1.75, 2.0)
    """
    if not len(selected):
        return 0.0
    return float(similarity[:, list(selected)].double().amax(dim=1).sum())


def greedy_cover(similarity: torch.Tensor, k: int) -> list[int]:
    """Greedy max-cover: grow a set of up to ``k`` columns, each time adding the column that
    most increases :func:`coverage`; ties go to the lowest column index.

    Values that differ by less than the rounding error of ``similarity``'s dtype
    (8 machine epsilons per row) count as tied: facility-location objectives tie
    exactly and often (two mutually closest images add the same ``F`` whichever
    comes first), and float32 cosines would otherwise break those ties by noise.

    ``similarity`` is ``(|S_u|, |S_c|)``: rows the images to represent, columns the
    candidates. Returns column indices in the order chosen; all columns when
    ``k >= |S_c|``. For non-negative similarities ``F`` is monotone submodular, so
    the result is within ``1 - 1/e`` of the best set of its size (Nemhauser et al. 1978).

    Example:
        >>> import torch
        >>> sim = torch.tensor([[1.0, 0.0, 0.8], [0.0, 1.0, 0.8], [0.0, 0.0, 0.1]])
        >>> greedy_cover(sim, 1), greedy_cover(sim, 2), greedy_cover(sim, 5)
        ([2], [2, 0], [2, 0, 1])
    """
    _check_count("k", k)
    if similarity.dim() != 2:
        raise AnnotationError(f"similarity must be a (|S_u|, |S_c|) matrix, got {tuple(similarity.shape)}")
    # float64: the sums over S_u then agree with a brute-force evaluation in any order
    sim = similarity.double()
    n_rows, n_cols = sim.shape
    dtype = similarity.dtype if similarity.is_floating_point() else torch.float64
    tolerance = 8 * torch.finfo(dtype).eps * max(1, n_rows)
    chosen: list[int] = []
    best: torch.Tensor | None = None  # per row, the best similarity to the chosen set
    for _ in range(min(k, n_cols)):
        values = sim.sum(dim=0) if best is None else torch.maximum(best[:, None], sim).sum(dim=0)
        values[chosen] = -torch.inf
        j = int(torch.nonzero(values >= values.max() - tolerance)[0])
        chosen.append(j)
        best = sim[:, j] if best is None else torch.maximum(best, sim[:, j])
    return chosen


@dataclass
class Suggestion:
    """The result of :func:`suggest`.

    Attributes:
        indices: the suggested pool indices ``S_a``, in the order the greedy step chose them.
        candidates: ``S_c``, the most uncertain pool indices, most uncertain first.
        uncertainty: ``(N,)`` per-image uncertainty.
        descriptors: ``(N, D)`` per-image descriptors (averaged over the models).
        similarity: ``(N, |S_c|)`` cosine similarity of every pool image to each candidate,
            columns in the order of ``candidates``.
        coverage: ``F(S_a, S_u)`` after each greedy step.
        universe: ``"pool"`` or ``"candidates"``: what ``S_u`` was.
        layers: each model's descriptor layer.

    Example:
        >>> import torch
        >>> s = Suggestion([2], [2, 0], torch.tensor([0.1, 0.0, 0.3]), torch.eye(3), torch.eye(3)[:, [2, 0]],
        ...                [1.0], "pool")
        >>> s.indices, s.candidates
        ([2], [2, 0])
    """

    indices: list[int]
    candidates: list[int]
    uncertainty: torch.Tensor
    descriptors: torch.Tensor
    similarity: torch.Tensor
    coverage: list[float]
    universe: str
    layers: list[str] = field(default_factory=list)


def suggest(
    models: Sequence[nn.Module],
    pool: Pool,
    k: int = 8,
    candidates: int = 16,
    *,
    uncertainty: UncertaintyKind = "std",
    universe: Universe = "pool",
    layer: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> Suggestion:
    """The ``k`` pool images to annotate next (one round of suggestive annotation).

    The ``candidates`` most uncertain images form ``S_c`` (ties: lowest index); the
    greedy max-cover (:func:`greedy_cover`) then picks ``k`` of them maximising
    ``F(S_a, S_u)``. ``S_u`` is the unannotated set: by default the whole pool, as
    in Yang et al. 2017 (representative of everything still unlabelled);
    ``universe="candidates"`` restricts it to ``S_c``. Greedy ties go to the lowest
    pool index. ``k >= candidates`` returns every candidate.

    See :func:`score_pool` for ``models``, ``pool``, ``layer``, ``batch_size`` and
    ``progress``; ``candidates`` larger than the pool means the whole pool.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> nets = [nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU(), nn.Conv2d(3, 1, 1)) for _ in range(3)]
        >>> s = suggest(nets, torch.rand(10, 1, 4, 4), k=2, candidates=4)
        >>> len(s.candidates), len(s.indices), s.similarity.shape
        (4, 2, torch.Size([10, 4]))
    """
    _check_count("k", k)
    _check_count("candidates", candidates)
    _check_universe(universe)
    scores = score_pool(
        models, pool, uncertainty=uncertainty, layer=layer, batch_size=batch_size, progress=progress
    )
    suggestion = select(scores.uncertainty, scores.descriptors, k, candidates, universe=universe)
    suggestion.layers = scores.layers
    return suggestion


def select(
    uncertainty: torch.Tensor,
    descriptors: torch.Tensor,
    k: int = 8,
    candidates: int = 16,
    *,
    universe: Universe = "pool",
) -> Suggestion:
    """The selection step of :func:`suggest`, from per-image ``uncertainty`` ``(N,)`` and
    ``descriptors`` ``(N, D)``: top-``candidates`` by uncertainty, then greedy max-cover of
    the cosine similarities (``layers`` is left empty).

    Example:
        >>> import torch
        >>> u = torch.tensor([0.9, 0.8, 0.1, 0.7])
        >>> d = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
        >>> s = select(u, d, k=2, candidates=3)
        >>> s.candidates, s.indices
        ([0, 1, 3], [1, 3])
    """
    _check_count("k", k)
    _check_count("candidates", candidates)
    _check_universe(universe)
    if descriptors.dim() != 2 or len(descriptors) != len(uncertainty):
        raise AnnotationError(
            f"descriptors must be (N, D) with N = {len(uncertainty)} images, got {tuple(descriptors.shape)}"
        )
    if len(uncertainty) == 0:
        raise AnnotationError("the pool is empty: there is nothing to suggest")
    n = len(uncertainty)
    chosen_c = top_uncertain(uncertainty, min(candidates, n))
    similarity = cosine_similarity(descriptors, descriptors[chosen_c])
    # columns in ascending pool index, so that greedy_cover's lowest-column tie rule is lowest-index
    ascending = sorted(range(len(chosen_c)), key=lambda j: chosen_c[j])
    columns = similarity[:, ascending]
    rows = columns if universe == "pool" else columns[chosen_c]
    picked = greedy_cover(rows, k)
    indices = [chosen_c[ascending[j]] for j in picked]
    values = [coverage(rows, picked[: i + 1]) for i in range(len(picked))]
    return Suggestion(
        indices=indices,
        candidates=chosen_c,
        uncertainty=uncertainty,
        descriptors=descriptors,
        similarity=similarity,
        coverage=values,
        universe=universe,
    )
