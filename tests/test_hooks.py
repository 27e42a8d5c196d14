"""qseg.training_hooks: what fit does for quantized models, available to any loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qseg
from qseg.models import PaperUNet


def prepared(recipe) -> nn.Module:
    torch.manual_seed(0)
    return qseg.prepare(PaperUNet(widths=(4, 8, 8, 8)), recipe, example_inputs=torch.randn(1, 1, 16, 16))


def own_loop(qmodel: nn.Module, hooks, epochs: int = 3, steps: int = 2) -> None:
    optimizer = torch.optim.Adam(qmodel.parameters(), 1e-2)
    for epoch in range(epochs):
        qmodel.train()
        hooks.epoch(epoch / max(epochs - 1, 1))
        for _ in range(steps):
            loss = qmodel(torch.randn(2, 1, 16, 16)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            hooks.step()


def test_a_plain_loop_with_the_hooks_anneals_and_clips_like_fit():
    q = prepared("unet-bnn")
    hooks = qseg.training_hooks(q)
    assert len(hooks.clipped) == 13 and not hooks.annealed
    own_loop(q, hooks)
    assert all(float(w.detach().abs().max()) <= 1.0 for w in hooks.clipped)
    t = prepared("unet-ternarynet")
    hooks = qseg.training_hooks(t)
    assert len(hooks.annealed) == 17  # 14 after BatchNorm, 3 on the upsampled decoder inputs
    own_loop(t, hooks)
    assert all(float(m.beta) == pytest.approx(8.0) for m in hooks.annealed)  # annealed to the end


def test_learned_scales_and_norm_statistics_freeze_at_their_points():
    weights = {"kind": "int", "bits": 4, "channel_axis": 0, "learn_scale": True}
    q = prepared(qseg.recipes.load("unet-qa6.0-qw0.4").to_dict() | {"name": "w4", "weights": weights})
    hooks = qseg.training_hooks(q, freeze_ranges_at=0.5, freeze_norms_at=0.5)
    assert len(hooks.learned_scales) == 13 and len(hooks.norms) == 14
    optimizer = torch.optim.Adam(q.parameters(), 1e-2)
    seen = []
    for epoch in range(3):  # progress 0, 0.5, 1
        q.train()
        hooks.epoch(epoch / 2)
        scales = [s.detach().clone() for s in hooks.learned_scales]
        stats = [n.running_mean.clone() for n in hooks.norms]
        loss = q(torch.randn(2, 1, 16, 16)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hooks.step()
        moved_scales = any(not torch.equal(a, s) for a, s in zip(scales, hooks.learned_scales, strict=True))
        moved_stats = any(not torch.equal(a, n.running_mean) for a, n in zip(stats, hooks.norms, strict=True))
        seen.append((moved_scales, moved_stats))
    assert seen == [(True, True), (False, False), (False, False)]


def test_fit_uses_the_hooks(monkeypatch):
    from qseg import train
    from qseg.data import synthetic_nuclei

    calls = []
    real = train.training_hooks

    def recording(model):
        hooks = real(model)
        epoch, step = hooks.epoch, hooks.step
        hooks.epoch = lambda p: (calls.append(("epoch", p)), epoch(p))[1]
        hooks.step = lambda: (calls.append(("step",)), step())[1]
        return hooks

    monkeypatch.setattr(train, "training_hooks", recording)
    x, y = synthetic_nuclei(4, size=16)
    train.fit(prepared("unet-ternarynet"), x, y, qseg.recipes.Recipe("t").training, epochs=2, progress=False)
    assert [c for c in calls if c[0] == "epoch"] == [("epoch", 0.0), ("epoch", 1.0)]
    assert sum(c[0] == "step" for c in calls) == 2  # 4 images, batch 4, 2 epochs


def test_freeze_points_are_validated():
    with pytest.raises(qseg.QuantizerError, match="freeze_norms_at must be a fraction"):
        qseg.training_hooks(nn.Conv2d(1, 1, 1), freeze_norms_at=1.5)
    with pytest.raises(qseg.QuantizerError, match="progress must be in"):
        qseg.training_hooks(nn.Conv2d(1, 1, 1)).epoch(2.0)
