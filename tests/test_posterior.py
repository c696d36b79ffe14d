"""L2MPosterior: modes, subsets, snapshot, sampling views, in-place samples, persistence."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import train_toy
from torch import nn

from l2m_fast import L2MPosterior
from l2m_fast.ops.reference import normals_ref


def _trained(wd: float = 0.1, steps: int = 5, groups: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    toy = train_toy(steps=steps, weight_decay=wd, groups=groups)
    return toy.model, toy.optimizer


def _vhat(opt: torch.optim.Optimizer, p: nn.Parameter) -> torch.Tensor:
    st = opt.state[p]
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    return st["exp_avg_sq"] / (1 - group["betas"][1] ** float(st["step"]))


def test_sample_batch_views_are_zero_copy_and_follow_the_contract():
    model, opt = _trained()
    post = L2MPosterior.from_optimizer(model, opt)
    batch = post.sample(6, seed=12)
    assert batch.flat.shape == (6, post.num_params) and len(batch) == 6
    w = batch["2.weight"]
    assert w.shape == (6, 1, 6)
    assert w.data_ptr() == batch.flat[:, post.layout["2.weight"].offset].data_ptr()
    z = normals_ref(post.num_params, 6, seed=12)
    torch.testing.assert_close(batch.flat, post.theta + z * post.variance().sqrt(), rtol=1e-5, atol=1e-6)
    assert set(batch.views()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_sample_chunks_and_out_buffer():
    model, opt = _trained()
    post = L2MPosterior.from_optimizer(model, opt)
    full = post.sample(10, seed=3).flat
    assert torch.equal(post.sample(4, seed=3, sample_offset=6).flat, full[6:])
    buf = torch.empty(10, post.num_params)
    assert post.sample(10, seed=3, out=buf).flat is buf
    assert torch.equal(buf, full)
    assert post.sample(2, seed=3, dtype=torch.bfloat16).flat.dtype == torch.bfloat16


def test_per_group_hyperparameters_in_paper_mode():
    model, opt = _trained(groups=True)
    post = L2MPosterior.from_optimizer(model, opt)
    expected = []
    for g in opt.param_groups:
        for p in g["params"]:
            expected.append((1.0 / (_vhat(opt, p) + 1.0 / g["weight_decay"] + g["eps"])).reshape(-1))
    torch.testing.assert_close(post.variance(), torch.cat(expected), rtol=1e-6, atol=0)
    assert post.seg_a.numel() == 2 and post.seg_bounds.tolist() == [0, 18, 25]
    assert "groups=[0, 1]" in repr(post)


def test_zero_weight_decay_in_paper_mode_names_the_group_and_the_way_out():
    model, opt = _trained(groups=True)
    opt.param_groups[1]["weight_decay"] = 0.0
    with pytest.raises(ValueError, match=r"param group 1 .*weight_decay=0.0.*mode='explicit'"):
        L2MPosterior.from_optimizer(model, opt)
    post = L2MPosterior.from_optimizer(model, opt, weight_decay={1: 0.5})
    assert post.num_params == 25


def test_explicit_mode_formula():
    model, opt = _trained()
    n, bsz = 32, 32
    post = L2MPosterior.from_optimizer(model, opt, mode="explicit", num_data=n, batch_size=bsz, temperature=2.0)
    v_hat = torch.cat([_vhat(opt, p).reshape(-1) for p in model.parameters()])
    expected = 2.0 / (n * bsz * v_hat + n * 0.1)
    torch.testing.assert_close(post.variance(), expected, rtol=1e-5, atol=0)
    post2 = L2MPosterior.from_optimizer(model, opt, mode="explicit", fisher_scale=10.0, prior_precision=[3.0])
    torch.testing.assert_close(post2.variance(), 1.0 / (10.0 * v_hat + 3.0), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(mode="explicit"), ValueError, "fisher_scale"),
        (dict(mode="explicit", fisher_scale=1.0), ValueError, "prior_precision"),
        (dict(mode="explicit", fisher_scale=1.0, prior_precision=1.0, temperature=0.0), ValueError, "temperature"),
        (dict(mode="laplace"), ValueError, "mode must be one of"),
        (dict(mode="paper", fisher_scale=1.0), TypeError, "do not apply"),
        (dict(params="0.weight"), TypeError, "not one string"),
        (dict(params=["nope"]), KeyError, "not parameters of the model"),
        (dict(params=lambda n, p: False), ValueError, "no parameter is covered"),
        (dict(missing="ignore"), ValueError, "missing must be"),
    ],
)
def test_bad_options(kwargs, exc, match):
    model, opt = _trained()
    with pytest.raises(exc, match=match):
        L2MPosterior.from_optimizer(model, opt, **kwargs)


def test_subset_by_names_and_by_predicate():
    model, opt = _trained()
    last = L2MPosterior.from_optimizer(model, opt, params=lambda name, p: name.startswith("2."))
    assert last.layout.names == ("2.weight", "2.bias") and last.num_params == 7
    named = L2MPosterior.from_optimizer(model, opt, params=["2.bias", "0.weight"])
    assert named.layout.names == ("0.weight", "2.bias")  # model order, whatever the list's order
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with last.sampled(model, index=1, seed=0):
        assert torch.equal(model[0].weight, before["0.weight"])  # outside the subset: at the MAP
        assert not torch.equal(model[2].weight, before["2.weight"])


def test_snapshot_is_not_changed_by_further_training():
    model, opt = _trained()
    post = L2MPosterior.from_optimizer(model, opt)
    theta, v, s = post.theta.clone(), post.v.clone(), post.sample(3, seed=1).flat
    x = torch.randn(8, 2)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert torch.equal(post.theta, theta) and torch.equal(post.v, v)
    assert torch.equal(post.sample(3, seed=1).flat, s)


def test_sampled_writes_the_sample_and_restores_bit_for_bit():
    model, opt = _trained()
    post = L2MPosterior.from_optimizer(model, opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = post.sample(5, seed=9)
    with post.sampled(model, index=4, seed=9) as m:
        assert m is model
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), batch[name][4])
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name])


def test_sampled_restores_after_an_exception():
    model, opt = _trained()
    post = L2MPosterior.from_optimizer(model, opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), post.sampled(model, index=0, seed=1):
        raise RuntimeError("boom")
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name])


def test_sampled_refuses_a_model_of_another_shape():
    model, opt = _trained()
    post = L2MPosterior.from_optimizer(model, opt)
    other = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1))
    with pytest.raises(ValueError, match="'0.weight' has shape"), post.sampled(other):
        pass


def test_state_dict_round_trip_through_torch_save():
    model, opt = _trained(groups=True)
    post = L2MPosterior.from_optimizer(model, opt)
    buf = io.BytesIO()
    torch.save(post.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    restored = L2MPosterior.from_saved(state)
    assert restored.layout == post.layout and restored.mode == "paper"
    assert torch.equal(restored.sample(4, seed=2).flat, post.sample(4, seed=2).flat)
    other_model, other_opt = _trained(wd=0.3, steps=2)
    other = L2MPosterior.from_optimizer(other_model, other_opt)
    other.load_state_dict(state)
    assert torch.equal(other.variance(), post.variance())


def test_load_state_dict_checks_the_layout():
    model, opt = _trained()
    post = L2MPosterior.from_optimizer(model, opt)
    last = L2MPosterior.from_optimizer(model, opt, params=["2.weight", "2.bias"])
    with pytest.raises(ValueError, match="layout does not match"):
        post.load_state_dict(last.state_dict())


def test_direct_constructor_for_any_diagonal_gaussian():
    params = {"w": torch.zeros(3, 2), "b": torch.ones(4)}
    v = {"w": torch.full((3, 2), 3.0), "b": torch.zeros(4)}
    post = L2MPosterior(params, v, a=[1.0, 2.0], b=[1.0, 4.0], groups={"w": 0, "b": 1})
    torch.testing.assert_close(post.variance(), torch.tensor([0.25] * 6 + [0.25] * 4))
    assert post.mode == "custom" and post.layout.names == ("w", "b")
    with pytest.raises(KeyError, match="no second moment"):
        L2MPosterior(params, {"w": v["w"]})
    with pytest.raises(ValueError, match="not positive"):
        L2MPosterior(params, v, a=1.0, b=0.0)


def test_repr_says_size_groups_mode_dtype_device():
    model, opt = _trained()
    text = repr(L2MPosterior.from_optimizer(model, opt))
    for part in ("P=25", "tensors=4", "groups=[0]", "mode='paper'", "dtype=torch.float32", "device=cpu"):
        assert part in text


def test_a_live_posterior_reads_the_weights_and_state_with_no_copy():
    model, opt = _trained()
    snap = L2MPosterior.from_optimizer(model, opt)
    live = L2MPosterior.from_optimizer(model, opt, snapshot=False)
    assert live.live and not snap.live and "snapshot=False" in repr(live)
    assert torch.equal(live.sample(5, seed=2).flat, snap.sample(5, seed=2).flat)
    for piece, p in zip(live._store.thetas, model.parameters()):
        assert piece.data_ptr() == p.data_ptr()  # the parameter's own storage, not a copy
    x = torch.randn(3, 2)
    with torch.no_grad():
        before = {n: p.clone() for n, p in model.named_parameters()}
        with live.sampled(model, 4, seed=2):  # the parameters are rebound; the tensors it reads are not written
            assert torch.equal(live.sample(5, seed=2).flat[4], snap.sample(5, seed=2).flat[4])
            model(x)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    nn.functional.mse_loss(model(x), torch.zeros(3, 1)).backward()
    opt.step()  # training on: the live posterior follows, the snapshot does not
    assert not torch.equal(live.theta, snap.theta)
    assert torch.equal(live.theta, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    with pytest.raises(ValueError, match="reads the live tensors where they are"):
        live.to("cpu")


def test_a_live_posterior_needs_float32_contiguous_tensors():
    model, opt = _trained()
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="snapshot=True"):
        L2MPosterior.from_optimizer(model, opt, snapshot=False)
