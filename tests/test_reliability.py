"""Nothing lost under misuse: threads, tampered state, duplicated names, cast models, autograd-tracked
outputs, and the clear errors a user gets instead of a traceback from deep inside torch."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from conftest import assert_restored, mlp, posterior_with_random_v, snapshot, train_toy
from torch import nn

from l2m_fast import L2MEnsemble, L2MPosterior, ModelInUseError
from l2m_fast.cli import main


def _run_threads(fn, n: int = 2) -> list[BaseException]:  # noqa: ANN001
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def worker(k: int) -> None:
        start.wait()
        try:
            fn(k)
        except BaseException as err:  # noqa: BLE001 - recorded for the assertions
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_two_threads_predicting_on_one_model_are_right_or_refused(method: str) -> None:
    """Every result is the single-threaded one or a ModelInUseError; the weights end as they began."""
    model = mlp((3, 16, 2))
    post = posterior_with_random_v(model, b=20.0)
    x = torch.randn(8, 3)
    want = post.predict(model, x, 16, seed=1, method=method, progress=False).mean
    snap = snapshot(model)
    results: list[torch.Tensor] = []

    def work(_: int) -> None:
        for _ in range(20):
            with contextlib.suppress(ModelInUseError):  # refused while the other thread holds the model
                results.append(post.predict(model, x, 16, seed=1, method=method, progress=False).mean)

    assert not _run_threads(work)
    assert results and all(torch.equal(r, want) for r in results)
    assert_restored(model, snap)


def test_two_threads_in_sampled_contexts_are_right_or_refused() -> None:
    model = mlp()
    post = posterior_with_random_v(model)
    snap = snapshot(model)
    x = torch.randn(4, 3)
    rows = post.sample(2, seed=0).flat
    with torch.no_grad():
        wants = []
        for i in range(2):
            with post.sampled(model, i, seed=0):
                wants.append(model(x))
    refused = [0]
    wrong = []

    def work(k: int) -> None:
        for _ in range(30):
            try:
                with torch.no_grad(), post.sampled(model, k, seed=0):
                    got = model(x)
                    if not torch.equal(got, wants[k]):
                        wrong.append(k)
            except ModelInUseError:
                refused[0] += 1

    assert not _run_threads(work)
    assert not wrong
    assert_restored(model, snap)
    assert rows.shape[0] == 2


def test_a_tampered_state_is_refused_on_load() -> None:
    toy = train_toy()
    post = L2MPosterior.from_optimizer(toy.model, toy.optimizer)
    for key, value, match in [
        ("runs", [[0, 0, 10]], "runs"),
        ("runs", [[0, 0, post.num_params + 3]], "runs"),
        ("theta", torch.zeros(3), "theta"),
        ("v", -torch.ones(post.num_params), "v"),
        ("seg_bounds", torch.tensor([0, 5]), "v"),
        ("groups", {"0.weight": 0}, "groups"),
        ("temperature", float("nan"), "temperature"),
        ("logit_temperature", 0.0, "logit_temperature"),
        ("param_dtypes", {n: "int32" for n in post.layout.names}, "param_dtypes"),
        ("version", 99, "version"),
    ]:
        sd = post.state_dict()
        sd[key] = value
        with pytest.raises(ValueError, match=match):
            L2MPosterior.from_saved(sd)
    sd = post.state_dict()
    del sd["theta"]
    with pytest.raises(ValueError, match="'theta': missing"):
        L2MPosterior.from_saved(sd)


def test_repeated_param_names_are_refused() -> None:
    toy = train_toy()
    sd = toy.optimizer.state_dict()
    with pytest.raises(ValueError, match=r"names \['0.weight'\] more than once"):
        L2MPosterior.from_state_dict(toy.model, sd, param_names=["0.weight", "0.weight", "2.weight", "2.bias"])


def test_a_model_cast_after_the_posterior_is_sampled_alike_by_every_path() -> None:
    model = mlp((3, 8, 2)).to(torch.bfloat16)
    post = posterior_with_random_v(model)
    model.float()  # cast after the posterior was built
    x = torch.randn(5, 3)
    pred = post.predict(model, x, 4, seed=2, keep_samples=True, progress=False)
    with torch.no_grad():
        for s in range(4):
            with post.sampled(model, s, seed=2):  # float32 samples both ways (bf16 ones differ by ~1e-3)
                torch.testing.assert_close(model(x), pred.samples[s], rtol=1e-5, atol=1e-6)


def test_an_output_tracked_by_autograd_is_refused() -> None:
    post = posterior_with_random_v(mlp())
    leaf = torch.zeros(2, post.num_params, requires_grad=True)
    z = leaf * 1
    with pytest.raises(RuntimeError, match="requires grad"):
        post.sample(2, seed=1, out=z)
    with pytest.raises(RuntimeError, match="requires grad"):
        post.sample(2, seed=1, out=leaf)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda p, m: p.sample(2.5), TypeError, "num_samples must be an int"),
        (lambda p, m: p.sample(2**33), ValueError, "num_samples must lie in"),
        (lambda p, m: p.sample(-1), ValueError, "num_samples must lie in"),
        (lambda p, m: p.predict(m, torch.randn(2, 3), 2.0), ValueError, "num_samples must be a positive int"),
        (lambda p, m: p.predict(m, torch.randn(2, 3), 2, chunk_size=1.5), ValueError, "chunk_size"),
        (lambda p, m: p.predict(m, torch.randn(2, 3), 2, input_chunk=0), ValueError, "input_chunk"),
        (lambda p, m: p.predict(m, torch.randn(2, 3), 2, max_memory=-1), ValueError, "max_memory"),
        (lambda p, m: p.sample(2, seed=-1), ValueError, "seed"),
        (lambda p, m: p.sample_into(torch.empty(2, 3), columns=(2, 1)), ValueError, "columns"),
    ],
)
def test_bad_arguments_name_the_argument(call, exc, match) -> None:  # noqa: ANN001
    model = mlp()
    post = posterior_with_random_v(model)
    with pytest.raises(exc, match=match):
        call(post, model)


def test_integer_scalars_are_accepted_wherever_an_int_is() -> None:
    """NumPy integers (and 0-d integer tensors) count as ints for seeds, offsets, indices and counts."""
    np = pytest.importorskip("numpy")
    model = mlp()
    post = posterior_with_random_v(model)
    ref = post.sample(3, seed=3).flat
    assert torch.equal(post.sample(np.int64(2), seed=np.uint64(3), sample_offset=np.int32(1)).flat, ref[1:])
    assert torch.equal(post.sample(1, seed=torch.tensor(3)).flat, ref[:1])
    with post.sampled(model, np.int64(2), np.int64(3)):
        sampled = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(sampled, ref[2], rtol=0, atol=0)
    with post.sampled(model, torch.tensor(1), torch.tensor(3)):  # 0-d integer tensors
        got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, ref[1], rtol=0, atol=0)
    with post.iter_sampled(model, np.int32(2), seed=np.int32(3), sample_offset=torch.tensor(1)) as it:
        for i in it:
            assert type(i) is int
            got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            torch.testing.assert_close(got, post.sample(1, seed=3, sample_offset=i).flat[0], rtol=0, atol=0)
    assert list(post.iter_sampled(model, np.int32(2), seed=np.int32(3))) == [0, 1]
    x = torch.randn(4, 3)
    a = post.predict(model, x, np.int64(4), seed=np.int64(1), chunk_size=np.int64(3), progress=False)
    b = post.predict(model, x, 4, seed=1, progress=False)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-6, atol=1e-7)
    for bad in (True, np.bool_(True), torch.tensor(True), torch.tensor([3]), 1.0, torch.tensor(1.0), "1"):
        with pytest.raises(TypeError, match="seed must be an int"):
            post.sample(1, seed=bad)


def test_dict_outputs_say_to_use_output_fn() -> None:
    class DictNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.lin(x)}

    model = DictNet()
    post = posterior_with_random_v(model)
    x = torch.randn(4, 3)
    for task in ("regression", "classification"):
        with pytest.raises(TypeError, match="output_fn"):
            post.predict(model, x, 3, task=task, method="loop", progress=False)
    pred = post.predict(model, x, 3, task="classification", output_fn=lambda o: o["logits"], progress=False)
    assert pred.probs.shape == (4, 2)


def test_complex_and_meta_parameters_get_clear_errors() -> None:
    with pytest.raises(TypeError, match="real floating-point"):
        L2MPosterior({"w": torch.zeros(3, dtype=torch.complex64)}, {"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="meta device"):
        L2MPosterior({"w": torch.zeros(3, device="meta")}, {"w": torch.zeros(3, device="meta")})


def test_infinite_options_and_weights_are_refused() -> None:
    toy = train_toy()
    with pytest.raises(ValueError, match="weight_decay .*finite"):
        L2MPosterior.from_optimizer(toy.model, toy.optimizer, weight_decay=float("inf"))
    post = L2MPosterior.from_optimizer(toy.model, toy.optimizer)
    with pytest.raises(ValueError, match="finite"):
        L2MEnsemble([(toy.model, post), (toy.model, post)], weights=[1.0, float("inf")])


def test_the_reference_refuses_the_bounds_the_compiled_kernel_refuses() -> None:
    from l2m_fast.ops.reference import sample_diag_gaussian_ref

    theta = torch.zeros(5)
    out = torch.empty(2, 5)
    for bounds in ([0, 6], [1, 5], [0, 3, 2, 5]):
        b = torch.tensor(bounds)
        a = torch.ones(b.numel() - 1)
        with pytest.raises(ValueError, match="bounds"):
            sample_diag_gaussian_ref(theta, theta, a, a, b, 0, 0, 0, out)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--device", "cuda:x"], "is not a device"),
        (["bench", "--device", "meta"], "runs on cpu or cuda"),
        (["eval", "classification", "--out", "/proc/no/such"], "cannot write to --out"),
        (["demo", "--out", "/proc/no/such"], "cannot write to --out"),
    ],
)
def test_cli_usage_problems_are_messages_not_tracebacks(argv, message, capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_names_the_extra_for_a_missing_package(monkeypatch, capsys, tmp_path) -> None:  # noqa: ANN001
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--epochs", "1", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "pip install 'l2m_fast[demo]'" in capsys.readouterr().err
