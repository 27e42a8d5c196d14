"""A tour of qseg's quantizers on one conv layer's weights and activations.

Prints, for each quantizer of the two papers, the bits a stored value needs, how
many distinct values it produced, the grid it exports with, and the error it
introduces. Run: ``python examples/quantizers_tour.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from qseg.quantizers import Binary, DoReFa, FixedPoint, PowerOfTwo, Quantizer, Ternary, TernaryTanh


def describe_grid(q: Quantizer, x: torch.Tensor) -> str:
    spec = q.spec(x)
    if spec is None:
        return "non-uniform"
    where = "per tensor" if spec.axis is None else f"per channel (axis {spec.axis})"
    scale = spec.scale.flatten()[0].item()
    return f"codes [{spec.qmin}, {spec.qmax}] x {scale:.4g} {where}"


def main() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3)  # a 3x3 conv of paper A's U-Net, default init
    w = conv.weight.detach()
    # activations after BatchNorm, as paper A quantizes them: roughly N(0, 1), scaled up
    act = torch.randn(4, 64, 50, 50) * 8

    weight_quantizers: dict[str, Quantizer] = {
        "FixedPoint(0, 4)   paper A Qw0.4": FixedPoint(0, 4),
        "FixedPoint(0, 8)   paper A Qw0.8": FixedPoint(0, 8),
        "PowerOfTwo(7)      paper B INQ 7 bit": PowerOfTwo(7),
        "PowerOfTwo(5)      paper B INQ 5 bit": PowerOfTwo(5),
        "DoReFa(2)          paper B DoReFa": DoReFa(2),
        "Ternary            paper B TWN": Ternary(),
        "Ternary(axis 0)    TernaryNet weights": Ternary(channel_axis=0),
        "Binary             paper A BNN": Binary(),
    }
    act_quantizers: dict[str, Quantizer] = {
        "FixedPoint(6, 0, unsigned) paper A Qa6.0": FixedPoint(6, 0, signed=False),
        "FixedPoint(8, 0, unsigned) paper A Qa8.0": FixedPoint(8, 0, signed=False),
        "TernaryTanh (eval)  TernaryNet": TernaryTanh().eval(),
    }
    for title, tensor, table in (
        (
            f"weights of Conv2d(64, 64, 3): {w.numel():,} values, max|w| = {w.abs().max():.4f}",
            w,
            weight_quantizers,
        ),
        ("activations after BN (x8)", act, act_quantizers),
    ):
        print(title)
        print(f"  {'quantizer':<42} {'bits':>4} {'values':>6}  {'rel. RMS error':>14}  grid")
        for name, q in table.items():
            y = q(tensor)
            rel = ((y - tensor).pow(2).mean().sqrt() / tensor.pow(2).mean().sqrt()).item()
            grid = describe_grid(q, tensor)
            print(f"  {name:<42} {q.bits:>4} {y.unique().numel():>6}  {rel:>14.3f}  {grid}")
        print()
    print("Notes: 'bits' counts every stored bit, sign included. Binary and DoReFa rescale the weights")
    print("(a following BatchNorm absorbs the scale), so their error is large by design. Unsigned")
    print("activation quantizers are quantized ReLUs: their error includes the clamped negatives.")
    print("Qw0.4's step of 1/16 leaves default-initialized 3x3 weights only 3 values: the weights")
    print("must grow during quantization-aware training (BatchNorm after the conv makes that free).")


if __name__ == "__main__":
    main()
