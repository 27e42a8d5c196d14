"""The annotation loop around ``suggest``: ensembles on bootstrap samples, the default trainer
(``qseg.train.fit``), moving images from the pool to the labelled set, and parallel training
in 2 processes."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qseg
from qseg.active import (
    DEFAULT_TRAINING,
    AnnotationError,
    AnnotationLoop,
    annotate_loop,
    default_train,
    ensemble,
    train_ensemble,
)
from qseg.models import PaperUNet, TwoHeadFCN
from qseg.quantizers import PowerOfTwo
from qseg.recipes.training import Training
from qseg.train import fit

one_epoch = functools.partial(default_train, epochs=1)
tiny_unet = functools.partial(PaperUNet, widths=(2, 2, 2, 2))


def blobs(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images with one bright disk each, and the disks as masks ``(n, 1, size, size)``."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.randint(4, size - 4, (n, 2), generator=gen)
    radii = torch.randint(2, 5, (n,), generator=gen)
    dist2 = (yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2
    masks = (dist2 <= radii[:, None, None] ** 2).float().unsqueeze(1)
    images = masks * 0.8 + 0.1 + 0.1 * torch.randn(n, 1, size, size, generator=gen)
    return images, masks


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- training ----------------------------------------------------------------------------------


def test_default_train_learns_blobs() -> None:
    images, masks = blobs(16)
    torch.manual_seed(0)
    net = small_net()
    with torch.no_grad():
        before = F.binary_cross_entropy_with_logits(net(images), masks)
    assert (
        default_train(net, images, masks, seed=0, training=replace(DEFAULT_TRAINING, epochs=30, lr=1e-2))
        is net
    )
    with torch.no_grad():
        logits = net(images)
    after = F.binary_cross_entropy_with_logits(logits, masks)
    assert after < 0.5 * before
    assert ((logits > 0).float() == masks).float().mean() > 0.95


def test_default_train_handles_multiclass_logits_with_index_masks() -> None:
    images, masks = blobs(8)
    torch.manual_seed(0)
    net = TwoHeadFCN(in_channels=1, widths=(2, 4, 4), num_classes=2)
    classes = masks.squeeze(1).long()
    net.eval()
    with torch.no_grad():
        before = F.cross_entropy(net(images)[0], classes)
    default_train(net, images, classes, seed=0, training=replace(DEFAULT_TRAINING, epochs=10, lr=1e-2))
    net.eval()
    with torch.no_grad():
        after = F.cross_entropy(net(images)[0], classes)
    assert after < before


def test_default_train_is_fit_with_the_default_training_and_seeded_flips() -> None:
    assert Training(epochs=5, lr=1e-3, loss="bce_dice", batch_size=4) == DEFAULT_TRAINING
    images, masks = blobs(6)
    nets = []
    for _ in range(3):
        torch.manual_seed(0)
        nets.append(small_net())
    default_train(nets[0], images, masks, seed=3, epochs=2)
    fit(nets[1], images, masks, DEFAULT_TRAINING, epochs=2, seed=3, progress=False)
    assert states_equal(nets[0], nets[1])
    default_train(nets[2], images, masks, seed=3, epochs=2, augment=False)
    assert not states_equal(nets[0], nets[2])  # the flips are part of what the seed decides
    with pytest.raises(AnnotationError, match=r"training must be a qseg\.recipes\.training\.Training"):
        default_train(small_net(), images, masks, seed=0, training={"epochs": 1})


def inq_net() -> nn.Module:
    recipe = {
        "name": "inq",
        "weights": {"kind": "power_of_two", "bits": 5},
        "keep_float": {"first": False, "last": False},
    }
    return qseg.prepare(small_net(), recipe, example_inputs=(torch.rand(1, 1, 16, 16),))


def test_default_train_with_inq_portions_ends_with_every_weight_on_the_grid() -> None:
    images, masks = blobs(4)
    train = functools.partial(default_train, epochs=2, inq_portions=(0.5, 1.0))
    models = train_ensemble(inq_net, images, masks, 2, train_fn=train)
    for model in models:
        layers = [m for m in model.modules() if isinstance(getattr(m, "weight_quant", None), PowerOfTwo)]
        assert len(layers) == 2
        for layer in layers:
            assert layer.weight_quant.fully_quantized
            assert torch.equal(layer.weight_quant(layer.weight.detach()), layer.weight.detach())


def test_ensemble_models_see_bootstrap_samples_from_derived_seeds() -> None:
    images, masks = blobs(8)
    calls = []

    def record(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
        calls.append((x, y, seed))
        return model

    models = train_ensemble(small_net, images, masks, 3, seed=5, train_fn=record)
    assert len(models) == 3 and len(calls) == 3
    rows = [[next(i for i in range(8) if torch.equal(row, images[i])) for row in x] for x, _, _ in calls]
    for (x, y, _), picked in zip(calls, rows, strict=True):
        assert len(x) == 8  # as many draws as images, with replacement
        assert torch.equal(y, masks[picked])  # masks travel with their images
    assert any(len(set(r)) < 8 for r in rows)  # with replacement: repeats happen (8 draws of 8)
    assert len({tuple(r) for r in rows}) == 3  # each model its own sample
    assert len({seed for _, _, seed in calls}) == 3
    assert not states_equal(models[0], models[1])  # different initial weights

    again = train_ensemble(small_net, images, masks, 3, seed=5, train_fn=record)
    assert all(states_equal(a, b) for a, b in zip(models, again, strict=True))
    assert all(torch.equal(calls[i][0], calls[3 + i][0]) for i in range(3))


def test_without_bootstrap_every_model_sees_the_whole_set() -> None:
    images, masks = blobs(5)
    seen = []

    def record(model: nn.Module, x: torch.Tensor, *_: object) -> nn.Module:
        seen.append(x)
        return model

    train_ensemble(small_net, images, masks, 2, train_fn=record, bootstrap=False)
    assert all(torch.equal(x, images) for x in seen)


def test_training_does_not_touch_the_global_rng() -> None:
    images, masks = blobs(4)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_ensemble(small_net, images, masks, 2, train_fn=one_epoch)
    assert torch.equal(torch.rand(3), expected)


def test_parallel_training_in_two_processes_equals_sequential() -> None:
    images, masks = blobs(8)
    # 3 models on 2 ranks: rank 0 trains models 0 and 2, rank 1 model 1; default_train flips
    # batches (augment=True), so equality covers the seeding of the flips as well as of the order
    sequential = train_ensemble(tiny_unet, images, masks, 3, seed=1, train_fn=one_epoch)
    parallel = train_ensemble(tiny_unet, images, masks, 3, seed=1, train_fn=one_epoch, workers=2, threads=1)
    assert len(parallel) == 3
    for a, b in zip(sequential, parallel, strict=True):
        assert states_equal(a, b)
    assert not states_equal(sequential[0], sequential[2])
    untrained = train_ensemble(tiny_unet, images, masks, 1, seed=1, train_fn=lambda m, *_: m)[0]
    assert not states_equal(untrained, sequential[0])  # training happened in the workers


def test_training_errors_name_what_to_fix() -> None:
    images, masks = blobs(4)
    with pytest.raises(AnnotationError, match="train_fn must return the trained model"):
        train_ensemble(small_net, images, masks, 2, train_fn=lambda *_: None)
    with pytest.raises(AnnotationError, match=r"model_factory must return an nn\.Module"):
        train_ensemble(lambda: "net", images, masks, 2, train_fn=one_epoch)
    with pytest.raises(AnnotationError, match="cannot be pickled"):
        train_ensemble(lambda: small_net(), images, masks, 2, workers=2)
    with pytest.raises(AnnotationError, match="equal length"):
        train_ensemble(small_net, images, masks[:3], 2)
    with pytest.raises(AnnotationError, match="n_models must be a positive integer"):
        train_ensemble(small_net, images, masks, 0)


# ---- the loop ------------------------------------------------------------------------------------


def run_loop(label, rounds: int = 2, **kwargs) -> AnnotationLoop:
    images, masks = blobs(14)
    options = {"n_models": 2, "k": 3, "candidates": 5, "train_fn": one_epoch, "progress": False, **kwargs}
    loop = AnnotationLoop(small_net, images[:4], masks[:4], images[4:], label, **options)
    loop.run(rounds)
    return loop


def test_each_round_moves_the_suggested_images_and_their_masks() -> None:
    images, masks = blobs(14)
    pool, pool_masks = images[4:], masks[4:]
    loop = run_loop(pool_masks)
    assert [r.index for r in loop.history] == [0, 1]
    selected = [i for r in loop.history for i in r.selected]
    assert len(selected) == len(set(selected)) == 6
    assert torch.equal(loop.images, torch.cat([images[:4], pool[selected]]))
    assert torch.equal(loop.masks, torch.cat([masks[:4], pool_masks[selected]]))
    assert loop.pool_indices == [i for i in range(10) if i not in selected]
    for r in loop.history:
        # the suggestion indexes the pool of its round; selected are original pool indices
        assert r.selected == [r.pool_indices[i] for i in r.suggestion.indices]
        assert set(r.suggestion.indices) <= set(r.suggestion.candidates)
        assert len(r.suggestion.uncertainty) == len(r.pool_indices)
    assert loop.history[1].pool_indices == [i for i in range(10) if i not in loop.history[0].selected]
    assert len(loop.models) == 2


def test_a_label_callback_gets_original_pool_indices_and_gives_the_same_result() -> None:
    _, masks = blobs(14)
    asked = []

    def label(indices: list[int]) -> torch.Tensor:
        asked.append(list(indices))
        return masks[4:][indices]

    with_callback = run_loop(label)
    with_tensor = run_loop(masks[4:])
    assert asked == [r.selected for r in with_callback.history]
    assert [r.selected for r in with_callback.history] == [r.selected for r in with_tensor.history]
    assert torch.equal(with_callback.masks, with_tensor.masks)


def test_the_loop_stops_when_the_pool_is_empty() -> None:
    images, masks = blobs(7)
    loop = annotate_loop(
        small_net, images[:4], masks[:4], images[4:], masks[4:], rounds=5, n_models=2, k=2, train_fn=one_epoch,
        progress=False,
    )  # fmt: skip
    assert [len(r.selected) for r in loop.history] == [2, 1]
    assert loop.pool_indices == [] and len(loop.images) == 7
    with pytest.raises(AnnotationError, match="the pool is empty"):
        loop.step()


def test_loop_errors_name_what_to_fix() -> None:
    images, masks = blobs(6)
    with pytest.raises(AnnotationError, match=r"label\(.*\) must return masks of shape"):
        run_loop(lambda indices: masks[: len(indices) + 1])
    with pytest.raises(AnnotationError, match="pool must be a tensor"):
        AnnotationLoop(small_net, images[:2], masks[:2], list(images[2:]), masks[2:])
    with pytest.raises(AnnotationError, match="pool's image shape"):
        AnnotationLoop(small_net, images[:2, :, :8], masks[:2], images[2:], masks[2:])
    with pytest.raises(AnnotationError, match=r"one mask \(1, 16, 16\) per pool image"):
        AnnotationLoop(small_net, images[:2], masks[:2], images[2:], masks[3:])
    with pytest.raises(AnnotationError, match="k must be"):
        AnnotationLoop(small_net, images[:2], masks[:2], images[2:], masks[2:], k=0)
    empty = AnnotationLoop(small_net, images[:0], masks[:0], images, masks, progress=False)
    with pytest.raises(AnnotationError, match="no labelled images"):
        empty.step()
    with pytest.raises(AnnotationError, match="rounds must be"):
        empty.run(0)


def test_default_train_with_inq_trains_float_first_then_the_stages(monkeypatch) -> None:
    calls = []

    def record(*args, epochs, seed, inq=None, **kwargs):  # noqa: ARG001
        calls.append((epochs, seed, None if inq is None else inq.stage))

    monkeypatch.setattr(ensemble, "fit", record)
    images, masks = blobs(4)
    default_train(inq_net(), images, masks, seed=3, epochs=9, inq_portions=(0.5, 0.75, 1.0))
    assert calls == [(4, 3, None), (5, 4, 0)]  # INQ quantizes a trained network
    calls.clear()
    # too few epochs for a float half: every epoch goes to the stages
    default_train(inq_net(), images, masks, seed=3, epochs=3, inq_portions=(0.5, 0.75, 1.0))
    assert calls == [(3, 4, 0)]
