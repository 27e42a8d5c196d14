"""What ``qseg.convert`` did: the :class:`ConvertReport` a converted model carries."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ConvertReport"]


@dataclass
class ConvertReport:
    """What ``convert`` did, per layer and in total (``converted.qseg_convert``).

    The lists name layers: ``integer_layers`` run as integer convs,
    ``float_input_layers`` keep integer weights but read a float input,
    ``grid_layers`` keep float weights on a non-uniform grid (INQ);
    ``frozen_weights`` are the weight quantizers of functional layers, frozen to codes;
    ``phase_layers`` are transposed convs computed as an ordinary conv over their output
    phases (``qseg/convert/phases.py``), so that int8 runtimes run them as int8 convs;
    ``folded_norms`` are the BatchNorms folded into the conv before them,
    ``removed_relus`` the ReLUs dropped after an unsigned quantizer, and
    ``warnings`` flag integer kernels that may saturate or lose exactness.

    Example:
        >>> import torch, qseg
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> def block(i, o):
        ...     return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        >>> model = nn.Sequential(*block(1, 4), *block(4, 4), nn.Conv2d(4, 1, 1))
        >>> x = torch.rand(1, 1, 8, 8)
        >>> report = qseg.convert(qseg.prepare(model, "unet-qa6.0-qw0.4", example_inputs=x)).qseg_convert
        >>> print(report)
        integer convs: 1 (3)
        quantized weights, float input: -
        float weights on a non-uniform grid: -
        functional layers' weights frozen: -
        transposed convs as phase convs: -
        BatchNorms folded: 1; ReLUs removed: 2
        >>> report.folded_norms
        ['4']
    """

    integer_layers: list[str] = field(default_factory=list)
    float_input_layers: list[str] = field(default_factory=list)
    grid_layers: list[str] = field(default_factory=list)
    frozen_weights: list[str] = field(default_factory=list)
    phase_layers: list[str] = field(default_factory=list)
    folded_norms: list[str] = field(default_factory=list)
    removed_relus: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"integer convs: {len(self.integer_layers)} ({', '.join(self.integer_layers) or '-'})",
            f"quantized weights, float input: {', '.join(self.float_input_layers) or '-'}",
            f"float weights on a non-uniform grid: {', '.join(self.grid_layers) or '-'}",
            f"functional layers' weights frozen: {', '.join(self.frozen_weights) or '-'}",
            f"transposed convs as phase convs: {', '.join(self.phase_layers) or '-'}",
            f"BatchNorms folded: {len(self.folded_norms)}; ReLUs removed: {len(self.removed_relus)}",
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)
