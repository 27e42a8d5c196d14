"""Suggestive annotation round after round: train, suggest, label, move."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from qseg.active._checks import UncertaintyKind, Universe, _check_count, _check_kind, _check_universe
from qseg.active.ensemble import TrainFn, train_ensemble
from qseg.active.selection import Suggestion, suggest
from qseg.errors import AnnotationError

__all__ = ["AnnotationLoop", "Round", "annotate_loop"]


@dataclass
class Round:
    """One round of :class:`AnnotationLoop`: ``selected`` are indices into the original pool;
    ``suggestion`` indexes the pool as it was that round, whose row ``i`` is original image
    ``pool_indices[i]``.

    Example:
        >>> import torch
        >>> s = Suggestion([1], [1], torch.zeros(2), torch.eye(2), torch.ones(2, 1), [2.0], "pool")
        >>> Round(0, selected=[7], suggestion=s, pool_indices=[3, 7]).selected
        [7]
    """

    index: int
    selected: list[int]
    suggestion: Suggestion
    pool_indices: list[int]


class AnnotationLoop:
    """Suggestive annotation, round after round.

    Each round trains ``n_models`` models (:func:`train_ensemble`, fresh from
    ``model_factory``, bootstrap samples of the labelled set), asks :func:`suggest`
    for ``k`` images of the remaining pool, gets their masks from ``label`` and moves
    them from the pool to the labelled set.

    Args:
        model_factory: builds one model (may call ``qseg.prepare`` to train quantized models).
        images: labelled images ``(n, C, H, W)`` to start from.
        masks: their masks ``(n, ...)``, in the format ``train_fn`` expects.
        pool: unlabelled images ``(N, C, H, W)``.
        label: the masks of the whole pool ``(N, ...)``, or a callback
            ``label(indices) -> masks`` given original pool indices.
        n_models: ``K`` (5 in paper B).
        k: images selected per round, as in :func:`suggest`.
        candidates: the most uncertain images the selection draws from, as in :func:`suggest`.
        uncertainty: ``"std"`` or ``"variance"``, as in :func:`suggest`.
        universe: ``"pool"`` or ``"candidates"``, as in :func:`suggest`.
        layer: the descriptor module's name, as in :func:`suggest`.
        batch_size: images per forward pass while scoring, as in :func:`suggest`.
        train_fn: trains one model, as in :func:`train_ensemble` (default :func:`default_train`).
        bootstrap: bootstrap samples or the whole labelled set, as in :func:`train_ensemble`.
        workers: training processes, as in :func:`train_ensemble`.
        threads: torch threads per worker, as in :func:`train_ensemble`.
        seed: round ``r`` trains with a seed derived from ``(seed, r)``.
        progress: tqdm bars over rounds and models.

    Example:
        >>> import functools, torch
        >>> from qseg.active import default_train
        >>> from torch import nn
        >>> x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        >>> y = (x > 0.5).float()
        >>> loop = AnnotationLoop(
        ...     lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 1)),
        ...     x[:2], y[:2], x[2:], y[2:], n_models=2, k=2, candidates=4,
        ...     train_fn=functools.partial(default_train, epochs=1), progress=False,
        ... )
        >>> rounds = loop.run(2)
        >>> len(loop.images), len(loop.pool_indices), len(rounds[0].selected)
        (6, 4, 2)
    """

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        images: torch.Tensor,
        masks: torch.Tensor,
        pool: torch.Tensor,
        label: torch.Tensor | Callable[[list[int]], torch.Tensor],
        *,
        n_models: int = 5,
        k: int = 8,
        candidates: int = 16,
        uncertainty: UncertaintyKind = "std",
        universe: Universe = "pool",
        layer: str | None = None,
        batch_size: int = 16,
        train_fn: TrainFn | None = None,
        bootstrap: bool = True,
        workers: int = 1,
        threads: int | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        if not isinstance(pool, torch.Tensor) or pool.dim() < 3:
            raise AnnotationError("pool must be a tensor (N, C, H, W): its images move to the labelled set")
        if not isinstance(images, torch.Tensor) or images.shape[1:] != pool.shape[1:]:
            raise AnnotationError(
                f"images must be a tensor of the pool's image shape {tuple(pool.shape[1:])}, "
                f"got {tuple(getattr(images, 'shape', ()))}"
            )
        if not isinstance(masks, torch.Tensor) or len(masks) != len(images):
            raise AnnotationError(f"masks must be a tensor with one mask per labelled image ({len(images)})")
        if isinstance(label, torch.Tensor) and (
            len(label) != len(pool) or label.shape[1:] != masks.shape[1:]
        ):
            raise AnnotationError(
                f"label must hold one mask {tuple(masks.shape[1:])} per pool image ({len(pool)}), "
                f"got {tuple(label.shape)}"
            )
        if not isinstance(label, torch.Tensor) and not callable(label):
            raise AnnotationError("label must be a tensor of masks for the pool or a callable label(indices)")
        for name, value in (
            ("n_models", n_models),
            ("k", k),
            ("candidates", candidates),
            ("workers", workers),
        ):
            _check_count(name, value)
        _check_kind(uncertainty)
        _check_universe(universe)
        self.model_factory = model_factory
        self.images = images
        self.masks = masks
        self.pool = pool
        self.label = label
        self.n_models = n_models
        self.k = k
        self.candidates = candidates
        self.uncertainty = uncertainty
        self.universe = universe
        self.layer = layer
        self.batch_size = batch_size
        self.train_fn = train_fn
        self.bootstrap = bootstrap
        self.workers = workers
        self.threads = threads
        self.seed = seed
        self.progress = progress
        #: original indices of the pool images not labelled yet
        self.pool_indices: list[int] = list(range(len(pool)))
        #: the models of the last round
        self.models: list[nn.Module] = []
        self.history: list[Round] = []

    def _labels(self, indices: list[int]) -> torch.Tensor:
        if isinstance(self.label, torch.Tensor):
            return self.label[indices]
        masks = self.label(indices)
        if not isinstance(masks, torch.Tensor) or masks.shape != (len(indices), *self.masks.shape[1:]):
            raise AnnotationError(
                f"label({indices}) must return masks of shape {(len(indices), *self.masks.shape[1:])}, "
                f"got {tuple(getattr(masks, 'shape', ())) or type(masks).__name__}"
            )
        return masks

    def step(self) -> Round:
        """Train, suggest, label, move: one round. Raises :class:`AnnotationError` when the
        pool is empty or nothing is labelled yet.

        Example:
            >>> import functools, torch
            >>> from qseg.active import default_train
            >>> from torch import nn
            >>> x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
            >>> loop = AnnotationLoop(
            ...     lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 1)),
            ...     x[:2], x[:2] > 0.5, x[2:], x[2:] > 0.5, n_models=2, k=3,
            ...     train_fn=functools.partial(default_train, epochs=1), progress=False,
            ... )
            >>> r = loop.step()
            >>> r.index, len(r.selected), len(loop.pool_indices)
            (0, 3, 1)
        """
        if not self.pool_indices:
            raise AnnotationError("the pool is empty: every image is labelled")
        if len(self.images) == 0:
            raise AnnotationError("no labelled images to train on: start from a labelled subset")
        r = len(self.history)
        round_seed = int(np.random.SeedSequence([self.seed, r]).generate_state(1)[0])
        self.models = train_ensemble(
            self.model_factory,
            self.images,
            self.masks,
            self.n_models,
            seed=round_seed,
            train_fn=self.train_fn,
            bootstrap=self.bootstrap,
            workers=self.workers,
            threads=self.threads,
            progress=self.progress,
        )
        pool = self.pool[self.pool_indices]
        suggestion = suggest(
            self.models,
            pool,
            self.k,
            self.candidates,
            uncertainty=self.uncertainty,
            universe=self.universe,
            layer=self.layer,
            batch_size=self.batch_size,
        )
        selected = [self.pool_indices[i] for i in suggestion.indices]
        masks = self._labels(selected)
        self.images = torch.cat([self.images, self.pool[selected]])
        self.masks = torch.cat([self.masks, masks.to(self.masks.dtype)])
        record = Round(r, selected, suggestion, list(self.pool_indices))
        chosen = set(selected)
        self.pool_indices = [i for i in self.pool_indices if i not in chosen]
        self.history.append(record)
        return record

    def run(self, rounds: int) -> list[Round]:
        """Up to ``rounds`` rounds (fewer when the pool runs out); returns them.

        Example:
            >>> import functools, torch
            >>> from qseg.active import default_train
            >>> from torch import nn
            >>> x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
            >>> loop = AnnotationLoop(
            ...     lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 1)),
            ...     x[:2], x[:2] > 0.5, x[2:], x[2:] > 0.5, n_models=2, k=2,
            ...     train_fn=functools.partial(default_train, epochs=1), progress=False,
            ... )
            >>> [len(r.selected) for r in loop.run(10)]  # the pool of 3 runs out after 2 rounds
            [2, 1]
        """
        _check_count("rounds", rounds)
        done = []
        for _ in tqdm(range(rounds), desc="annotation rounds", disable=not self.progress):
            if not self.pool_indices:
                break
            done.append(self.step())
        return done


def annotate_loop(
    model_factory: Callable[[], nn.Module],
    images: torch.Tensor,
    masks: torch.Tensor,
    pool: torch.Tensor,
    label: torch.Tensor | Callable[[list[int]], torch.Tensor],
    *,
    rounds: int = 1,
    n_models: int = 5,
    k: int = 8,
    candidates: int = 16,
    uncertainty: UncertaintyKind = "std",
    universe: Universe = "pool",
    layer: str | None = None,
    batch_size: int = 16,
    train_fn: TrainFn | None = None,
    bootstrap: bool = True,
    workers: int = 1,
    threads: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> AnnotationLoop:
    """Run :class:`AnnotationLoop` for ``rounds`` rounds and return it (its ``images``,
    ``masks``, ``pool_indices``, ``models`` and ``history`` hold the outcome).

    Example:
        >>> import functools, torch
        >>> from qseg.active import default_train
        >>> from torch import nn
        >>> x = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        >>> y = (x > 0.5).float()
        >>> loop = annotate_loop(
        ...     lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 1)),
        ...     x[:4], y[:4], x[4:], y[4:], rounds=2, n_models=2, k=2, candidates=3,
        ...     train_fn=functools.partial(default_train, epochs=1), progress=False,
        ... )
        >>> len(loop.images), len(loop.pool_indices), [len(r.selected) for r in loop.history]
        (8, 4, [2, 2])
    """
    loop = AnnotationLoop(
        model_factory,
        images,
        masks,
        pool,
        label,
        n_models=n_models,
        k=k,
        candidates=candidates,
        uncertainty=uncertainty,
        universe=universe,
        layer=layer,
        batch_size=batch_size,
        train_fn=train_fn,
        bootstrap=bootstrap,
        workers=workers,
        threads=threads,
        seed=seed,
        progress=progress,
    )
    loop.run(rounds)
    return loop
