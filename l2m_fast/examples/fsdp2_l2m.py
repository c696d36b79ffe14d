"""L2M on an FSDP2-sharded model: train, build the posterior from the sharded Adam state, predict.

Run on the CPU with two processes (gloo on loopback)::

    torchrun --nproc-per-node 2 -m l2m_fast.examples.fsdp2_l2m

Each rank keeps only its shards of the weights and of Adam's ``exp_avg_sq``; the posterior samples
them locally (no communication) with the global element indices, so the samples are exactly those one
process would draw for the unsharded model. The predictive is a loop over ``post.sampled``: each
sample is written into the local shards in place and the model's own forward all-gathers it.
The same script also saves a ``torch.distributed.checkpoint`` and rebuilds the posterior from it.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import l2m_fast
from l2m_fast.distributed import posterior_from_checkpoint


def make_model(mesh: object) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(), nn.Linear(50, 1))
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    # toy regression; every rank trains on its own half of the data (data parallel)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(256, 1, generator=gen) * 8 - 4
    y = torch.sin(x) + 0.1 * torch.randn(x.shape, generator=gen)
    xs, ys = x[rank::world], y[rank::world]
    model = make_model(mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)  # paper mode needs weight decay
    for _ in range(300):
        opt.zero_grad()
        nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()

    # the posterior of this rank's shards
    post = l2m_fast.L2MPosterior.from_optimizer(model, opt)  # paper mode: precision v_hat + 1/weight_decay + eps
    print(f"rank {rank}: {post.num_params} of {post.global_numel} elements, runs {post.runs[:3]}", flush=True)

    # predictive mean and spread: a loop over in-place samples (every rank runs every forward)
    grid = torch.linspace(-6, 6, 7).unsqueeze(1)
    with torch.no_grad():
        fit = model(grid)
        preds = []
        for s in range(32):
            with post.sampled(model, index=s, seed=0):
                preds.append(model(grid))
        preds = torch.stack(preds)
    if rank == 0:
        rows = zip(grid[:, 0].tolist(), fit[:, 0].tolist(), preds.mean(0)[:, 0].tolist(), preds.std(0)[:, 0].tolist())
        for xi, f, m, sd in rows:
            print(f"x={xi:+.1f}  sin={math.sin(xi):+.3f}  MAP={f:+.3f}  mean={m:+.3f}  std={sd:.3f}")

    # a distributed checkpoint of model and optimizer, and the posterior rebuilt from it
    tmp = [tempfile.mkdtemp(prefix="l2m_dcp_") if rank == 0 else None]
    dist.broadcast_object_list(tmp, src=0)
    path = os.path.join(tmp[0], "ckpt")
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=path)
    fresh = make_model(mesh)
    loaded = posterior_from_checkpoint(fresh, torch.optim.AdamW(fresh.parameters()), path)
    same = torch.equal(loaded.sample(4, seed=3).flat, post.sample(4, seed=3).flat)
    print(f"rank {rank}: posterior from the checkpoint samples identically: {same}", flush=True)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(tmp[0])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
