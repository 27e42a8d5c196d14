"""A prepared model trains under DistributedDataParallel (2 CPU processes, gloo)."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import qseg
from qseg.models import PaperUNet

WORLD_SIZE = 2
STEPS = 3
WIDTHS = (4, 8, 8, 8)


def _worker(rank: int, store: str, out_dir: str) -> None:
    """One rank: the same seeded model, its own data, 3 Adam steps, state to ``out_dir``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.manual_seed(0)  # the same initial model on every rank
        example = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
        qmodel = qseg.prepare(PaperUNet(widths=WIDTHS), example_inputs=example)
        initial = {k: v.detach().clone() for k, v in qmodel.named_parameters()}
        ddp = DistributedDataParallel(qmodel)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        data = torch.Generator().manual_seed(100 + rank)  # different batches per rank
        losses = []
        for _ in range(STEPS):
            x = torch.randn(2, 1, 32, 32, generator=data)
            target = (torch.rand(2, 1, 32, 32, generator=data) > 0.5).float()
            loss = nn.functional.binary_cross_entropy_with_logits(ddp(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        params = {k: v.detach().clone() for k, v in qmodel.named_parameters()}
        torch.save(
            {"initial": initial, "params": params, "losses": losses},
            Path(out_dir) / f"rank{rank}.pt",
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_prepared_model_trains_under_ddp(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # file:// rendezvous in tmp_path: no port to find, nothing shared with other runs
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(out)), nprocs=WORLD_SIZE, join=True)
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE))

    for state in (r0, r1):
        assert all(torch.isfinite(torch.tensor(state["losses"])))
    # each rank saw its own batches, so without gradient averaging the models would part
    assert r0["losses"][0] != r1["losses"][0]
    assert r0["initial"].keys() == r1["initial"].keys() == r0["params"].keys()
    for name, value in r0["initial"].items():
        assert torch.equal(value, r1["initial"][name]), name
    # all-reduced gradients and the same Adam state: bitwise equal parameters
    for name, value in r0["params"].items():
        assert torch.equal(value, r1["params"][name]), f"{name} differs between ranks"
    # every weight trained (biases of convs followed by BatchNorm get a gradient of ~0)
    still = [n for n, v in r0["params"].items() if n.endswith("weight") and torch.equal(v, r0["initial"][n])]
    assert not still, f"not trained: {still}"
