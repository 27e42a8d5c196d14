"""A transposed conv computed as an ordinary conv over its output phases.

OpenVINO 2026.4's CPU plugin runs a transposed conv (``Deconvolution``) in int8 only
when its input grid has no zero point; after a LeakyReLU, PReLU or ELU the grid has
one, and the layer ran in float. An ordinary conv runs int8 on any 8-bit grid, so
``convert`` computes a transposed conv whose input lies on a grid as one.

With stride ``s`` along an axis, output position ``y = s * q + r - p`` of
``conv_transpose(x, w)`` (padding ``p``) is ``sum_m x[q - m] * w[s * m + r]``: for each
phase ``r`` in ``[0, s)``, an ordinary cross-correlation of ``x`` with the taps
``w[r], w[s + r], ...`` in reverse order, ``M = ceil(k / s)`` of them (missing taps
are 0). One conv with ``C_out * s^d`` output channels, ordered (channel, phase), and
the transposed conv's groups, computes every phase at once; interleaving the phases and cropping the ends gives
the transposed conv's output. Each output value is the same sum of the same integer
products, so an int8 kernel computes it exactly as a transposed-conv kernel would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Phases", "as_phases", "interleave", "supported"]


@dataclass(frozen=True)
class Phases:
    """How the phase conv's output becomes the transposed conv's: ``strides`` along each
    spatial axis, then ``start`` values dropped at the front and ``trailing`` at the end
    of each axis (constants: they do not depend on the input's size).

    Example:
        >>> params = {"stride": [2], "padding": [1], "output_padding": [1], "dilation": [1], "groups": 1}
        >>> as_phases(torch.ones(1, 1, 3, dtype=torch.int8), torch.ones(1), torch.zeros(1), params)[-1]
        Phases(strides=(2,), start=(1,), trailing=(1,))
    """

    strides: tuple[int, ...]
    start: tuple[int, ...]
    trailing: tuple[int, ...]


def supported(params: dict) -> bool:
    """Whether a transposed conv with these parameters has a phase form here: no dilation
    (the form that needs is not built).

    Example:
        >>> supported({"groups": 4, "dilation": [1, 1]}), supported({"groups": 1, "dilation": [2, 2]})
        (True, False)
    """
    return all(d == 1 for d in params["dilation"])


def as_phases(
    codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, params: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict, Phases]:
    """The phase conv of a transposed conv: its weight codes ``(C_out * s^d, C_in, M...)``,
    weight scale and bias per output channel (each of the transposed conv's repeated
    once per phase), conv parameters, and the :class:`Phases` that reassemble its output.

    ``codes`` are the transposed conv's, ``(C_in, C_out / groups, k...)``; ``params`` its
    ``stride``, ``padding``, ``output_padding``, ``groups`` (no dilation: :func:`supported`);
    ``w_scale`` and ``bias`` have one value per output channel.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> codes = torch.randint(-7, 8, (3, 2, 3, 3))  # k=3, s=2, p=1: a MONAI UNet up-conv
        >>> params = {"stride": [2, 2], "padding": [1, 1], "output_padding": [1, 1], "dilation": [1, 1], "groups": 1}
        >>> pc, ps, pb, conv, phases = as_phases(codes, torch.ones(2), torch.zeros(2), params)
        >>> tuple(pc.shape), conv["padding"]
        ((8, 3, 2, 2), [1, 1])
        >>> x = torch.randint(0, 9, (1, 3, 5, 7)).float()
        >>> y = interleave(F.conv2d(x, pc.float(), None, 1, conv["padding"]), phases)
        >>> torch.equal(y, F.conv_transpose2d(x, codes.float(), None, 2, 1, 1))
        True
    """
    strides, pads = list(params["stride"]), list(params["padding"])
    extra = list(params["output_padding"]) or [0] * len(strides)
    dims = codes.dim() - 2
    kernel = codes.shape[2:]
    taps = [math.ceil(k / s) for k, s in zip(kernel, strides, strict=True)]
    # R more positions at both ends when the last phase output reaches past the M - 1 padding
    more = [
        max(0, math.ceil((k + e - p) / s) - m)
        for k, s, p, e, m in zip(kernel, strides, pads, extra, taps, strict=True)
    ]
    # the kernel padded to s * M taps, split as (m, r), m reversed
    pad = [v for k, s, m in reversed(list(zip(kernel, strides, taps, strict=True))) for v in (0, s * m - k)]
    groups = params["groups"]
    c_in, c_out = codes.shape[0] // groups, codes.shape[1]  # per group
    split = F.pad(codes, pad).reshape(
        groups, c_in, c_out, *(v for s, m in zip(strides, taps, strict=True) for v in (m, s))
    )
    split = split.flip(dims=[3 + 2 * i for i in range(dims)])
    # (g, c_in, c_out, m1, r1, m2, r2, ...) -> (g, c_out, r1, r2, ..., c_in, m1, m2, ...)
    order = [0, 2, *(4 + 2 * i for i in range(dims)), 1, *(3 + 2 * i for i in range(dims))]
    phase_codes = split.permute(order).reshape(groups * c_out * math.prod(strides), c_in, *taps)
    per_phase = math.prod(strides)
    conv = {
        "stride": [1] * dims,
        "padding": [m - 1 + r for m, r in zip(taps, more, strict=True)],
        "dilation": [1] * dims,
        "groups": groups,
        "output_padding": [],
    }
    phases = Phases(
        strides=tuple(strides),
        start=tuple(p + s * r for p, s, r in zip(pads, strides, more, strict=True)),
        trailing=tuple(
            s * (m + r) + p - k - e
            for k, s, p, e, m, r in zip(kernel, strides, pads, extra, taps, more, strict=True)
        ),
    )
    return (
        phase_codes.contiguous(),
        w_scale.repeat_interleave(per_phase),
        bias.repeat_interleave(per_phase),
        conv,
        phases,
    )


def interleave(y: torch.Tensor, phases: Phases) -> torch.Tensor:
    """The transposed conv's output from its phase conv's output ``y``
    ``(N, C_out * s^d, Q...)``: the phases interleaved, ``(N, C_out, s * Q...)``, then cropped.

    Example:
        >>> y = torch.tensor([[[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]])  # one channel, phases 0 and 1
        >>> interleave(y, Phases(strides=(2,), start=(1,), trailing=(2,)))
        tensor([[[1., 2., 3.]]])
    """
    strides = phases.strides
    dims = len(strides)
    n, spatial = y.shape[0], y.shape[2:]
    y = y.reshape(n, -1, *strides, *spatial)
    # (n, c, r1..rd, q1..qd) -> (n, c, q1, r1, q2, r2, ...)
    order = [0, 1, *(v for i in range(dims) for v in (2 + dims + i, 2 + i))]
    y = y.permute(order).reshape(n, -1, *(q * s for q, s in zip(spatial, strides, strict=True)))
    index = [slice(None), slice(None)]
    index += [slice(a, -b if b else None) for a, b in zip(phases.start, phases.trailing, strict=True)]
    return y[tuple(index)]
