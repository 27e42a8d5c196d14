"""Invariants every prepared model must satisfy, shared by the prepare and zoo tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import fx, nn

from qseg import graph as g
from qseg.nn import QUANTIZED, ActQuant, ReLUAfterQuant
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


def _output_tensors(out: object) -> list[torch.Tensor]:
    """A model's output as a list: one tensor, a tuple or list of them, or a dict's values."""
    if isinstance(out, dict):
        return list(out.values())
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _squared_loss(outs: list[torch.Tensor]) -> torch.Tensor:
    return sum(o.float().pow(2).mean() for o in outs)


def without_training_shortcuts(qmodel: nn.Module) -> nn.Module:
    """``qmodel`` with what ``prepare`` set to spare buffers in training turned off, in place:
    no quantizer overwrites its input or gives a ReLU's gradient, and the ReLUs are plain."""
    for m in qmodel.modules():
        if isinstance(m, ActQuant):
            m.quantizer.overwrites_input = m.quantizer.absorbs_relu = False
        if type(m) is ReLUAfterQuant:
            m.__class__ = nn.ReLU
    return qmodel


def step_gradients(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """One seeded forward and backward (train mode, squared output as the loss, stochastic
    layers drawing alike on every call): the output and every parameter's gradient."""
    model.train()
    torch.manual_seed(0)
    outs = _output_tensors(model(x))
    _squared_loss(outs).backward()
    grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}
    return outs[0].detach(), grads


def assert_same_gradients(a: dict, b: dict) -> None:
    """Equal gradients, bit for bit, but LSQ's learned scales, whose sum may run in another order."""
    assert a.keys() == b.keys()
    for name, grad in a.items():
        if grad is None or b[name] is None:
            assert grad is None and b[name] is None, name
        elif name.endswith("scale"):
            torch.testing.assert_close(grad, b[name], rtol=1e-4, atol=1e-8, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert torch.equal(grad, b[name]), name


def one_training_step(qmodel: nn.Module, x: torch.Tensor) -> float:
    """One Adam step on a squared-output loss; returns the loss and asserts that
    it is finite and that every quantized layer's weight moved."""
    qmodel.train()
    before = {n: p.detach().clone() for n, p in qmodel.named_parameters()}
    opt = torch.optim.Adam(qmodel.parameters(), lr=1e-2)
    loss = _squared_loss(_output_tensors(qmodel(x)))
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
