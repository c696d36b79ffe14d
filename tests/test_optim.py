"""Second moments from each supported optimizer, live and from state_dicts, and their errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from l2m_fast import L2MPosterior


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 7) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=g)
    y = torch.randn(16, 2, generator=g)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _expected_variance(kind: str, opt: torch.optim.Optimizer, model: nn.Module) -> torch.Tensor:
    """Paper-mode variance computed independently from the raw state: 1 / (v_hat + 1/wd + eps)."""
    parts = []
    for p in model.parameters():
        st, group = opt.state[p], opt.param_groups[0]
        t = float(st["step"])
        if kind in ("Adam", "AdamW", "NAdam", "RAdam"):
            v_hat = st["exp_avg_sq"] / (1 - group["betas"][1] ** t)
        elif kind == "RMSprop":
            v_hat = st["square_avg"] / (1 - group["alpha"] ** t)
        elif kind == "Adadelta":
            v_hat = st["square_avg"] / (1 - group["rho"] ** t)
        else:  # Adagrad: the mean squared gradient over the steps
            v_hat = (st["sum"] - group["initial_accumulator_value"]) / t
        parts.append((1.0 / (v_hat.double() + 1.0 / group["weight_decay"] + group["eps"])).reshape(-1))
    return torch.cat(parts)


OPTIMIZERS = [
    ("Adam", dict(lr=1e-2, weight_decay=0.1)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1, foreach=True)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1, fused=True)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.5)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.5, foreach=False)),
    ("NAdam", dict(lr=1e-2, weight_decay=0.2)),
    ("RAdam", dict(lr=1e-2, weight_decay=0.2)),
    ("RMSprop", dict(lr=1e-3, weight_decay=0.3)),
    ("RMSprop", dict(lr=1e-3, weight_decay=0.3, centered=True, momentum=0.9)),
    ("Adagrad", dict(lr=1e-2, weight_decay=0.3, initial_accumulator_value=0.1)),
    ("Adadelta", dict(lr=1.0, weight_decay=0.3)),
]


@pytest.mark.parametrize(("kind", "kwargs"), OPTIMIZERS, ids=lambda x: str(x))
def test_paper_variance_from_each_optimizer(kind, kwargs):
    model = _mlp()
    opt = getattr(torch.optim, kind)(model.parameters(), **kwargs)
    _train(model, opt)
    post = L2MPosterior.from_optimizer(model, opt)
    expected = _expected_variance(kind, opt, model)
    torch.testing.assert_close(post.variance().double(), expected, rtol=1e-5, atol=0)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(post.theta, theta)
    # the same posterior from the checkpoint
    post2 = L2MPosterior.from_state_dict(model, opt.state_dict())
    assert torch.equal(post2.variance(), post.variance())
    assert torch.equal(post2.sample(3, seed=4).flat, post.sample(3, seed=4).flat)


def test_capturable_optimizer_state_with_tensor_steps():
    """Capturable Adam steps only on accelerators; its state (tensor steps, same keys) is loaded here."""
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt, steps=3)
    cap = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1, capturable=True)
    cap.load_state_dict(opt.state_dict())  # loading restores the saved group flags: set it again
    cap.param_groups[0]["capturable"] = True
    assert isinstance(next(iter(cap.state.values()))["step"], torch.Tensor)
    post = L2MPosterior.from_optimizer(model, cap)
    torch.testing.assert_close(post.variance().double(), _expected_variance("Adam", opt, model), rtol=1e-5, atol=0)


def test_amsgrad_uses_the_current_moment_not_the_maximum():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
    _train(model, opt)
    post = L2MPosterior.from_optimizer(model, opt)
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    assert torch.equal(post.v, v)


@pytest.mark.parametrize("kind", ["SGD", "Adamax", "LBFGS"])
def test_optimizer_without_second_moment_is_refused(kind):
    model = _mlp()
    opt = getattr(torch.optim, kind)(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="Adam, AdamW.*pass the second moments directly"):
        L2MPosterior.from_optimizer(model, opt)


def test_state_dict_of_unsupported_optimizer_is_refused():
    model = _mlp()
    opt = torch.optim.Adamax(model.parameters(), lr=0.1)
    _train(model, opt, steps=1)
    with pytest.raises(TypeError, match="no second moment"):
        L2MPosterior.from_state_dict(model, opt.state_dict())


def test_parameter_without_state_raises_or_is_kept_at_map():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model[2].bias.requires_grad_(False)  # never gets a gradient, so no state
    _train(model, opt)
    with pytest.raises(ValueError, match=r"'2.bias' has no optimizer state.*missing='skip'"):
        L2MPosterior.from_optimizer(model, opt)
    post = L2MPosterior.from_optimizer(model, opt, missing="skip")
    assert "2.bias" not in post.layout
    assert "kept at the MAP: 2.bias (no optimizer state)" in repr(post)


def test_parameters_outside_the_optimizer_are_listed():
    model = _mlp()
    opt = torch.optim.AdamW(model[0].parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt)
    post = L2MPosterior.from_optimizer(model, opt)
    assert post.layout.names == ("0.weight", "0.bias")
    assert "2.weight (not in the optimizer)" in repr(post)
    with pytest.raises(ValueError, match="'2.weight' was asked for in params but the optimizer does not hold it"):
        L2MPosterior.from_optimizer(model, opt, params=["0.weight", "2.weight"])


def test_optimizer_of_another_model_is_refused():
    model, other = _mlp(), _mlp(1)
    opt = torch.optim.AdamW(other.parameters(), lr=1e-2, weight_decay=0.1)
    _train(other, opt)
    with pytest.raises(ValueError, match="not in the model"):
        L2MPosterior.from_optimizer(model, opt)


def test_state_dict_count_and_shape_mismatch():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt)
    sd = opt.state_dict()
    bigger = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="holds 4 parameters but .* gives 6: pass param_names"):
        L2MPosterior.from_state_dict(bigger, sd)
    wider = nn.Sequential(nn.Linear(3, 9), nn.ReLU(), nn.Linear(9, 2))
    with pytest.raises(ValueError, match="'0.weight': optimizer state 'exp_avg_sq' has shape \\(8, 3\\)"):
        L2MPosterior.from_state_dict(wider, sd)
    with pytest.raises(KeyError, match="not parameters of the model"):
        L2MPosterior.from_state_dict(model, sd, param_names=["a", "b", "c", "d"])


def test_state_dict_with_explicit_param_names_in_another_order():
    model = _mlp()
    groups = [{"params": [model[2].weight, model[2].bias]}, {"params": [model[0].weight, model[0].bias]}]
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
    _train(model, opt)
    names = ["2.weight", "2.bias", "0.weight", "0.bias"]
    post = L2MPosterior.from_state_dict(model, opt.state_dict(), param_names=names)
    live = L2MPosterior.from_optimizer(model, opt)
    assert torch.equal(post.variance(), live.variance())


def test_state_dict_with_named_parameters():
    model = _mlp()
    opt = torch.optim.AdamW(list(model.named_parameters())[::-1], lr=1e-2, weight_decay=0.1)
    _train(model, opt)
    sd = opt.state_dict()
    assert "param_names" in sd["param_groups"][0]
    post = L2MPosterior.from_state_dict(model, sd)
    assert torch.equal(post.variance(), L2MPosterior.from_optimizer(model, opt).variance())


CORRUPT = [(float("nan"), "non-finite"), (float("inf"), "non-finite"), (-1.0, "negative")]


@pytest.mark.parametrize(("bad", "match"), CORRUPT)
def test_corrupt_second_moments_are_refused(bad, match):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt)
    opt.state[model[2].weight]["exp_avg_sq"][0, 1] = bad
    with pytest.raises(ValueError, match=f"'2.weight'.*{match}"):
        L2MPosterior.from_optimizer(model, opt)


def test_unknown_state_dict_needs_the_optimizer_class():
    model = _mlp()
    sd = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1, 2, 3]}]}
    with pytest.raises(TypeError, match="pass optimizer=<its class>"):
        L2MPosterior.from_state_dict(model, sd)


def test_state_dict_with_several_groups_needs_names():
    """Groups need not follow the model's order: without names, matching by position could swap them."""
    model = _mlp()
    groups = [{"params": model[2].parameters(), "weight_decay": 0.5}, {"params": model[0].parameters()}]
    opt = torch.optim.Adam(groups, lr=1e-2, weight_decay=0.1)
    _train(model, opt)
    with pytest.raises(ValueError, match="2 parameter groups and no parameter names.*param_names"):
        L2MPosterior.from_state_dict(model, opt.state_dict())


def test_state_dict_with_string_ids_after_json():
    import json

    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt)
    sd = opt.state_dict()
    texty = {"state": {str(k): v for k, v in sd["state"].items()}, "param_groups": json.loads(json.dumps(
        [{k: v for k, v in g.items()} for g in sd["param_groups"]]))}
    post = L2MPosterior.from_state_dict(model, texty)
    assert torch.equal(post.variance(), L2MPosterior.from_optimizer(model, opt).variance())


def test_wrapper_prefix_names_the_way_out():
    model = _mlp()
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt)
    sd = opt.state_dict()
    sd["param_groups"][0]["param_names"] = ["module." + n for n in sd["param_groups"][0]["param_names"]]
    with pytest.raises(KeyError, match="'module.'.*pass param_names"):
        L2MPosterior.from_state_dict(model, sd)


@pytest.mark.parametrize(("kind", "kwargs"), [("Adadelta", dict(rho=1.0)), ("RMSprop", dict(alpha=1.0))])
def test_decay_of_one_has_no_average(kind, kwargs):
    model = _mlp()
    opt = getattr(torch.optim, kind)(model.parameters(), lr=1e-3, weight_decay=0.1, **kwargs)
    _train(model, opt, steps=2)
    with pytest.raises(ValueError, match="decay rate of 1.0.*pass the second moments directly"):
        L2MPosterior.from_optimizer(model, opt)


def test_float64_parameters_warn_about_float32_sampling():
    model = _mlp().double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g).double(), torch.randn(8, 2, generator=g).double()
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    with pytest.warns(UserWarning, match="float64.*rounded to float32"):
        post = L2MPosterior.from_optimizer(model, opt)
    assert post.theta.dtype == torch.float32
