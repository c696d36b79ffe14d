"""Sharded posteriors (FSDP2 / DTensor) on 2 CPU processes with gloo on loopback.

Two processes are spawned once per module; each runs every scenario and records its outcome, and each
test below asserts one scenario's outcome on both ranks. Every wait is bounded: the process group has
a timeout and the processes are joined with a deadline, then killed, so a failure never hangs CI.

The single-process reference is built in each worker from the *gathered* sharded state (gathering
happens in the test only), so the comparisons are about sampling, not about training equivalence.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import l2m_fast
from l2m_fast.distributed import posterior_from_checkpoint
from l2m_fast.sharding import box_runs, is_dtensor, local_box, localize, reshard_fsdp

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

WORLD = 2
SEED = (1 << 40) + 3
JOIN_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ models and references


def _mlp() -> nn.Module:
    # 0.weight 7x3 (rows 4 | 3), 0.bias 7 (4 | 3), 2.weight 1x7 (1 | 0: rank 1 empty), 2.bias 1 (1 | 0)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 1))


def _groups(model: nn.Module) -> list[dict]:
    ps = list(model.parameters())
    return [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.05}]


def _fsdp_trained(mesh) -> tuple[nn.Module, torch.optim.Optimizer, Tensor]:  # noqa: ANN001
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(_groups(model), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=gen)
    y = torch.randn(16, 1, generator=gen)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt, x


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _reference(model: nn.Module, opt: torch.optim.Optimizer, make: type | None = None) -> tuple[nn.Module, object]:
    """The unsharded model and its single-process posterior, from the gathered sharded state."""
    plain = _mlp() if make is None else make()
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in plain.named_parameters():
            p.copy_(_full(named[n].detach()))
    ref_opt = torch.optim.Adam(_groups(plain), lr=0.05)
    for p, q in zip(plain.parameters(), model.parameters()):
        ref_opt.state[p] = {k: _full(v).clone() for k, v in opt.state[q].items()}
    return plain, l2m_fast.L2MPosterior.from_optimizer(plain, ref_opt)


def _box(p: Tensor) -> tuple[slice, ...]:
    _, shape, offset = local_box("p", p)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _check_local_equals_ref(post, ref, model: nn.Module, s: int, dtype: torch.dtype) -> None:  # noqa: ANN001
    batch = post.sample(s, SEED, sample_offset=1, dtype=dtype)
    ref_batch = ref.sample(s, SEED, sample_offset=1, dtype=dtype)
    named = dict(model.named_parameters())
    for slot in post.layout:
        want = ref_batch[slot.name][(slice(None), *_box(named[slot.name]))]
        assert torch.equal(batch[slot.name], want), slot.name
    # gathered: every rank's (runs, samples) put back at their global indices
    got = [None] * WORLD
    dist.all_gather_object(got, (post.runs, batch.flat))
    full = torch.full((s, post.global_numel), float("nan"), dtype=dtype)
    for runs, flat in got:
        for lo, go, n in runs:
            full[:, go : go + n] = flat[:, lo : lo + n]
    assert torch.equal(full, ref_batch.flat)


# ------------------------------------------------------------------ scenarios (run on every rank)


def _scenario_fsdp_samples(mesh, tmpdir: str) -> None:  # noqa: ANN001
    model, opt, _ = _fsdp_trained(mesh)
    # construction and sampling communicate nothing: rank 0 alone builds and samples while rank 1 waits
    # on a file (not a collective); a collective inside would block rank 0 until the group's timeout
    flag = os.path.join(tmpdir, "alone.done")
    if dist.get_rank() == 0:
        try:
            l2m_fast.L2MPosterior.from_optimizer(model, opt).sample(2, SEED)
        finally:
            open(flag, "w").close()
    else:
        deadline = time.monotonic() + 30
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.05)
    post = l2m_fast.L2MPosterior.from_optimizer(model, opt)
    _, ref = _reference(model, opt)
    assert post.is_sharded and not ref.is_sharded
    assert post.global_numel == ref.num_params == 36
    assert post.num_params == (24 if dist.get_rank() == 0 else 12)
    assert post.seg_a.numel() == 2  # two groups: runs cut across the segments
    _check_local_equals_ref(post, ref, model, 6, torch.float32)
    _check_local_equals_ref(post, ref, model, 5, torch.bfloat16)
    _check_local_equals_ref(post, ref, model, 1, torch.float32)
    saved = l2m_fast.L2MPosterior.from_saved(post.state_dict())
    assert saved.runs == post.runs and torch.equal(saved.sample(3, SEED).flat, post.sample(3, SEED).flat)


def _scenario_fsdp_sampled(mesh, tmpdir: str) -> None:  # noqa: ANN001
    model, opt, x = _fsdp_trained(mesh)
    post = l2m_fast.L2MPosterior.from_optimizer(model, opt)
    plain, ref = _reference(model, opt)
    before = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        y0 = model(x)
        outs, ref_outs = [], []
        for k in range(4):
            with post.sampled(model, k, SEED):
                outs.append(model(x))
            with ref.sampled(plain, k, SEED):
                ref_outs.append(plain(x))
        mean, ref_mean = torch.stack(outs).mean(0), torch.stack(ref_outs).mean(0)
        assert torch.equal(mean, ref_mean)  # the all-gathered weights are the sample, bit for bit
        assert not torch.allclose(mean, y0)
        pred = post.predict(model, x, num_samples=4, seed=SEED)  # the sharded path: a loop over sampled()
        ref_pred = ref.predict(plain, x, num_samples=4, seed=SEED, method="loop")
        torch.testing.assert_close(pred.mean, ref_pred.mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(pred.epistemic_var, ref_pred.epistemic_var, rtol=1e-5, atol=1e-6)
        it_outs = []
        with post.iter_sampled(model, 3, SEED, sample_offset=1) as samples:  # local shards written in turn
            for _ in samples:
                it_outs.append(model(x))
        assert all(torch.equal(a, b) for a, b in zip(it_outs, outs[1:4]))
        with pytest.raises(RuntimeError, match="boom"), post.sampled(model, 9, SEED):
            model(x)
            raise RuntimeError("boom")
        y1 = model(x)
    reshard_fsdp(model)  # the forward above left the root unsharded
    after = {n: p.to_local() for n, p in model.named_parameters()}
    for n in before:
        assert torch.equal(before[n], after[n]), n
    assert torch.equal(y0, y1)


def _scenario_dtensor_replicate(mesh, tmpdir: str) -> None:  # noqa: ANN001
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(2)
            self.rep = nn.Parameter(torch.randn(5, 2))
            self.rows = nn.Parameter(torch.randn(5, 3))
            self.cols = nn.Parameter(torch.randn(4, 6))

    placements = {"rep": [Replicate()], "rows": [Shard(0)], "cols": [Shard(1)]}
    model = Toy()
    for n, p in list(model.named_parameters()):
        setattr(model, n, nn.Parameter(distribute_tensor(p.detach(), mesh, placements[n])))
    opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        for n, p in model.named_parameters():
            p.grad = distribute_tensor(torch.randn(p.shape, generator=gen), mesh, placements[n])
        opt.step()
    post = l2m_fast.L2MPosterior.from_optimizer(model, opt)
    plain = Toy()
    with torch.no_grad():
        for n, p in plain.named_parameters():
            p.copy_(getattr(model, n).full_tensor())
    ref_opt = torch.optim.Adam(plain.parameters(), lr=0.05, weight_decay=0.1)
    for p, q in zip(plain.parameters(), model.parameters()):
        ref_opt.state[p] = {k: _full(v).clone() for k, v in opt.state[q].items()}
    ref = l2m_fast.L2MPosterior.from_optimizer(plain, ref_opt)
    assert post.layout["rep"].shape == (5, 2)  # a Replicate parameter is held and sampled whole
    assert len([r for r in post.runs if r[2] == 3]) == 4  # Shard(1) of 4x6: one run per row
    _check_local_equals_ref(post, ref, model, 4, torch.float32)
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    row = ref.sample(1, SEED, sample_offset=2).flat[0]
    with post.sampled(model, 2, SEED):
        for n, p in model.named_parameters():
            assert torch.equal(p.full_tensor(), ref.layout.views(row)[n]), n
    for n, p in model.named_parameters():
        assert torch.equal(p.to_local(), before[n]), n
    # a full (unsharded) moment next to a sharded parameter: each rank slices its own box, no gather
    full_v = ref_opt.state[plain.cols]["exp_avg_sq"]
    local = localize([("cols", model.cols, full_v)])[0][0]
    assert torch.equal(local[2], opt.state[model.cols]["exp_avg_sq"].to_local())
    with pytest.raises(ValueError, match="must match"):
        localize([("cols", model.cols, distribute_tensor(full_v, mesh, [Replicate()]))])


def _scenario_dcp(mesh, tmpdir: str) -> None:  # noqa: ANN001
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    model, opt, _ = _fsdp_trained(mesh)
    post = l2m_fast.L2MPosterior.from_optimizer(model, opt)
    path = os.path.join(tmpdir, "ckpt")
    dcp.save(
        {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=path
    )
    # a name-keyed (FQN) sharded optimizer state dict, straight into from_state_dict
    from_sd = l2m_fast.L2MPosterior.from_state_dict(model, get_optimizer_state_dict(model, opt))
    assert from_sd.runs == post.runs and torch.equal(from_sd.sample(3, SEED).flat, post.sample(3, SEED).flat)
    # a full (unsharded) optimizer state dict on every rank: each rank slices its shards out of it
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    full_sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    assert not is_dtensor(full_sd["state"]["0.weight"]["exp_avg_sq"])
    from_full = l2m_fast.L2MPosterior.from_state_dict(model, full_sd)
    assert from_full.runs == post.runs and torch.equal(from_full.sample(3, SEED).flat, post.sample(3, SEED).flat)
    fresh = _mlp()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fully_shard(fresh[0], mesh=mesh)
    fully_shard(fresh, mesh=mesh)
    loaded = posterior_from_checkpoint(fresh, torch.optim.Adam(_groups(fresh)), path)
    assert loaded.runs == post.runs
    assert torch.equal(loaded.theta, post.theta) and torch.equal(loaded.v, post.v)
    assert torch.equal(loaded.seg_b, post.seg_b) and torch.equal(loaded.seg_a, post.seg_a)
    assert torch.equal(loaded.sample(3, SEED).flat, post.sample(3, SEED).flat)


def _scenario_fisher(mesh, tmpdir: str) -> None:  # noqa: ANN001
    """The sampled-label Fisher tracked on DTensor parameters: each rank accumulates its local shards (no
    gather), equal to the same slices of the unsharded model's, and so is the posterior's variance."""
    from torch.distributed.tensor import Shard, distribute_tensor

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(4)
            self.w = nn.Parameter(torch.randn(5, 3) * 0.5)  # 5 classes: rows 3 | 2 over the two ranks
            self.b = nn.Parameter(torch.randn(5) * 0.1)

        def forward(self, x: Tensor) -> Tensor:
            w, b = self.w, self.b
            if is_dtensor(w):  # the whole logits on every rank; gradients flow back to the shards
                w, b = w.full_tensor(), b.full_tensor()
            return x @ w.T + b

    plain, model = Head(), Head()
    for n in ("w", "b"):
        setattr(model, n, nn.Parameter(distribute_tensor(getattr(model, n).detach(), mesh, [Shard(0)])))
    tracker, ref = l2m_fast.FisherTracker(model, seed=5), l2m_fast.FisherTracker(plain, seed=5)
    gen = torch.Generator().manual_seed(6)
    for _ in range(4):
        x = torch.randn(16, 3, generator=gen)
        assert tracker.update(model(x)) and ref.update(plain(x))
    for n, f in tracker.fisher().items():
        want = ref.fisher()[n][_box(getattr(model, n))]
        assert f.shape == want.shape and not is_dtensor(f), n
        torch.testing.assert_close(f, want, rtol=1e-5, atol=1e-8)
    post = l2m_fast.L2MPosterior.from_fisher(model, tracker, num_data=64, prior_precision=2.0)
    ref_post = l2m_fast.L2MPosterior.from_fisher(plain, ref, num_data=64, prior_precision=2.0)
    assert post.is_sharded
    where = torch.cat([torch.arange(go, go + k) for _, go, k in post.runs])  # this rank's global indices
    torch.testing.assert_close(post.variance(), ref_post.variance()[where], rtol=1e-5, atol=0)


def _scenario_fisher_fsdp2(mesh, tmpdir: str) -> None:  # noqa: ANN001
    """Under FSDP2 the tracker differentiates the unsharded parameters of the forward: each rank's Fisher
    is its own rows of the unsharded model's tracker on its own inputs (uneven shards, an empty one); the
    training gradients are those of a run without the tracker; the posterior from it is sharded."""
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    plain, model = _mlp(), _mlp()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    with torch.no_grad():  # a forward first: it leaves FSDP2's root unsharded, which the tracker must undo
        model(torch.zeros(2, 3))
    tracker = l2m_fast.FisherTracker(model, likelihood="regression", sigma=0.5, seed=9)
    named = dict(model.named_parameters())
    ref = l2m_fast.FisherTracker(plain, likelihood="regression", sigma=0.5, seed=9)
    for step in range(3):
        xs = [torch.randn(6, 3, generator=torch.Generator().manual_seed(100 * step + r)) for r in range(WORLD)]
        ys = [torch.randn(6, 1, generator=torch.Generator().manual_seed(200 * step + r)) for r in range(WORLD)]
        out = model(xs[rank])
        assert tracker.update(out) and ref.update(plain(xs[rank]))
        nn.functional.mse_loss(out, ys[rank]).backward()  # the training step's backward, after the tracker's
        plain.zero_grad()
        nn.functional.mse_loss(plain(torch.cat(xs)), torch.cat(ys)).backward()  # FSDP2 averages the ranks
        for (n, p), q in zip(named.items(), plain.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=f"training gradient of {n}")
            p.grad = None
    for n, f in tracker.fisher().items():
        want = ref.fisher()[n][_box(named[n])]
        assert f.shape == want.shape, n
        torch.testing.assert_close(f, want, rtol=1e-5, atol=1e-9)
    assert rank == 0 or tracker.fisher()["2.weight"].numel() == 0  # rank 1 holds no row of 2.weight
    # after training forwards (root unsharded again): a partial pass gives each rank its shards too
    est = l2m_fast.fisher_diag(model, [xs[rank]], likelihood="regression", sigma=0.5, seed=9)
    assert {n: f.shape for n, f in est.fisher.items()} == {n: f.shape for n, f in tracker.fisher().items()}
    post = l2m_fast.L2MPosterior.from_fisher(model, tracker, num_data=12, prior_precision=1.0)
    assert post.is_sharded and post.global_numel == sum(p.numel() for p in plain.parameters())


SCENARIOS = ("fsdp_samples", "fsdp_sampled", "dtensor_replicate", "dcp", "fisher", "fisher_fsdp2")


def _worker(rank: int, port: int, tmpdir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=20)
    )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    results: dict[str, str | None] = {}
    for name in SCENARIOS:
        fn = globals()[f"_scenario_{name}"]
        try:
            fn(mesh, tmpdir)
            results[name] = None
        except Exception:  # recorded and asserted by the test of that scenario
            results[name] = traceback.format_exc()
        torch.save(results, os.path.join(tmpdir, f"results.{rank}.pt"))  # kept if a later wait times out
        try:
            dist.barrier()
        except RuntimeError:  # the ranks fell out of step (a scenario failed on one rank): stop here
            break
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str | None]]:
    tmpdir = str(tmp_path_factory.mktemp("dist"))
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, tmpdir), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(timeout=max(deadline - time.monotonic(), 1.0))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(timeout=5)
    crash = f"workers killed after {JOIN_TIMEOUT_S:.0f} s" if hung else None
    codes = [p.exitcode for p in procs]
    if crash is None and any(codes):
        crash = f"workers exited with codes {codes}"
    out: list[dict[str, str | None]] = []
    for r in range(WORLD):
        path = os.path.join(tmpdir, f"results.{r}.pt")
        out.append(torch.load(path) if os.path.exists(path) else {})
        out[-1]["__crash__"] = crash
    return out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_ranks(outcomes: list[dict[str, str | None]], scenario: str) -> None:
    errors = [f"rank {r}:\n{o[scenario]}" for r, o in enumerate(outcomes) if o.get(scenario) is not None]
    assert not errors, "\n".join(errors)
    missing = [r for r, o in enumerate(outcomes) if scenario not in o]
    assert not missing, f"ranks {missing} did not finish this scenario ({outcomes[0]['__crash__']})"


# ------------------------------------------------------------------ single-process unit tests


@pytest.mark.parametrize(
    ("global_shape", "local_shape", "offset", "want"),
    [
        ((7, 3), (4, 3), (0, 0), [(0, 0, 12)]),
        ((7, 3), (3, 3), (4, 0), [(0, 12, 9)]),
        ((1, 7), (0, 7), (1, 0), []),
        ((4, 6), (4, 3), (0, 3), [(0, 3, 3), (3, 9, 3), (6, 15, 3), (9, 21, 3)]),
        ((2, 3, 4), (2, 2, 4), (0, 1, 0), [(0, 4, 8), (8, 16, 8)]),
        ((), (), (), [(0, 0, 1)]),
    ],
)
def test_box_runs(global_shape, local_shape, offset, want) -> None:  # noqa: ANN001
    runs = box_runs(global_shape, local_shape, offset)
    assert runs == want
    index = torch.arange(max(1, int(torch.tensor(global_shape).prod()))).reshape(global_shape)
    box = index[tuple(slice(o, o + n) for o, n in zip(offset, local_shape))].reshape(-1)
    got = torch.cat([torch.arange(go, go + n) for _, go, n in runs]) if runs else torch.empty(0, dtype=torch.long)
    assert torch.equal(got, box)
