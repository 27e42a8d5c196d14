"""A catalog of segmentation models from qseg, MONAI, segmentation_models_pytorch and
torchvision, each small enough to prepare and train a step on a CPU in seconds.

Used by the zoo tests and usable by benchmarks::

    import sys; sys.path.insert(0, "tests")
    from zoo.catalog import available, zoo

    for name, entry in zoo().items():
        if available(entry):
            model, x = entry.factory(), entry.example()

The third-party packages are imported inside the factories, so this module
imports with none of them installed; :func:`missing` names what an entry
lacks. No factory downloads weights (``pretrained=False``, ``weights=None``).
The inputs are seeded, so a factory and an example give the same values on
every call once ``torch.manual_seed`` is set.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

__all__ = ["Entry", "available", "missing", "zoo"]


@dataclass(frozen=True)
class Entry:
    """One model of the catalog.

    ``factory`` builds it (randomly initialised, in train mode), ``example``
    returns an input it accepts, ``family`` is where it comes from (``"qseg"``,
    ``"monai"``, ``"smp"``, ``"torchvision"``), ``dims`` its spatial dimensions.
    ``requires`` lists the import names it needs; ``fx_mistraces`` marks models
    that ``torch.fx`` traces without error into a wrong graph (one that fails on
    the example input or computes something else), so that ``qseg.prepare`` must take its fallback path; ``capturable`` is
    False for models that neither ``torch.fx`` nor ``torch.export`` can capture,
    where ``prepare`` raises :class:`qseg.TraceError` (``notes`` says why).
    """

    factory: Callable[[], nn.Module]
    example: Callable[[], torch.Tensor]
    family: str
    dims: int
    requires: tuple[str, ...] = ()
    fx_mistraces: bool = False
    capturable: bool = True
    notes: str = field(default="", compare=False)


FAMILY_REQUIRES = {
    "qseg": (),
    "monai": ("monai", "einops"),
    "smp": ("segmentation_models_pytorch", "timm"),
    "torchvision": ("torchvision",),
    # installed with --no-deps (README): it pins timm<1.0.23, smp needs a newer one
    "nnunet": ("dynamic_network_architectures",),
}


def missing(entry: Entry) -> list[str]:
    """The packages ``entry`` needs that are not installed (checked without importing them)."""
    return [name for name in entry.requires if importlib.util.find_spec(name) is None]


def available(entry: Entry) -> bool:
    """Whether every package ``entry`` needs is installed."""
    return not missing(entry)


def first_tensor(out: object) -> torch.Tensor:
    """The first tensor of a zoo model's output: a tensor, a tuple/list (deep supervision) or
    a dict of them (torchvision's ``{"out": ...}``).

    Example:
        >>> first_tensor({"out": (torch.zeros(1), torch.ones(2))}).shape
        torch.Size([1])
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return first_tensor(next(iter(out.values())))
    return first_tensor(out[0])


def _torchvision_importable() -> None:
    # timm, smp and MONAI import torchvision themselves; see tv_shim for why this comes first
    from zoo import tv_shim

    tv_shim.install()


def _input(channels: int, size: int, dims: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *(size,) * dims, generator=generator)


# ---- qseg's own models ------------------------------------------------------------------


def _paper_unet() -> nn.Module:
    from qseg.models import PaperUNet

    return PaperUNet(widths=(8, 16, 32, 32))


def _two_head_fcn() -> nn.Module:
    from qseg.models import TwoHeadFCN

    return TwoHeadFCN()


# ---- MONAI --------------------------------------------------------------------------------


def _monai(name: str, **kwargs) -> nn.Module:
    _torchvision_importable()
    from monai.networks import nets

    return getattr(nets, name)(**kwargs)


def _monai_entries() -> dict[str, Entry]:
    small_unet = {"in_channels": 1, "out_channels": 2, "channels": (8, 16, 32, 64), "strides": (2, 2, 2)}
    basic = {"in_channels": 1, "out_channels": 2, "features": (8, 8, 16, 32, 64, 8)}
    out: dict[str, Entry] = {}
    sizes = {2: 64, 3: 32}
    for d, size in sizes.items():
        common = {"family": "monai", "dims": d, "requires": FAMILY_REQUIRES["monai"]}
        x = partial(_input, 1, size, d)
        x2 = partial(_input, 1, size, d, 2)
        out[f"monai.UNet{d}d"] = Entry(
            partial(_monai, "UNet", spatial_dims=d, num_res_units=2, **small_unet), x, **common
        )
        out[f"monai.UNet{d}d[batch,dropout]"] = Entry(
            partial(_monai, "UNet", spatial_dims=d, num_res_units=2, norm="batch", dropout=0.2, **small_unet),
            x2,
            **common,
        )
        out[f"monai.AttentionUnet{d}d"] = Entry(
            partial(_monai, "AttentionUnet", spatial_dims=d, **small_unet), x2, **common
        )
        out[f"monai.SegResNet{d}d"] = Entry(
            partial(_monai, "SegResNet", spatial_dims=d, in_channels=1, out_channels=2, init_filters=8),
            x,
            **common,
        )
        out[f"monai.DynUNet{d}d"] = Entry(
            partial(
                _monai,
                "DynUNet",
                spatial_dims=d,
                in_channels=1,
                out_channels=2,
                kernel_size=[3] * 4,
                strides=[1, 2, 2, 2],
                upsample_kernel_size=[2] * 3,
            ),
            x,
            **common,
        )
        out[f"monai.BasicUNet{d}d"] = Entry(
            partial(_monai, "BasicUNet", spatial_dims=d, **basic), x, fx_mistraces=True, **common
        )
        out[f"monai.BasicUNetPlusPlus{d}d"] = Entry(
            partial(_monai, "BasicUNetPlusPlus", spatial_dims=d, **basic), x, fx_mistraces=True, **common
        )
        out[f"monai.UNETR{d}d"] = Entry(
            partial(
                _monai,
                "UNETR",
                spatial_dims=d,
                in_channels=1,
                out_channels=2,
                img_size=(size,) * d,
                feature_size=16,
                hidden_size=96,
                mlp_dim=192,
                num_heads=4,
            ),
            x,
            **common,
        )
        # MedNeXt: depthwise (grouped) convs, GroupNorm, GELU, residual blocks, transposed convs
        out[f"monai.MedNeXt{d}d"] = Entry(
            partial(
                _monai,
                "MedNeXt",
                spatial_dims=d,
                init_filters=8,
                in_channels=1,
                out_channels=2,
                kernel_size=3,
                use_residual_connection=True,
                blocks_down=(1, 1, 1, 1),
                blocks_bottleneck=1,
                blocks_up=(1, 1, 1, 1),
            ),
            x,
            **common,
        )
    # FlexibleUNet in 2d only: the 3d efficientnet-b0 variant alone takes longer than all 2d ones
    flexible = partial(
        _monai, "FlexibleUNet", spatial_dims=2, in_channels=1, out_channels=2, pretrained=False
    )
    out["monai.FlexibleUNet2d[efficientnet-b0]"] = Entry(
        partial(flexible, backbone="efficientnet-b0"),
        partial(_input, 1, 64, 2, 2),
        "monai",
        2,
        FAMILY_REQUIRES["monai"],
        fx_mistraces=True,
    )
    out["monai.FlexibleUNet2d[resnet34]"] = Entry(
        partial(flexible, backbone="resnet34"),
        partial(_input, 1, 64, 2, 2),
        "monai",
        2,
        FAMILY_REQUIRES["monai"],
        capturable=False,
        notes=(
            "the shortcut of MONAI's ResNet (resnet.py _downsample_basic_block) builds zero padding "
            "from the unpacked shape of a tensor, which torch.fx cannot trace, and concatenates "
            "`out.data`, which torch.export rejects ('fake tensor in the exported program constant's "
            "list'): prepare raises TraceError"
        ),
    )
    swin = {"in_channels": 1, "out_channels": 2, "feature_size": 12}
    out["monai.SwinUNETR2d"] = Entry(
        partial(_monai, "SwinUNETR", spatial_dims=2, **swin),
        partial(_input, 1, 64, 2),
        "monai",
        2,
        FAMILY_REQUIRES["monai"],
    )
    out["monai.SwinUNETR3d"] = Entry(
        # at 32^3 the deepest stage is 1x1x1, where instance norm is undefined: BatchNorm instead
        partial(_monai, "SwinUNETR", spatial_dims=3, norm_name="batch", depths=(1, 1, 1, 1), **swin),
        partial(_input, 1, 32, 3, 2),
        "monai",
        3,
        FAMILY_REQUIRES["monai"],
    )
    out["monai.VNet3d"] = Entry(
        # VNet has no width parameter: 45.6 M parameters whatever the input
        partial(_monai, "VNet", spatial_dims=3, in_channels=1, out_channels=2),
        partial(_input, 1, 32, 3),
        "monai",
        3,
        FAMILY_REQUIRES["monai"],
    )
    return out


# ---- segmentation_models_pytorch ----------------------------------------------------------


def _smp(arch: str, encoder: str) -> nn.Module:
    _torchvision_importable()
    import segmentation_models_pytorch as smp

    model = getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=2)
    if hasattr(model, "requires_divisible_input_shape"):
        # forward checks the input size with a Python `if` on its shape, which FX cannot trace
        model.requires_divisible_input_shape = False
    return model


SMP_ARCHS = ("Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus", "PSPNet", "Linknet", "MAnet")
SMP_ENCODERS = ("resnet34", "mobilenet_v2", "efficientnet-b0")


def _smp_entries() -> dict[str, Entry]:
    # batch 2: some heads pool to 1x1 before a BatchNorm, which in train mode needs more than one value;
    # 32x32, the smallest size all encoders (output stride 32) accept, keeps the large decoders fast
    x = partial(_input, 3, 32, 2, 2)
    return {
        f"smp.{arch}[{encoder}]": Entry(partial(_smp, arch, encoder), x, "smp", 2, FAMILY_REQUIRES["smp"])
        for encoder in SMP_ENCODERS
        for arch in SMP_ARCHS
    }


# ---- nnU-Net (dynamic-network-architectures) --------------------------------------------------


def _nnunet(arch: str, dims: int, norm: str, deep_supervision: bool) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    conv = (nn.Conv2d, nn.Conv3d)[dims - 2]
    if norm == "IN":  # nnU-Net's default: InstanceNorm + LeakyReLU
        norm_op = (nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 2]
        nonlin, nonlin_kwargs = nn.LeakyReLU, {"negative_slope": 0.01, "inplace": True}
    else:
        norm_op = (nn.BatchNorm2d, nn.BatchNorm3d)[dims - 2]
        nonlin, nonlin_kwargs = nn.ReLU, {"inplace": True}
    common = dict(
        input_channels=1, n_stages=4, features_per_stage=(8, 16, 32, 32), conv_op=conv, kernel_sizes=3,
        strides=(1, 2, 2, 2), num_classes=2, n_conv_per_stage_decoder=(1, 1, 1), conv_bias=True,
        norm_op=norm_op, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nonlin,
        nonlin_kwargs=nonlin_kwargs, deep_supervision=deep_supervision,
    )  # fmt: skip
    if arch == "PlainConvUNet":
        return PlainConvUNet(n_conv_per_stage=(2, 2, 2, 2), **common)
    return ResidualEncoderUNet(n_blocks_per_stage=(1, 2, 2, 2), **common)


def _nnunet_entries() -> dict[str, Entry]:
    variants = (
        ("PlainConvUNet", 2, "IN", False), ("PlainConvUNet", 2, "BN", False), ("PlainConvUNet", 2, "IN", True),
        ("PlainConvUNet", 3, "IN", False), ("PlainConvUNet", 3, "BN", False),
        ("ResidualEncoderUNet", 2, "IN", False), ("ResidualEncoderUNet", 2, "IN", True),
        ("ResidualEncoderUNet", 3, "IN", False),
    )  # fmt: skip
    return {
        f"nnunet.{arch}{dims}d[{norm}{', deep supervision' if ds else ''}]": Entry(
            partial(_nnunet, arch, dims, norm, ds),
            partial(_input, 1, 32 if dims == 2 else 16, dims, 2),
            "nnunet",
            dims,
            FAMILY_REQUIRES["nnunet"],
        )
        for arch, dims, norm, ds in variants
    }


# ---- torchvision ---------------------------------------------------------------------------


def _torchvision(name: str) -> nn.Module:
    _torchvision_importable()
    from torchvision.models import segmentation

    return getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=2)


def _torchvision_entries() -> dict[str, Entry]:
    x = partial(_input, 3, 32, 2, 2)  # batch 2: the ASPP pooling branch ends in a 1x1 BatchNorm
    names = ("fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
    return {
        f"torchvision.{n}": Entry(
            partial(_torchvision, n), x, "torchvision", 2, FAMILY_REQUIRES["torchvision"]
        )
        for n in names
    }


def zoo() -> dict[str, Entry]:
    """Every model of the catalog by name (``family.Model[variant]``)."""
    out = {
        "qseg.PaperUNet": Entry(_paper_unet, partial(_input, 1, 64, 2), "qseg", 2),
        "qseg.TwoHeadFCN": Entry(_two_head_fcn, partial(_input, 3, 64, 2), "qseg", 2),
    }
    out.update(_monai_entries())
    out.update(_smp_entries())
    out.update(_torchvision_entries())
    out.update(_nnunet_entries())
    return out
