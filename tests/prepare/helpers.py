"""Invariants every prepared model must satisfy, shared by the prepare and zoo tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import fx, nn

from qseg import graph as g
from qseg.nn import QUANTIZED, ActQuant
from qseg.quantizers import Quantizer


def check_invariants(qmodel: nn.Module, first: set[str] | None = None, last: set[str] | None = None) -> None:
    """No dropout left; first/last layers float; every BatchNorm whose output feeds a
    weighted layer is followed by an ActQuant (or only by an addition, which the report
    notes); each quantized weight on its grid."""
    assert isinstance(qmodel, fx.GraphModule)
    report = qmodel.qseg_report
    for node in qmodel.graph.nodes:
        assert not g.is_dropout(qmodel, node), f"dropout left at {node.name}"
    layers = {row.name: row for row in report.layers}
    for name in first or ():
        assert layers[name].weights == "float: first layer", layers[name]
        assert type(qmodel.get_submodule(name)) in QUANTIZED, f"{name} should stay a float layer"
    for name in last or ():
        assert layers[name].weights == "float: last layer", layers[name]
    weighted = [layer.node for layer in g.weighted_layers(qmodel)]
    feeds = g.weighted_downstream(qmodel, weighted)
    for node in qmodel.graph.nodes:
        if g.is_batch_norm(qmodel, node) and feeds[node.name]:
            users = list(node.users)
            addition = g.only_addition_user(qmodel, node)
            if addition is not None:  # the sum is quantized instead
                note = f"no quantizer after {node.name}: it only feeds the addition {addition.name}"
                assert any(note in n for n in report.notes), f"{node.name}: the report does not say why"
                continue
            assert len(users) == 1 and isinstance(g.module_of(qmodel, users[0]), ActQuant), (
                f"{node.name} is followed by {users}, not by its activation quantizer"
            )
    for name, module in qmodel.named_modules():
        if type(module) in QUANTIZED.values():
            w = module.weight.detach()
            q = module.weight_quant(w)
            spec = module.weight_quant.spec(w)
            if spec is not None:
                assert torch.equal(spec.dequantize(spec.codes(q)).to(q.dtype), q), name
            assert torch.equal(module.weight_quant(q), q) or spec is None, f"{name}: not idempotent"


def one_training_step(qmodel: nn.Module, x: torch.Tensor) -> float:
    """One Adam step on a squared-output loss; returns the loss and asserts that
    it is finite and that every quantized layer's weight moved."""
    qmodel.train()
    before = {n: p.detach().clone() for n, p in qmodel.named_parameters()}
    opt = torch.optim.Adam(qmodel.parameters(), lr=1e-2)
    out = qmodel(x)
    outs = out if isinstance(out, (tuple, list)) else [out]
    if isinstance(out, dict):
        outs = list(out.values())
    loss = sum(o.float().pow(2).mean() for o in outs)
    assert torch.isfinite(loss), loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    moved = [n for n, p in qmodel.named_parameters() if not torch.equal(before[n], p.detach())]
    assert moved, "no parameter changed"
    return float(loss.detach())


@contextmanager
def quantizers_bypassed(model: nn.Module) -> Iterator[None]:
    """Every quantizer of a prepared model (weights, activations, functional layers'
    weights) replaced by ``nn.Identity`` inside the block: what is left must compute the
    float model (minus dropout). The quantizers come back afterwards."""
    saved = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, Quantizer)
    ]
    for parent, name, _ in saved:
        setattr(parent, name, nn.Identity())
    try:
        yield
    finally:
        for parent, name, child in saved:
            setattr(parent, name, child)
