"""prepare() on randomly generated conv nets: depth, widths, BatchNorm or not, dropout or
not, concat/add skip connections and one or two heads. The same invariants as the zoo."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qseg


@dataclass(frozen=True)
class Block:
    width: int
    norm: bool
    act: str  # relu | leaky
    dropout: bool
    skip_from: int | None  # index of an earlier block whose output joins this one's input
    skip_kind: str  # cat | add


@dataclass(frozen=True)
class Spec:
    blocks: tuple[Block, ...]
    heads: int


@st.composite
def specs(draw) -> Spec:
    depth = draw(st.integers(2, 5))
    blocks = []
    for i in range(depth):
        skip = draw(st.one_of(st.none(), st.integers(0, i - 1))) if i >= 2 else None
        blocks.append(
            Block(
                width=draw(st.sampled_from([2, 4, 8])),
                norm=draw(st.booleans()),
                act=draw(st.sampled_from(["relu", "leaky"])),
                dropout=draw(st.booleans()),
                skip_from=skip,
                skip_kind=draw(st.sampled_from(["cat", "add"])),
            )
        )
    return Spec(tuple(blocks), draw(st.integers(1, 2)))


class RandomNet(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        self.convs, self.norms, self.acts, self.drops, self.projs = (nn.ModuleList() for _ in range(5))
        in_ch, widths = 1, []
        for b in spec.blocks:
            extra = widths[b.skip_from] if b.skip_from is not None else 0
            # an add needs equal widths: the skip goes through a 1x1 projection first
            self.projs.append(nn.Conv2d(extra, in_ch, 1) if extra and b.skip_kind == "add" else nn.Identity())
            conv_in = in_ch + (extra if extra and b.skip_kind == "cat" else 0)
            self.convs.append(nn.Conv2d(conv_in, b.width, 3, padding=1))
            self.norms.append(nn.BatchNorm2d(b.width) if b.norm else nn.Identity())
            self.acts.append(nn.ReLU() if b.act == "relu" else nn.LeakyReLU(0.1))
            self.drops.append(nn.Dropout2d(0.3) if b.dropout else nn.Identity())
            in_ch = b.width
            widths.append(b.width)
        self.head_a = nn.Conv2d(in_ch, 1, 1)
        self.head_b = nn.Conv2d(widths[0], 1, 1) if spec.heads == 2 else None

    def forward(self, x):
        outs = []
        for i, b in enumerate(self.spec.blocks):
            if b.skip_from is not None and b.skip_kind == "cat":
                x = torch.cat([x, outs[b.skip_from]], dim=1)
            elif b.skip_from is not None:
                x = x + self.projs[i](outs[b.skip_from])
            x = self.drops[i](self.acts[i](self.norms[i](self.convs[i](x))))
            outs.append(x)
        if self.head_b is None:
            return self.head_a(x)
        return self.head_a(x), self.head_b(outs[0])


@settings(max_examples=25)
@given(specs(), st.integers(0, 2**16))
def test_random_nets_prepare_with_the_invariants(spec, seed):
    from helpers import check_invariants, one_training_step, quantizers_bypassed  # tests/prepare/

    torch.manual_seed(seed)
    model = RandomNet(spec)
    x = torch.randn(2, 1, 8, 8)
    q = qseg.prepare(model, example_inputs=x)
    report = q.qseg_report
    assert report.capture.startswith("torch.fx")
    last = {"head_a"} | ({"head_b"} if spec.heads == 2 else set())
    check_invariants(q, first={"convs.0"}, last=last)
    assert len(report.dropout_removed) == sum(b.dropout for b in spec.blocks)
    # every block feeding another weighted layer has its activation quantized, with
    # an unsigned grid only where a ReLU follows; LeakyReLU outputs get a signed one
    owners = {a.owner for a in report.activations}
    assert {f"convs.{i}" for i in range(len(spec.blocks))} <= owners
    for a in report.activations:
        if a.quantizer.endswith("unsigned") and not a.rule.startswith("on the input"):
            owner = int(a.owner.split(".")[1])
            assert spec.blocks[owner].act == "relu"
    # bypassing every quantizer gives back the float model (without its dropout)
    q.eval()
    model.eval()
    expected, got = model(x), q(x)
    with quantizers_bypassed(q):
        torch.testing.assert_close(q(x), expected)
    assert all(torch.isfinite(t).all() for t in (got if isinstance(got, tuple) else (got,)))
    one_training_step(q, x)
