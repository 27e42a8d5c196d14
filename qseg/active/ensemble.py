"""Training the ``K`` models of a round: bootstrap samples, derived seeds, and
``torch.distributed`` workers whose results equal the sequential ones."""

from __future__ import annotations

import datetime
import pickle
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from tqdm import tqdm

from qseg.active._checks import _check_count
from qseg.errors import AnnotationError
from qseg.inq import Schedule
from qseg.recipes.training import Training
from qseg.train import fit

__all__ = ["DEFAULT_TRAINING", "default_train", "train_ensemble"]

TrainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], nn.Module]

#: What :func:`default_train` does unless told otherwise: a few epochs of Adam at 1e-3 with a
#: cosine schedule on paper A's EM loss (BCE + dice; cross entropy + dice for several classes).
DEFAULT_TRAINING = Training(epochs=5, lr=1e-3, loss="bce_dice", batch_size=4)


def default_train(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    seed: int,
    *,
    training: Training | None = None,
    epochs: int | None = None,
    augment: bool = True,
    inq_portions: Sequence[float] | None = None,
) -> nn.Module:
    """The default ``train_fn`` of :func:`train_ensemble`: :func:`qseg.train.fit` with
    ``training`` (default :data:`DEFAULT_TRAINING`), ``seed`` deciding the batch order and
    the flips, no progress bar. Trains ``model`` in place and returns it.

    Masks are as :func:`~qseg.train.fit` takes them: 0 / 1 ``(N, 1, H, W)`` for one logit
    channel, class indices ``(N, H, W)`` or ``(N, 1, H, W)`` for several.
    ``functools.partial(default_train, training=recipe.training)`` trains each model the way
    a recipe says, and stays picklable for ``workers > 1``.

    Args:
        model: the model to train (float, or built by ``qseg.prepare``).
        images: the images of the bootstrap sample this model sees.
        masks: their masks.
        seed: seeds the batch order and the augmentation.
        training: optimizer, schedule, loss, epochs and batch size.
        epochs: overrides ``training.epochs``.
        augment: random flips / transposes of each batch.
        inq_portions: INQ's accumulated portions (a recipe's ``inq.portions``). INQ
            quantizes a trained network, and the models of an ensemble start untrained:
            the first half of the epochs train in float, the rest (at least one epoch per
            stage, taken from the float half when the epochs are few) run the model's
            power-of-two layers through a :class:`~qseg.inq.Schedule` of these stages, each
            part with its own pass of the learning-rate schedule, ending with every such
            weight on its grid, as paper B's suggestive FCNs are.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 1))
        >>> x = torch.rand(4, 1, 8, 8)
        >>> default_train(net, x, (x > 0.5).float(), seed=0, epochs=1) is net
        True
    """
    training = DEFAULT_TRAINING if training is None else training
    if not isinstance(training, Training):
        raise AnnotationError(
            f"training must be a qseg.recipes.training.Training (e.g. a recipe's .training), "
            f"got {type(training).__name__}"
        )
    if inq_portions is None:
        fit(model, images, masks, training, epochs=epochs, seed=seed, augment=augment, progress=False)
        return model
    schedule = Schedule(model, inq_portions)
    total = training.epochs if epochs is None else epochs
    # INQ quantizes a trained network: the float half comes first, the stages get the rest
    stage_epochs = max(len(schedule.portions), total - total // 2)
    if total > stage_epochs:
        fit(
            model,
            images,
            masks,
            training,
            epochs=total - stage_epochs,
            seed=seed,
            augment=augment,
            progress=False,
        )
    fit(
        model,
        images,
        masks,
        training,
        epochs=stage_epochs,
        seed=seed + 1,
        augment=augment,
        inq=schedule,
        progress=False,
    )
    return model


@dataclass(frozen=True)
class _Job:
    """Everything that decides one model: its initial weights, its bootstrap sample, its training."""

    index: int
    init_seed: int
    sample: torch.Tensor
    train_seed: int


def _jobs(n_images: int, n_models: int, seed: int, bootstrap: bool) -> list[_Job]:
    jobs = []
    for i in range(n_models):
        # independent streams per model and per use, so that init, sample and training are uncorrelated
        init_seed, sample_seed, train_seed = (
            int(s) for s in np.random.SeedSequence([seed, i]).generate_state(3)
        )
        if bootstrap:
            sample = torch.randint(
                n_images, (n_images,), generator=torch.Generator().manual_seed(sample_seed)
            )
        else:
            sample = torch.arange(n_images)
        jobs.append(_Job(i, init_seed, sample, train_seed))
    return jobs


def _build(model_factory: Callable[[], nn.Module], job: _Job) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.init_seed)
        model = model_factory()
    if not isinstance(model, nn.Module):
        raise AnnotationError(f"model_factory must return an nn.Module, got {type(model).__name__}")
    return model


def _train_one(
    model_factory: Callable[[], nn.Module],
    train_fn: TrainFn,
    images: torch.Tensor,
    masks: torch.Tensor,
    job: _Job,
) -> nn.Module:
    model = _build(model_factory, job)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.train_seed)  # dropout and any global-RNG use inside train_fn
        trained = train_fn(model, images[job.sample], masks[job.sample], job.train_seed)
    if not isinstance(trained, nn.Module):
        raise AnnotationError(f"train_fn must return the trained model, got {type(trained).__name__}")
    return trained


def _train_worker(
    rank: int,
    world_size: int,
    store: str,
    out: str,
    threads: int,
    model_factory: Callable[[], nn.Module],
    train_fn: TrainFn,
    images: torch.Tensor,
    masks: torch.Tensor,
    jobs: list[_Job],
) -> None:
    """One rank: trains models ``rank, rank + W, ...``; rank 0 gathers the state dicts to ``out``."""
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=30),
    )
    try:
        states = {
            job.index: _train_one(model_factory, train_fn, images, masks, job).state_dict()
            for job in jobs[rank::world_size]
        }
        gathered: list[object] | None = [None] * world_size if rank == 0 else None
        dist.gather_object(states, gathered, dst=0)
        if rank == 0:
            merged = {i: s for part in gathered for i, s in part.items()}
            torch.save(merged, out)
    finally:
        dist.destroy_process_group()


def _check_picklable(name: str, obj: object) -> None:
    try:
        pickle.dumps(obj)
    except Exception as exc:
        raise AnnotationError(
            f"workers > 1 sends {name} to other processes, but it cannot be pickled ({exc}); "
            "use a module-level function or a functools.partial of one"
        ) from exc


def train_ensemble(
    model_factory: Callable[[], nn.Module],
    images: torch.Tensor,
    masks: torch.Tensor,
    n_models: int = 5,
    *,
    seed: int = 0,
    train_fn: TrainFn | None = None,
    bootstrap: bool = True,
    workers: int = 1,
    threads: int | None = None,
    progress: bool = False,
) -> list[nn.Module]:
    """Train ``n_models`` models, each on its own bootstrap sample of ``(images, masks)``.

    Model ``i`` is built by ``model_factory()`` under a seed derived from ``(seed, i)``,
    trained by ``train_fn(model, images[s], masks[s], train_seed)`` on a sample ``s`` of
    ``len(images)`` indices drawn with replacement (``bootstrap=False``: all images).
    Everything derives from ``seed``, so the result does not depend on ``workers``.

    With ``workers > 1`` the models train in ``workers`` processes (``torch.distributed``,
    gloo, one rank per process; rank ``r`` trains models ``r, r + workers, ...``), each
    with ``threads`` torch threads (default: this process's threads divided among the
    workers); rank 0 gathers the state dicts and the models are rebuilt here with
    ``model_factory()`` and ``load_state_dict``. ``model_factory`` and ``train_fn`` must
    then be picklable (module-level functions), and a script must call this under
    ``if __name__ == "__main__":``. Results equal the sequential ones bit for bit when
    both run with the same number of threads (one thread each is deterministic).

    Example:
        >>> import functools, torch
        >>> from torch import nn
        >>> x = torch.rand(4, 1, 8, 8)
        >>> models = train_ensemble(
        ...     lambda: nn.Conv2d(1, 1, 3, padding=1), x, (x > 0.5).float(), 2,
        ...     train_fn=functools.partial(default_train, epochs=1),
        ... )
        >>> len(models), torch.equal(models[0].weight, models[1].weight)
        (2, False)
    """
    _check_count("n_models", n_models)
    _check_count("workers", workers)
    if len(images) < 1 or len(images) != len(masks):
        raise AnnotationError(
            f"images and masks must be non-empty and of equal length, got {len(images)} and {len(masks)}"
        )
    train_fn = default_train if train_fn is None else train_fn
    jobs = _jobs(len(images), n_models, seed, bootstrap)
    world_size = min(workers, n_models)
    if world_size == 1:
        models = []
        for job in tqdm(jobs, desc="training models", disable=not progress, leave=False):
            models.append(_train_one(model_factory, train_fn, images, masks, job))
        return models
    _check_picklable("model_factory", model_factory)
    _check_picklable("train_fn", train_fn)
    threads = threads if threads is not None else max(1, torch.get_num_threads() // world_size)
    _check_count("threads", threads)
    with tempfile.TemporaryDirectory(prefix="qseg-active-") as tmp:
        out = str(Path(tmp) / "states.pt")
        with tqdm(total=n_models, desc="training models", disable=not progress, leave=False) as bar:
            mp.spawn(
                _train_worker,
                args=(
                    world_size,
                    str(Path(tmp) / "store"),
                    out,
                    threads,
                    model_factory,
                    train_fn,
                    images,
                    masks,
                    jobs,
                ),
                nprocs=world_size,
                join=True,
            )
            bar.update(n_models)
        states = torch.load(out, weights_only=True)
    models = []
    for job in jobs:
        model = _build(model_factory, job)
        model.load_state_dict(states[job.index])
        models.append(model)
    return models
