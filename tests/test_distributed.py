"""DistributedDataParallel with 2 gloo processes on CPU: identical hash planes, identical
switches at the same steps, identical parameters. With hashing="pca" the ranks see
different data, so identical planes mean rank 0's fits reached every rank, and the probes
(rank 0 only) fitted without a collective (else the run would hang)."""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from reuse_compiler import AdaptiveReuse, ReuseConfig, reuse_compile
from reuse_compiler.models import cifarnet

WORLD = 2
STEPS = 12


def _worker(rank, init_file, out_dir, hashing):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # same initial weights on every rank
        cfg = ReuseConfig(hashing=hashing, hash_refresh=5)
        gm = reuse_compile(cifarnet(in_channels=1, image_size=28, width=0.25), torch.rand(8, 1, 28, 28), config=cfg)
        model = DDP(gm)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data and probe
        x = torch.rand(8 * STEPS, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (8 * STEPS,), generator=g)
        ctl = AdaptiveReuse(gm, "lh", probe=(x[:16], y[:16]), patience=0, finish="exact")
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(STEPS):
            loss = F.cross_entropy(model(x[8 * step : 8 * step + 8]), y[8 * step : 8 * step + 8])
            opt.zero_grad()
            loss.backward()
            opt.step()
            # alone, rank 0 would first plateau at step 3 and rank 1 at step 2; their
            # all-reduced mean (2.0, 1.75, 1.7, ...) first plateaus at step 4
            ctl.step([3.0, 2.0, 2.5][step % 3] if rank == 0 else [1.0, 1.5, 0.9][step % 3])
        torch.save(
            {
                "history": ctl.history,
                "stages": ctl.state_dict()["stages"],
                "planes": {n: m.planes for n, m in gm.reuse_state.named_children()},
                "fits": {n: m.hasher.fits for n, m in gm.reuse_state.named_children()},
                "params": [p.detach() for p in gm.parameters()],
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("hashing", ["random", "pca"])
def test_ddp_two_ranks_take_the_same_decisions(tmp_path, hashing):
    ctx = mp.start_processes(
        _worker, args=(str(tmp_path / "init"), str(tmp_path), hashing), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):  # never hang: give up after the deadline
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            raise AssertionError("distributed workers did not finish within 240 s")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["history"] and r0["history"] == r1["history"]
    assert r0["history"][0]["step"] == 4
    assert r0["stages"] == r1["stages"]
    for name in r0["planes"]:
        assert torch.equal(r0["planes"][name], r1["planes"][name])
    assert r0["fits"] == r1["fits"]
    if hashing == "pca":  # fitted in training (the stage switches at step 4 refit them), not placeholders
        assert all(f >= 1 for f in r0["fits"].values()), r0["fits"]
    for a, b in zip(r0["params"], r1["params"]):
        torch.testing.assert_close(a, b)
