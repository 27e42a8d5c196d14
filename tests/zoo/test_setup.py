"""The zoo's own machinery: the missing-package rule, the torchvision shim, the catalog."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from zoo import tv_shim
from zoo.catalog import Entry, available, missing, zoo
from zoo.conftest import REQUIRE_ENV, require_packages

ABSENT = Entry(lambda: torch.nn.Identity(), lambda: torch.zeros(1), "monai", 2, ("qseg_no_such_package",))


def test_missing_package_skips_with_a_reason(monkeypatch):
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    assert missing(ABSENT) == ["qseg_no_such_package"] and not available(ABSENT)
    with pytest.raises(pytest.skip.Exception, match="not installed: qseg_no_such_package"):
        require_packages(ABSENT)


def test_missing_package_fails_when_the_zoo_is_required(monkeypatch):
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_ENV}=1"):
        require_packages(ABSENT)


def test_catalog_lists_every_family_without_importing_them():
    entries = zoo()
    assert {e.family for e in entries.values()} == {"qseg", "monai", "smp", "torchvision", "nnunet"}
    assert all(e.dims in (2, 3) for e in entries.values())
    assert available(entries["qseg.PaperUNet"])


SOURCE = """
import torch
import torchvision

@torch.library.register_fake("torchvision::nms")
def meta_nms(dets, scores, iou_threshold): ...

@register_meta("roi_align")
def meta_roi_align(input, rois): ...

if torchvision.extension._has_ops():
    torch.library.register_autograd("torchvision::roi_pool", None)

torch.library.register_fake("torchvision::qnms")(lambda *a: None)
torch.library.register_fake("other::op")(lambda *a: None)
"""


def test_shim_finds_the_ops_registered_unconditionally_at_import():
    # roi_align is registered through a helper that checks _has_ops(); roi_pool under an if
    assert tv_shim._registered_at_import(SOURCE) == ["nms", "qnms"]


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision not installed")
def test_shim_leaves_a_working_torchvision_alone():
    import torchvision

    if torchvision.extension._has_ops():
        # the compiled ops loaded: the shim declared nothing
        assert tv_shim.SHIMMED_OPS == []
    else:
        # the ops torchvision registers fakes for exist (declared by the shim), without kernels
        assert set(tv_shim.SHIMMED_OPS) >= {"nms"}
        assert torch.ops.torchvision.nms is not None
