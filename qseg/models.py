"""Reference segmentation models of the two papers, as plain ``torch.nn`` modules.

* :class:`PaperUNet`: the U-Net of paper A (AskariHemmat et al. 2019, "U-Net
  fixed-point quantization for medical image segmentation"), 4,836,737 parameters
  with the default widths (the paper says "about 4.84 M").
* :class:`TwoHeadFCN`: a small DCAN-like fully convolutional network (Chen et al.
  2016) with an object head and a contour head, a stand-in for the FCNs of paper B
  (Xu et al. 2018).

Both return raw logits, contain no data-dependent Python control flow in
``forward`` and trace with :func:`torch.fx.symbolic_trace`. Submodules have
readable names (``enc1.conv1``, ``dec3.bn2``, ``head``, ``object_head.up``) so that
quantization reports read well. Input sizes are checked by the separate class
methods ``check_input_size(h, w)``, never inside ``forward``, because a shape test
there would break tracing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from numbers import Integral

import torch
from torch import nn

from qseg.errors import ModelError

__all__ = ["PaperUNet", "TwoHeadFCN"]


def _check_channels(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_widths(widths: Sequence[int], length: int) -> tuple[int, ...]:
    try:
        values = tuple(widths)
    except TypeError:
        raise ModelError(f"widths must be a sequence of {length} positive integers, got {widths!r}") from None
    if len(values) != length or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in values):
        raise ModelError(f"widths must be a sequence of {length} positive integers, got {widths!r}")
    return values


def _check_size(model: str, factor: int, h: int, w: int) -> None:
    for name, value in (("height", h), ("width", w)):
        # any integer type (int, numpy integers); bools and floats are rejected
        if isinstance(value, bool) or not isinstance(value, Integral) or value < factor or value % factor:
            raise ModelError(
                f"{model} needs input height and width divisible by {factor} "
                f"(positive multiples of {factor}); got {name} {value!r} in {h!r} x {w!r}"
            )


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """``conv1, bn1, relu1, conv2, bn2, relu2``: two 3x3 convolutions (padding 1) with BN and ReLU."""
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)),
                ("bn1", nn.BatchNorm2d(out_channels)),
                ("relu1", nn.ReLU(inplace=False)),
                ("conv2", nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)),
                ("bn2", nn.BatchNorm2d(out_channels)),
                ("relu2", nn.ReLU(inplace=False)),
            ]
        )
    )


class PaperUNet(nn.Module):
    """The U-Net of paper A (AskariHemmat et al. 2019), returning raw logits.

    Four resolution levels, three max-pools, bilinear upsampling and skip
    concatenation. With ``widths = (w1, w2, w3, w4)`` (default ``(64, 128, 256, 256)``)
    the layers are, each block being ``conv3x3 + BN + ReLU`` twice (padding 1,
    convolutions with bias)::

        enc1        in_channels -> w1                 full resolution
        pool1, enc2 w1 -> w2                          1/2
        pool2, enc3 w2 -> w3                          1/4
        pool3, bottleneck w3 -> w4 (then dropout)     1/8
        up3, cat with enc3, dec3  w4 + w3 -> w3       1/4   (512 -> 256 by default)
        up2, cat with enc2, dec2  w3 + w2 -> w2       1/2   (384 -> 128)
        up1, cat with enc1, dec1  w2 + w1 -> w1       full  (192 -> 64)
        head        conv1x1 w1 -> out_channels

    Each decoder block maps the concatenation ``torch.cat([up, skip], dim=1)`` back to
    the skip's width, as in the authors' published code. With the default widths,
    ``in_channels=1`` and ``out_channels=1`` this gives 4,836,737 parameters (the
    encoder and bottleneck 2,327,232, the decoder 2,509,440, the head 65), the
    paper's "about 4.84 M" (18.45 MiB in fp32).

    Differences from the paper and its code, on purpose: the block order is
    conv, BN, ReLU (the authors' code applies ReLU before BN), and the last layer
    is a 1x1 convolution (their code uses a 3x3 one, 512 parameters more). The
    paper applies a sigmoid to the output; here ``forward`` returns logits, and the
    sigmoid belongs in the loss (``BCEWithLogitsLoss``, a dice loss on
    ``logits.sigmoid()``) or the inference code.

    Args:
        in_channels: channels of the input image (1 in the paper).
        out_channels: channels of the output logits (1 in the paper).
        widths: output channels of ``enc1``, ``enc2``, ``enc3`` and ``bottleneck``;
            a narrower tuple such as ``(16, 32, 64, 64)`` gives a fast copy for demos
            and tests.
        dropout: when positive, an ``nn.Dropout2d(dropout)`` named ``dropout`` follows
            the bottleneck block; when 0 (default, as paper A recommends for
            quantization) ``dropout`` is an ``nn.Identity``. Must lie in ``[0, 1)``.

    Shape:
        - Input: ``(N, in_channels, H, W)`` with ``H`` and ``W`` positive multiples of
          8 (three 2x2 max-pools); see :meth:`check_input_size`. Other sizes are not
          checked in ``forward`` and fail inside ``torch.cat``.
        - Output: ``(N, out_channels, H, W)``, raw logits.

    Example:
        >>> import torch
        >>> model = PaperUNet(widths=(8, 16, 32, 32)).eval()
        >>> model(torch.randn(2, 1, 40, 48)).shape
        torch.Size([2, 1, 40, 48])
        >>> sum(p.numel() for p in PaperUNet().parameters())
        4836737
        >>> PaperUNet.check_input_size(200, 200)     # 200 = 8 * 25: fine
        >>> PaperUNet.check_input_size(30, 30)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qseg.errors.ModelError: PaperUNet needs input height and width divisible by 8 ...
    """

    #: product of the strides of the max-pools: input height and width must be multiples of it
    downsampling_factor: int = 8

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        widths: Sequence[int] = (64, 128, 256, 256),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_channels = _check_channels("in_channels", in_channels)
        out_channels = _check_channels("out_channels", out_channels)
        w1, w2, w3, w4 = _check_widths(widths, 4)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ModelError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.widths = (w1, w2, w3, w4)

        self.enc1 = _double_conv(in_channels, w1)
        self.pool1 = nn.MaxPool2d(2)
        self.enc2 = _double_conv(w1, w2)
        self.pool2 = nn.MaxPool2d(2)
        self.enc3 = _double_conv(w2, w3)
        self.pool3 = nn.MaxPool2d(2)
        self.bottleneck = _double_conv(w3, w4)
        self.dropout: nn.Module = nn.Dropout2d(float(dropout)) if dropout > 0 else nn.Identity()
        self.up3 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec3 = _double_conv(w4 + w3, w3)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec2 = _double_conv(w3 + w2, w2)
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec1 = _double_conv(w2 + w1, w1)
        self.head = nn.Conv2d(w1, out_channels, kernel_size=1)

    @classmethod
    def check_input_size(cls, h: int, w: int) -> None:
        """Raise :class:`ModelError` (a ``ValueError``) unless ``h`` and ``w`` are positive multiples of 8.

        ``forward`` does not call this (a shape test there would break
        :func:`torch.fx.symbolic_trace`); call it on data before feeding the model.

        Args:
            h: input height in pixels.
            w: input width in pixels.

        Example:
            >>> PaperUNet.check_input_size(352, 552)      # HeLa frames at half size, cropped
            >>> PaperUNet.check_input_size(350, 550)
            Traceback (most recent call last):
            ...
            qseg.errors.ModelError: PaperUNet needs input height and width divisible by 8 (positive multiples of 8); got height 350 in 350 x 550
        """
        _check_size(cls.__name__, cls.downsampling_factor, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, out_channels, H, W)`` for an input ``(N, in_channels, H, W)``."""
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool1(s1))
        s3 = self.enc3(self.pool2(s2))
        b = self.dropout(self.bottleneck(self.pool3(s3)))
        d3 = self.dec3(torch.cat([self.up3(b), s3], dim=1))
        d2 = self.dec2(torch.cat([self.up2(d3), s2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), s1], dim=1))
        return self.head(d1)


def _head(in_channels: int, mid_channels: int, num_classes: int, stride: int) -> nn.Sequential:
    """``up, bn, relu, classifier``: a transposed conv back to full resolution, then a 1x1 conv."""
    return nn.Sequential(
        OrderedDict(
            [
                ("up", nn.ConvTranspose2d(in_channels, mid_channels, kernel_size=stride, stride=stride)),
                ("bn", nn.BatchNorm2d(mid_channels)),
                ("relu", nn.ReLU(inplace=False)),
                ("classifier", nn.Conv2d(mid_channels, num_classes, kernel_size=1)),
            ]
        )
    )


class TwoHeadFCN(nn.Module):
    """A small DCAN-like FCN with an object head and a contour head, returning raw logits.

    DCAN (Chen et al. 2016, "DCAN: deep contour-aware networks for accurate gland
    segmentation") shares one downsampling encoder between two upsampling
    branches, one predicting the objects (glands) and one their contours; paper B
    (Xu et al. 2018) quantizes FCNs of this family. This model is a small stand-in
    for those FCNs, not a reproduction: it keeps the features that matter to
    quantization (conv + BN + ReLU, max-pools, dropout, transposed convolutions,
    two outputs) at a size that trains in seconds (419,300 parameters with the
    defaults).

    With ``widths = (w1, w2, w3)`` (default ``(32, 64, 128)``), each encoder block
    being ``conv3x3 + BN + ReLU`` twice::

        enc1                      in_channels -> w1    full resolution
        pool1, enc2               w1 -> w2             1/2
        pool2, enc3, dropout      w2 -> w3             1/4   (nn.Dropout2d(0.5), as DCAN)
        object_head, contour_head each: ConvTranspose2d(w3, w1, kernel 4, stride 4)
                                  + BN + ReLU, then conv1x1 w1 -> num_classes

    The ``dropout`` module is there on purpose: qseg's quantization pass removes
    dropout (paper A's finding), and this model lets tests check that it does.

    Args:
        in_channels: channels of the input image (3 for the RGB histology of GlaS).
        widths: output channels of ``enc1``, ``enc2`` and ``enc3``.
        num_classes: channels of each head's logits (2: background and foreground,
            for a softmax cross entropy per head).

    Shape:
        - Input: ``(N, in_channels, H, W)`` with ``H`` and ``W`` positive multiples of
          4 (two 2x2 max-pools); see :meth:`check_input_size`.
        - Output: a tuple ``(object_logits, contour_logits)``, each
          ``(N, num_classes, H, W)``.

    Example:
        >>> import torch
        >>> model = TwoHeadFCN(widths=(8, 16, 32)).eval()
        >>> obj, contour = model(torch.randn(2, 3, 36, 52))
        >>> obj.shape, contour.shape
        (torch.Size([2, 2, 36, 52]), torch.Size([2, 2, 36, 52]))
        >>> sum(p.numel() for p in TwoHeadFCN().parameters())
        419300
    """

    #: product of the strides of the max-pools: input height and width must be multiples of it
    downsampling_factor: int = 4

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        in_channels = _check_channels("in_channels", in_channels)
        num_classes = _check_channels("num_classes", num_classes)
        w1, w2, w3 = _check_widths(widths, 3)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.widths = (w1, w2, w3)

        self.enc1 = _double_conv(in_channels, w1)
        self.pool1 = nn.MaxPool2d(2)
        self.enc2 = _double_conv(w1, w2)
        self.pool2 = nn.MaxPool2d(2)
        self.enc3 = _double_conv(w2, w3)
        self.dropout = nn.Dropout2d(0.5)
        self.object_head = _head(w3, w1, num_classes, self.downsampling_factor)
        self.contour_head = _head(w3, w1, num_classes, self.downsampling_factor)

    @classmethod
    def check_input_size(cls, h: int, w: int) -> None:
        """Raise :class:`ModelError` (a ``ValueError``) unless ``h`` and ``w`` are positive multiples of 4.

        Args:
            h: input height in pixels.
            w: input width in pixels.

        Example:
            >>> TwoHeadFCN.check_input_size(36, 52)
            >>> TwoHeadFCN.check_input_size(36, 50)
            Traceback (most recent call last):
            ...
            qseg.errors.ModelError: TwoHeadFCN needs input height and width divisible by 4 (positive multiples of 4); got width 50 in 36 x 50
        """
        _check_size(cls.__name__, cls.downsampling_factor, h, w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(object_logits, contour_logits)``, each ``(N, num_classes, H, W)``, for ``(N, C, H, W)``."""
        f = self.enc1(x)
        f = self.enc2(self.pool1(f))
        f = self.dropout(self.enc3(self.pool2(f)))
        return self.object_head(f), self.contour_head(f)
