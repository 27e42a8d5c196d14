"""The recipes for any model (``int8``, ``w4a8``) on one model of each family and structure
of the zoo (``SAMPLE``): ``prepare``, ``qseg.calibrate``, for ``w4a8`` a training step that
moves its learned scales, and ``convert``, whose model computes what the calibrated prepared
model computes (``Agreement.check``). ``test_zoo_deploy.py`` takes every model the whole way
to both runtimes with ``int8``.

Models whose converted model does not hold yet are marked ``xfail(strict=True)`` with what
was measured: they are the known limits, and one that starts to pass fails the run until its
mark is removed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from prepare.helpers import (
    assert_same_gradients,
    one_training_step,
    step_gradients,
    without_training_shortcuts,
)

import qseg
from zoo.catalog import zoo
from zoo.deploy import agreement, calibrated

# one model per family and structure: BatchNorm and InstanceNorm U-Nets, residual units,
# attention gates, GroupNorm residual blocks, transformers, 3d, pretrained-style encoders
SAMPLE = (
    "qseg.PaperUNet", "qseg.TwoHeadFCN", "monai.UNet2d", "monai.AttentionUnet2d", "monai.SegResNet2d",
    "monai.DynUNet2d", "monai.BasicUNet2d", "monai.UNETR2d", "monai.UNet3d",
    "monai.FlexibleUNet2d[efficientnet-b0]", "smp.Unet[resnet34]", "smp.FPN[mobilenet_v2]",
    "smp.DeepLabV3Plus[efficientnet-b0]", "torchvision.lraspp_mobilenet_v3_large",
)  # fmt: skip
ENTRIES_ALL = zoo()
ENTRIES = {name: entry for name, entry in ENTRIES_ALL.items() if name in SAMPLE}
RECIPES = ("int8", "w4a8")
# "model-recipe" -> what was measured where the converted model does not compute the prepared
# one yet (issue 14's converted-equals-prepared contract; strict xfail). None today. Two models
# that missed 99.9 % before (AttentionUnet2d int8 99.41 %, smp.Unet[resnet34] int8 99.54 % within
# one step) lost it to the BatchNorm fold's float rounding: a code on a tie in the prepared model
# (x / s = 79.5 at AttentionUnet's model.1.submodule.0.conv.1) sat 1-2 ulps off it in the
# converted one (79.49999) and each move spread one layer on. The prepared model now computes
# the fold as convert freezes it (qseg/accumulator.py), and both agree bit for bit.
KNOWN: dict[str, str] = {}


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", list(ENTRIES))
def test_recipe_calibrates_and_converts(name, recipe, zoo_packages, request):
    entry = ENTRIES[name]
    zoo_packages(entry)
    if f"{name}-{recipe}" in KNOWN:
        request.applymarker(pytest.mark.xfail(reason=KNOWN[f"{name}-{recipe}"], strict=True))
    qmodel, x, report = calibrated(entry, recipe)
    assert report is not None and report.ranges, "no activation range set"
    if recipe == "w4a8":
        scales = {n: p.detach().clone() for n, p in qmodel.named_parameters() if n.endswith("scale")}
        assert scales, "w4a8 has no learned scale"
        one_training_step(qmodel, x)
        moved = [
            n for n, p in qmodel.named_parameters() if n in scales and not torch.equal(scales[n], p.detach())
        ]
        assert moved, "no learned scale moved in a training step"
    qmodel.eval()
    agreement(qmodel, qseg.convert(qmodel), x).check()


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", list(ENTRIES))
def test_training_shortcuts_keep_every_gradient(name, recipe, zoo_packages):
    # prepare lets quantizers overwrite inputs nothing else reads and absorb the ReLU after an
    # unsigned grid (qseg/passes/overwrite_inputs.py, absorb_relu.py): that changes which
    # buffers a training step allocates, never what it computes, on real models too (shared
    # and in-place ReLU modules, residual blocks, attention gates)
    entry = ENTRIES[name]
    zoo_packages(entry)
    qmodel, x, _ = calibrated(entry, recipe)
    plain = without_training_shortcuts(copy.deepcopy(qmodel))
    (y, grads), (y0, grads0) = step_gradients(qmodel, x), step_gradients(plain, x)
    assert torch.equal(y, y0)
    assert_same_gradients(grads, grads0)
