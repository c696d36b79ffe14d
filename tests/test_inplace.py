"""In-place sampling: one sampler call per sample into bound parameters, bit-exact restore."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_restored, mlp, posterior_with_random_v, snapshot
from torch import nn

from l2m_fast import InPlaceOrderError, L2MPosterior, ModelInUseError, ParamBinding, SampleWriter
from l2m_fast.ops.sample import MAX_SAMPLES


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    return mlp().to(dtype)


def _posterior(model: nn.Module, names: list[str] | None = None) -> L2MPosterior:
    return posterior_with_random_v(model, b=3.0, names=names)


def _flat(model: nn.Module, post: L2MPosterior) -> torch.Tensor:
    named = dict(model.named_parameters())
    return torch.cat([named[n].detach().reshape(-1).float() for n in post.layout.names])


@pytest.mark.parametrize("index", [0, 1, 6, 4097])
def test_sampled_writes_the_row_and_restores_exactly(index: int) -> None:
    model = _model()
    post = _posterior(model)
    snap = snapshot(model)
    params_before = list(model.parameters())
    row = post.sample(index + 1, seed=5).flat[index]
    with post.sampled(model, index=index, seed=5) as m:
        assert m is model
        assert torch.equal(_flat(model, post), row)
        assert all(p is q for p, q in zip(model.parameters(), params_before))  # identity kept
    assert_restored(model, snap)


def test_sampled_restores_after_an_exception_and_discards_writes() -> None:
    model = _model()
    post = _posterior(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="inside"), post.sampled(model, index=2, seed=0):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        raise ValueError("inside")
    assert_restored(model, snap)


def test_one_work_buffer_bound_zero_copy_and_reused_by_the_next_context() -> None:
    model = _model()
    post = _posterior(model)
    writer = SampleWriter(post, model)
    with writer:
        writer.write(0, seed=1)
        (buf,) = writer._buffers  # one dtype: one buffer, one sampler call per sample
        assert buf.numel() == post.num_params
        lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
        for p in model.parameters():
            assert lo <= p.data_ptr() < hi
        writer.write(3, seed=1)
        assert torch.equal(buf, post.sample(4, seed=1).flat[3])
        views = writer._work[1]
    assert writer._buffers is None and not writer.active
    with SampleWriter(post, model) as again:  # the next context takes the same buffer: nothing allocated
        again.write(1, seed=1)
        assert again._buffers[0].data_ptr() == buf.data_ptr()
        # ... and binds the parameters to the same views of it, made once (not sliced again per context)
        assert again._work[1] is views


def test_subset_leaves_other_parameters_alone() -> None:
    model = _model()
    post = _posterior(model, names=["2.weight"])
    first = model[0].weight
    ptr = first.data_ptr()
    with post.sampled(model, index=1, seed=0):
        assert model[0].weight.data_ptr() == ptr
        assert torch.equal(model[2].weight.detach().reshape(-1), post.sample(2, seed=0).flat[1])


@pytest.mark.parametrize(
    ("dtype", "atol"),
    [(torch.bfloat16, 0.0), (torch.float16, 0.0), (torch.float64, 0.0)],
)
def test_other_parameter_dtypes(dtype: torch.dtype, atol: float) -> None:
    model = _model(dtype)
    post = _posterior(model)
    snap = snapshot(model)
    out_dtype = dtype if dtype != torch.float64 else torch.float32
    row = post.sample(3, seed=2, dtype=out_dtype).flat[2]
    with post.sampled(model, index=2, seed=2):
        named = dict(model.named_parameters())
        got = torch.cat([named[n].detach().reshape(-1) for n in post.layout.names])
        assert got.dtype == dtype
        torch.testing.assert_close(got, row.to(dtype), rtol=0, atol=atol)
    assert_restored(model, snap)


def test_mixed_dtypes_one_call_per_run() -> None:
    model = _model()
    model[2].to(torch.float64)
    post = _posterior(model)
    row = post.sample(2, seed=4).flat[1]
    with SampleWriter(post, model) as writer:
        writer.write(1, seed=4)
        assert len(writer._buffers) == 2
        got = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
        torch.testing.assert_close(got, row.double(), rtol=0, atol=0)


def test_iter_sampled_matches_sample_and_restores() -> None:
    model = _model()
    post = _posterior(model)
    snap = snapshot(model)
    flat = post.sample(9, seed=7).flat
    seen = []
    with post.iter_sampled(model, num_samples=5, seed=7, sample_offset=4) as it:
        assert len(it) == 5
        for s in it:
            seen.append(s)
            assert torch.equal(_flat(model, post), flat[s])
    assert seen == [4, 5, 6, 7, 8]
    assert_restored(model, snap)
    for _ in post.iter_sampled(model, num_samples=2, seed=0):  # exhausted without a with block
        pass
    assert_restored(model, snap)


def test_iter_sampled_restores_on_break_and_exception() -> None:
    model = _model()
    post = _posterior(model)
    snap = snapshot(model)
    with post.iter_sampled(model, num_samples=100, seed=0) as it:
        for s in it:
            if s == 2:
                break
    assert_restored(model, snap)
    with pytest.raises(KeyError), post.iter_sampled(model, num_samples=100, seed=0) as it:
        for s in it:
            if s == 3:
                raise KeyError(s)
    assert_restored(model, snap)


def test_iter_sampled_far_sample_indices_need_one_copy() -> None:
    """Indices near the 2^32 limit: nothing of size S is ever allocated, only the (P,) work buffer."""
    model = _model()
    post = _posterior(model)
    start = MAX_SAMPLES - 3
    rows = post.sample(3, seed=1, sample_offset=start).flat
    with post.iter_sampled(model, num_samples=3, seed=1, sample_offset=start) as it:
        for k, _ in enumerate(it):
            assert torch.equal(_flat(model, post), rows[k])


def test_binding_checks_shapes() -> None:
    model = _model()
    binding = ParamBinding(dict(model.named_parameters()))
    with pytest.raises(ValueError, match="cannot bind"), binding:
        binding.bind({n: torch.zeros(1) for n, _ in model.named_parameters()})
    assert not binding.bound


def test_zipped_iterators_refuse_to_interleave_and_restore_the_originals() -> None:
    """Two iterators over one model cannot both hold it: the one not innermost refuses to draw."""
    model = _model()
    post = _posterior(model)
    snap = snapshot(model)
    with pytest.raises(InPlaceOrderError, match="entered after this one"):
        for _a, _b in zip(post.iter_sampled(model, 3, seed=0), post.iter_sampled(model, 3, seed=1)):
            pass
    assert_restored(model, snap)


def test_iterator_closed_inside_a_sampled_block_hands_over_the_originals() -> None:
    model = _model()
    post = _posterior(model)
    snap = snapshot(model)
    it = post.iter_sampled(model, 5, seed=0)
    next(it)
    inner_row = post.sample(3, seed=9).flat[2]
    with post.sampled(model, 2, seed=9):
        it.close()  # out of order: the sampled() block keeps its sample ...
        assert torch.equal(_flat(model, post), inner_row)
    assert_restored(model, snap)  # ... and its exit brings back the originals, not the iterator's sample


@pytest.mark.parametrize("order", ["lifo", "fifo"])
def test_nested_contexts_restore_whatever_the_order_of_exits(order: str) -> None:
    model = _model()
    post_all = _posterior(model)
    post_head = _posterior(model, names=["2.weight", "2.bias"])
    snap = snapshot(model)
    outer = SampleWriter(post_all, model)
    inner = SampleWriter(post_head, model)
    outer.write(0, seed=1)
    outer_row = _flat(model, post_all)
    inner.write(1, seed=2)
    head = dict(model.named_parameters())["2.weight"].detach().clone()
    assert torch.equal(head.reshape(-1), post_head.sample(2, seed=2).flat[1][: head.numel()])
    if order == "lifo":
        inner.restore()
        assert torch.equal(_flat(model, post_all), outer_row)  # the outer sample is back
        outer.restore()
    else:
        outer.restore()  # the first layer gets its originals back; the head keeps the inner sample
        assert torch.equal(dict(model.named_parameters())["2.weight"].detach(), head)
        assert torch.equal(model[0].weight.detach(), snap["0.weight"][0])
        inner.restore()
    assert_restored(model, snap)


def test_another_thread_is_refused_and_nothing_changes() -> None:
    import threading

    model = _model()
    post = _posterior(model)
    snap = snapshot(model)
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with post.sampled(model, 1, seed=0):
                pass
        except BaseException as err:  # noqa: BLE001 - recorded for the assertion
            errors.append(err)

    with post.sampled(model, 0, seed=0):
        held = _flat(model, post).clone()
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert torch.equal(_flat(model, post), held)  # the other thread changed nothing
    assert len(errors) == 1 and isinstance(errors[0], ModelInUseError)
    assert "another thread" in str(errors[0])
    assert_restored(model, snap)
    with post.sampled(model, 1, seed=0):  # released: usable again, from any thread
        pass
    assert_restored(model, snap)
