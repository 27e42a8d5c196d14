"""qseg.train: the losses (binary and multi-class), the optimizer and learning-rate schedule
per epoch, seeded batches and flips, data checks, TernaryTanh annealing, INQ stages, predict."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qseg
import qseg.train
from qseg.errors import DataError, ModelError
from qseg.inq import Schedule
from qseg.quantizers import PowerOfTwo, TernaryTanh
from qseg.recipes.training import Training
from qseg.train import fit, loss_function, make_optimizer, predict, segmentation_logits


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: a second OpenMP thread only adds contention on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


FAST = Training(lr=0.05, epochs=3, batch_size=4, loss="bce_dice")


def data(n: int = 8, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose mask is a pixelwise function of the image (``x > 0.5``), so that a flip
    applied to one and not the other shows."""
    images = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return images, (images > 0.5).float()


def net(out_channels: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, out_channels, 1))


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def quiet_fit(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, **kwargs) -> list[float]:
    training = kwargs.pop("training", FAST)
    return fit(model, images, masks, training, progress=False, **kwargs)


# ---- losses ------------------------------------------------------------------------------------


def test_binary_dice_is_zero_for_a_perfect_prediction_and_near_one_for_the_inverse() -> None:
    _, target = data(2, 16)
    dice = loss_function("dice")
    assert float(dice(40.0 * (2 * target - 1), target)) == pytest.approx(0.0, abs=1e-6)
    # inverse: no overlap, so 1 - 1 / (sum p + sum t + 1) with sum p + sum t = all pixels
    assert float(dice(-40.0 * (2 * target - 1), target)) == pytest.approx(
        1 - 1 / (target.numel() + 1), abs=1e-6
    )


def test_binary_dice_on_even_odds_has_its_closed_form() -> None:
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1.0  # 8 of 16 pixels
    # p = 0.5 everywhere: 1 - (2 * 0.5 * 8 + 1) / (0.5 * 16 + 8 + 1)
    assert float(loss_function("dice")(torch.zeros(1, 1, 4, 4), target)) == pytest.approx(1 - 9 / 17)


def test_bce_is_torchs_binary_cross_entropy_and_bce_dice_their_mean() -> None:
    logits = torch.randn(3, 1, 5, 7, generator=torch.Generator().manual_seed(1))
    target = (torch.rand(3, 1, 5, 7, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    bce = loss_function("bce")(logits, target)
    assert torch.equal(bce, F.binary_cross_entropy_with_logits(logits, target))
    mixed = loss_function("bce_dice")(logits, target)
    assert float(mixed) == pytest.approx(
        0.5 * float(bce) + 0.5 * float(loss_function("dice")(logits, target))
    )


def test_multiclass_bce_is_cross_entropy_for_every_mask_layout() -> None:
    logits = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    classes = torch.randint(3, (2, 4, 5), generator=torch.Generator().manual_seed(4))
    expected = F.cross_entropy(logits, classes)
    bce = loss_function("bce")
    for target in (classes, classes.unsqueeze(1), classes.float(), classes.unsqueeze(1).float()):
        assert torch.equal(bce(logits, target), expected)


def test_multiclass_dice_is_the_mean_of_the_per_class_soft_dice() -> None:
    classes = torch.tensor([[[0, 0, 1, 2]]])  # 1 x 1 x 4: classes of 2, 1 and 1 pixels
    onehot = F.one_hot(classes, 3).movedim(-1, 1).float()
    dice = loss_function("dice")
    assert float(dice(40.0 * (2 * onehot - 1), classes)) == pytest.approx(0.0, abs=1e-6)
    # wrong everywhere: per class 1 / (sum p + sum t + 1), with sum p = sum t = pixels of that class
    wrong = torch.tensor([[[1, 2, 0, 0]]])  # each pixel predicted as some other class
    inverted = 40.0 * (2 * F.one_hot(wrong, 3).movedim(-1, 1).float() - 1)
    expected = 1 - (1 / (2 + 2 + 1) + 1 / (1 + 1 + 1) + 1 / (1 + 1 + 1)) / 3
    assert float(dice(inverted, classes)) == pytest.approx(expected, abs=1e-6)
    # even odds: p = 1/3 everywhere; class c with n_c pixels: (2 n_c / 3 + 1) / (4 / 3 + n_c + 1)
    per_class = [(2 * n / 3 + 1) / (4 / 3 + n + 1) for n in (2, 1, 1)]
    assert float(dice(torch.zeros(1, 3, 1, 4), classes)) == pytest.approx(1 - sum(per_class) / 3)


def test_a_one_channel_loss_equals_its_two_class_loss_only_where_it_should() -> None:
    # two classes with logits (0, z) are a sigmoid of z: cross entropy equals binary cross-entropy
    z = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(5))
    target = (z > 0.2).float()
    two = torch.cat([torch.zeros_like(z), z], dim=1)
    bce = loss_function("bce")
    assert float(bce(two, target.long())) == pytest.approx(float(bce(z, target)), rel=1e-6)


def test_loss_errors_name_what_to_fix() -> None:
    with pytest.raises(DataError, match="unknown loss 'focal'"):
        loss_function("focal")
    with pytest.raises(DataError, match="need class-index masks"):
        loss_function("dice")(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))


# ---- optimizer and learning-rate schedule --------------------------------------------------------


def test_make_optimizer_follows_the_training_and_skips_frozen_parameters() -> None:
    model = net()
    model[0].bias.requires_grad_(False)
    sgd = make_optimizer(model, Training(optimizer="sgd", lr=0.1, momentum=0.5, weight_decay=0.01))
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["momentum"] == 0.5 and sgd.defaults["weight_decay"] == 0.01
    params = [p for group in sgd.param_groups for p in group["params"]]
    assert len(params) == 3 and all(p is not model[0].bias for p in params)
    assert type(make_optimizer(model, Training(optimizer="adam"))) is torch.optim.Adam
    assert type(make_optimizer(model, Training(optimizer="adamw"))) is torch.optim.AdamW


@pytest.mark.parametrize(
    ("training", "expected"),
    [
        (Training(lr=0.1, lr_schedule="cosine"), [0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05,
                                                  0.1 * (1 + math.cos(3 * math.pi / 4)) / 2]),
        (Training(lr=0.1, lr_schedule="step", lr_drops=(0.5,)), [0.1, 0.1, 0.01, 0.01]),
        (Training(lr=0.1, lr_schedule="step", lr_drops=(0.25, 0.75), lr_drop_factor=0.5),
         [0.1, 0.05, 0.05, 0.025]),
        (Training(lr=0.1, lr_schedule="constant"), [0.1, 0.1, 0.1, 0.1]),
    ],
)  # fmt: skip
def test_the_learning_rate_follows_the_schedule_epoch_by_epoch(
    training: Training, expected: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[float] = []
    real = qseg.train.make_optimizer

    def recording(model: nn.Module, training: Training) -> torch.optim.Optimizer:
        optimizer = real(model, training)
        optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(qseg.train, "make_optimizer", recording)
    images, masks = data(4)
    # batch size 4 of 4 images: one step per epoch
    fit(net(), images, masks, training, epochs=4, progress=False)
    assert seen == pytest.approx(expected, rel=1e-12)


# ---- seeded batches and augmentation --------------------------------------------------------------


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    images, masks = data()
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        runs[name] = net()
        losses = quiet_fit(runs[name], images, masks, seed=seed)
        assert len(losses) == FAST.epochs and all(math.isfinite(v) for v in losses)
    assert states_equal(runs["a"], runs["b"])
    assert not states_equal(runs["a"], runs["c"])


def test_fit_leaves_the_global_rng_alone_and_the_model_in_eval_mode() -> None:
    images, masks = data()
    model = net()
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    quiet_fit(model, images, masks)
    assert torch.equal(torch.rand(4), expected)
    assert not model.training


def reference_fit(
    model: nn.Module, images: torch.Tensor, masks: torch.Tensor, training: Training, seed: int
) -> None:
    """The binary loop as fit has always run it: Adam, per-epoch lr, a seeded order, then
    per batch a horizontal flip, a vertical flip and (square crops) a transpose, each with
    probability 1/2, all drawn from one generator."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=training.lr)
    model.train()
    for epoch in range(training.epochs):
        for group in optimizer.param_groups:
            group["lr"] = training.lr_at(epoch / training.epochs)
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(images), training.batch_size):
            x, y = (
                images[order[start : start + training.batch_size]],
                masks[order[start : start + training.batch_size]],
            )
            for dim in (-1, -2):
                if torch.rand((), generator=gen) < 0.5:
                    x, y = x.flip(dim), y.flip(dim)
            if torch.rand((), generator=gen) < 0.5:
                x, y = x.transpose(-1, -2), y.transpose(-1, -2)
            logits = model(x)
            prob = torch.sigmoid(logits)
            dice = 1 - (2 * (prob * y).sum() + 1) / (prob.sum() + y.sum() + 1)
            loss = 0.5 * F.binary_cross_entropy_with_logits(logits, y) + 0.5 * dice
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def test_one_channel_training_is_the_reference_loop_bit_for_bit() -> None:
    images, masks = data(6)
    ours, reference = net(), net()
    quiet_fit(ours, images, masks, seed=7)
    reference_fit(reference, images, masks, FAST, seed=7)
    assert states_equal(ours, reference)


def seen_batches(augment: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (images, masks) of every training step, as the loss receives them."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = qseg.train.loss_function

    def recording(name: str):
        loss = real(name)

        def wrapped(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            seen.append((batch_inputs[-1], target))
            return loss(logits, target)

        return wrapped

    batch_inputs: list[torch.Tensor] = []
    model = net()
    model.register_forward_pre_hook(lambda m, args: batch_inputs.append(args[0]) if m.training else None)
    images, masks = data(8, seed=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qseg.train, "loss_function", recording)
        quiet_fit(
            model, images, masks, augment=augment, training=Training(epochs=4, batch_size=4, loss="bce")
        )
    return seen


def is_rows_of(batch: torch.Tensor, images: torch.Tensor) -> bool:
    return all(any(torch.equal(row, image) for image in images) for row in batch)


def test_augmentation_flips_images_and_masks_together_and_only_when_asked() -> None:
    images, _ = data(8, seed=1)
    plain = seen_batches(augment=False)
    flipped = seen_batches(augment=True)
    assert len(plain) == len(flipped) == 8  # 4 epochs of 2 steps
    for x, y in plain + flipped:
        assert torch.equal(y, (x > 0.5).float())  # masks travel with their images
    assert all(is_rows_of(x, images) for x, _ in plain)
    changed = [x for x, _ in flipped if not is_rows_of(x, images)]
    assert changed, "augment=True never changed a batch"
    # the 8 symmetries of a square: optional flips of each axis, then an optional transpose
    symmetries = [
        lambda t, h=h, v=v, tr=tr: (lambda u: u.transpose(-1, -2) if tr else u)(
            (lambda u: u.flip(-2) if v else u)(t.flip(-1) if h else t)
        )
        for h in (0, 1)
        for v in (0, 1)
        for tr in (0, 1)
    ]
    for x in changed:  # one symmetry applied to the whole batch, nothing else
        assert any(is_rows_of(x, torch.stack([s(image) for image in images])) for s in symmetries)


# ---- multi-class -------------------------------------------------------------------------------


def test_multiclass_fit_learns_from_index_masks_in_either_layout() -> None:
    images, masks = data(8)
    classes = masks.squeeze(1).long() * 2  # classes 0 and 2 of 3
    results = []
    for layout in (classes, classes.unsqueeze(1).float()):
        model = net(out_channels=3)
        with torch.no_grad():
            before = F.cross_entropy(model(images), classes)
        losses = quiet_fit(model, images, layout, training=Training(lr=0.05, epochs=15, loss="bce_dice"))
        with torch.no_grad():
            after = F.cross_entropy(model(images), classes)
        assert after < 0.7 * before and losses[-1] < losses[0]
        results.append(model)
    assert states_equal(*results)  # the layout of the masks changes nothing


def test_multi_head_models_train_on_their_first_output() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = net(out_channels=2)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.body(x)
            return {"out": out, "aux": out.detach() * 0}

    images, masks = data(4)
    two, plain = TwoHeads(), net(out_channels=2)
    quiet_fit(two, images, masks.long())
    quiet_fit(plain, images, masks.long())
    assert states_equal(two.body, plain)


# ---- data checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "masks", "channels", "match"),
    [
        (torch.rand(4, 1, 8, 8), torch.zeros(3, 1, 8, 8), 1, "same N > 0"),
        (torch.rand(4, 1, 8, 8), torch.zeros(4, 1, 8, 6), 1, "differ in H x W"),
        (torch.rand(4, 8, 8), torch.zeros(4, 1, 8, 8), 1, "images N x C x H x W"),
        (torch.rand(0, 1, 8, 8), torch.zeros(0, 1, 8, 8), 1, "same N > 0"),
        (torch.rand(4, 1, 8, 8), torch.zeros(4, 2, 8, 8), 1, "masks N x 1 x H x W"),
        (torch.rand(4, 1, 8, 8), torch.full((4, 1, 8, 8), 0.5), 1, "only 0 and 1"),
        (torch.rand(4, 1, 8, 8), torch.full((4, 1, 8, 8), 2.0), 1, "only 0 and 1"),
        (torch.rand(4, 1, 8, 8), torch.zeros(4, 8, 8), 1, "one output channel, so masks must be binary"),
        (torch.rand(4, 1, 8, 8), torch.full((4, 8, 8), 3), 3, r"class indices in \[0, 3\).*from 3 to 3"),
        (torch.rand(4, 1, 8, 8), torch.full((4, 1, 8, 8), -1), 3, r"class indices in \[0, 3\)"),
        (torch.rand(4, 1, 8, 8), torch.full((4, 8, 8), 1.5), 3, "not integers"),
        ([[0.0]], torch.zeros(4, 1, 8, 8), 1, "must be tensors"),
    ],
)
def test_bad_data_raises_and_leaves_the_model_untouched(images, masks, channels: int, match: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Conv2d(2, channels, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError, match=match):
        quiet_fit(model, images, masks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_settings_and_bad_models_raise() -> None:
    images, masks = data(4)
    for epochs in (0, -1, 1.5, True):
        with pytest.raises(DataError, match="epochs must be a positive integer"):
            quiet_fit(net(), images, masks, epochs=epochs)
    shrinking = nn.Conv2d(1, 1, 3)  # no padding: 6 x 6 logits for 8 x 8 masks
    with pytest.raises(DataError, match="logits 1 x K x H x W of the image's H x W"):
        quiet_fit(shrinking, images, masks)
    with pytest.raises(DataError, match="the training loss became nan"):
        quiet_fit(net(), torch.full_like(images, float("nan")), masks)

    class NoLogits(nn.Module):
        def forward(self, x: torch.Tensor) -> list:
            return [] if x.numel() else [x]

    with pytest.raises(ModelError, match="NoLogits returned list"):
        quiet_fit(NoLogits(), images, masks)


# ---- TernaryTanh and INQ --------------------------------------------------------------------------


def test_ternary_tanh_is_annealed_from_start_to_end_over_the_epochs() -> None:
    images, masks = data(4)
    torch.manual_seed(0)
    act = TernaryTanh(beta_start=3.0, beta_end=8.0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), act, nn.Conv2d(4, 1, 1))
    betas: list[float] = []
    act.register_forward_pre_hook(lambda m, _: betas.append(float(m.beta)) if m.training else None)
    quiet_fit(model, images, masks, epochs=5)  # one step per epoch
    assert betas == pytest.approx([3.0, 4.25, 5.5, 6.75, 8.0])
    assert float(act.beta) == act.beta_end


INQ5 = {
    "name": "inq",
    "weights": {"kind": "power_of_two", "bits": 5},
    "keep_float": {"first": False, "last": False},
}


def inq_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))
    return qseg.prepare(model, INQ5, example_inputs=(torch.rand(1, 1, 8, 8),))


def inq_layers(qmodel: nn.Module) -> list[nn.Module]:
    return [m for m in qmodel.modules() if isinstance(getattr(m, "weight_quant", None), PowerOfTwo)]


def test_inq_stages_split_the_epochs_and_end_with_every_weight_on_the_grid() -> None:
    qmodel = inq_model()
    layers = inq_layers(qmodel)
    assert len(layers) == 2
    schedule = Schedule(qmodel, (0.5, 1.0))
    snapshots: list[tuple[int, list[torch.Tensor], list[torch.Tensor]]] = []

    def snapshot(module: nn.Module, _: tuple) -> None:
        if module.training:  # the training steps, one per epoch (4 images, batch 4)
            weights = [layer.weight.detach().clone() for layer in layers]
            frozen = [layer.weight_quant.frozen.clone() for layer in layers]
            snapshots.append((schedule.stage, weights, frozen))

    qmodel.register_forward_pre_hook(snapshot)
    images, masks = data(4)
    quiet_fit(qmodel, images, masks, epochs=4, training=Training(lr=0.05, batch_size=4), inq=schedule)
    assert schedule.done
    assert [stage for stage, _, _ in snapshots] == [1, 1, 2, 2]  # two epochs per stage

    for i, layer in enumerate(layers):
        n1, n2 = layer.weight_quant.bounds()
        w = layer.weight.detach()
        grid = torch.tensor([0.0] + [s * 2.0**p for p in range(n2, n1 + 1) for s in (1, -1)])
        assert torch.isin(w, grid).all()
        first_frozen = snapshots[0][2][i]
        assert 0 < int(first_frozen.sum()) < w.numel()
        # stage 1: the frozen half never moves while the float half trains
        for _, weights, frozen in snapshots[1:]:
            assert torch.equal(weights[i][first_frozen], snapshots[0][1][i][first_frozen])
            assert (frozen[i] | ~first_frozen).all()  # the frozen set only grows
        assert torch.equal(w[first_frozen], snapshots[0][1][i][first_frozen])
        assert not torch.equal(snapshots[1][1][i][~first_frozen], snapshots[0][1][i][~first_frozen])
        # stage 2: every weight frozen, nothing moves during its epochs
        assert snapshots[2][2][i].all()
        assert torch.equal(snapshots[3][1][i], snapshots[2][1][i])
        assert torch.equal(w, snapshots[2][1][i])


def test_inq_needs_an_epoch_per_remaining_stage() -> None:
    qmodel = inq_model()
    schedule = Schedule(qmodel)  # 4 stages
    images, masks = data(4)
    with pytest.raises(DataError, match=r"at least one epoch per remaining stage \(4\); got 3"):
        quiet_fit(qmodel, images, masks, epochs=3, inq=schedule)
    assert schedule.stage == 0  # nothing advanced
    finished = inq_model()
    done = Schedule(finished, (1.0,))
    done.advance()
    with pytest.raises(DataError, match="already at its last stage"):
        quiet_fit(finished, images, masks, epochs=3, inq=done)


# ---- predict ------------------------------------------------------------------------------------


def test_predict_pads_to_a_multiple_of_eight_and_crops_back() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3, padding=1))
    model.train()
    x = torch.rand(4, 1, 16, 24, generator=torch.Generator().manual_seed(0))
    out = predict(model, x)
    assert not model.training
    with torch.no_grad():
        assert torch.equal(out, model(x))  # already a multiple of 8: no padding, one batch of 4
    assert torch.allclose(predict(model, x, batch_size=3), out, atol=1e-6)
    odd = x[..., :10, :13]
    out = predict(model, odd)
    assert out.shape == (4, 3, 10, 13)
    with torch.no_grad():
        padded = model(F.pad(odd, (0, 3, 0, 6), mode="reflect"))
    assert torch.equal(out, padded[..., :10, :13])
    # away from the padded border the crop equals the unpadded model (two 3x3 convs reach 2 pixels)
    with torch.no_grad():
        assert torch.allclose(out[..., :8, :11], model(odd)[..., :8, :11], atol=1e-6)


def test_segmentation_logits_takes_the_first_output() -> None:
    x = torch.rand(1, 1, 2, 2)
    assert segmentation_logits(lambda_module(lambda t: (t, t + 1)), x) is x
    assert torch.equal(segmentation_logits(lambda_module(lambda t: [{"out": t * 2}]), x), x * 2)
    with pytest.raises(ModelError, match="returned dict"):
        segmentation_logits(lambda_module(lambda t: {} if t.numel() else None), x)


def lambda_module(fn) -> nn.Module:
    class Wrapped(nn.Module):
        def forward(self, x: torch.Tensor):
            return fn(x)

    return Wrapped()


def test_bnn_latent_weights_are_clipped_to_one_after_every_step() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 1, 1),
    )
    recipe = {"name": "bnn", "weights": {"kind": "binary"}, "keep_float": {"first": False, "last": False}}
    qmodel = qseg.prepare(net, recipe, example_inputs=torch.rand(1, 1, 8, 8))
    # a large rate drives latent weights far past 1 unless they are clipped
    x = torch.rand(8, 1, 8, 8)
    fit(
        qmodel,
        x,
        (x > 0.5).float(),
        Training(lr=5.0, epochs=2, batch_size=4, lr_schedule="constant"),
        progress=False,
    )
    latent = [m.weight for m in qmodel.modules() if hasattr(m, "weight_quant")]
    assert len(latent) == 3 and all(float(w.abs().max()) <= 1.0 for w in latent)
    assert any(float(w.abs().max()) == 1.0 for w in latent)  # the clip was reached
    # float layers are left alone
    plain = nn.Sequential(nn.Conv2d(1, 1, 1))
    fit(
        plain,
        x,
        (x > 0.5).float(),
        Training(lr=5.0, epochs=2, batch_size=4, lr_schedule="constant"),
        progress=False,
    )
    assert float(plain[0].weight.abs().max()) > 1.0
