"""The chunked torch backend: every chunking and caching regime gives the oracle's numbers."""

import pytest
import torch

import softtriple_triton as st
from conftest import loss_and_grads, make_inputs, rel_err


@pytest.fixture
def budget():
    old = st.set_memory_budget()
    yield st.set_memory_budget
    st.set_memory_budget(**old)


@pytest.mark.parametrize("chunk_bytes", [1, 2000, 1 << 30], ids=["one-class-chunks", "few-class-chunks", "one-chunk"])
@pytest.mark.parametrize("cache_bytes", [0, 1 << 30], ids=["recompute", "cache"])
def test_chunking_and_caching_regimes(budget, chunk_bytes, cache_bytes):
    budget(chunk_bytes=chunk_bytes, cache_bytes=cache_bytes)
    x, w, y = make_inputs(23, 11, 17, 3, seed=9)
    g = torch.rand(23, dtype=torch.float64)
    kw = dict(la=30.0, gamma=0.05, tau=0.0, margin=0.05, reduction="none")
    want = loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y, 3, backend="reference", **kw), x, w, g)
    got = loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y, 3, backend="torch", **kw), x, w, g)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-12


def test_logits_chunked(budget):
    budget(chunk_bytes=500)
    x, w, _ = make_inputs(13, 9, 11, 4, seed=1)
    dS = torch.randn(13, 11, dtype=torch.float64)
    fn = lambda be: (lambda a, b: st.softtriple_logits(a, b, 4, backend=be) * dS)  # noqa: E731
    for a, b in zip(loss_and_grads(fn("torch"), x, w), loss_and_grads(fn("reference"), x, w)):
        assert rel_err(a, b) <= 1e-12


def test_backward_twice_with_retain_graph_is_exact(budget):
    """The cache is consumed in place by the first backward; a second backward must recompute correctly."""
    budget(cache_bytes=1 << 30)
    x, w, y = make_inputs(10, 8, 6, 2, seed=4)
    w.requires_grad_(True)
    loss = st.softtriple_loss(x, w, y, 2, tau=0.0, backend="torch")
    loss.backward(retain_graph=True)
    g1 = w.grad.clone()
    loss.backward()
    assert rel_err(w.grad, 2 * g1) <= 1e-13


def test_no_grad_forward_keeps_no_cache(budget):
    budget(cache_bytes=1 << 30)
    x, w, y = make_inputs(10, 8, 6, 2, seed=4)
    with torch.no_grad():
        a = st.softtriple_loss(x, w, y, 2, backend="torch")
    assert rel_err(a, st.softtriple_loss(x, w, y, 2, backend="reference")) <= 1e-13


def test_budget_arguments_are_validated():
    with pytest.raises(ValueError, match="chunk_bytes"):
        st.set_memory_budget(chunk_bytes=0)
    with pytest.raises(ValueError, match="cache_bytes"):
        st.set_memory_budget(cache_bytes=-1)


def test_buffer_pool_interleaved_graphs_stay_exact(budget):
    """Two graphs alive at once (forward A, forward B, backward B, backward A) with one-class chunks and the
    forward cache on: a pooled buffer is reused only after its graph has handed it back."""
    from softtriple_triton import cpu

    budget(chunk_bytes=600, cache_bytes=1 << 30)
    cases = [make_inputs(15, 7, 9, 3, seed=s) for s in (1, 2)]
    leaves = [(x.clone().requires_grad_(True), w.clone().requires_grad_(True), y) for x, w, y in cases]
    losses = [st.softtriple_loss(x, w, y, 3, tau=0.0, backend="torch") for x, w, y in leaves]
    losses[1].backward()
    losses[0].backward()
    for (x, w, y), (xl, wl, _), loss in zip(cases, leaves, losses):
        want = loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y, 3, tau=0.0, backend="reference"), x, w)
        assert rel_err(loss, want[0]) <= 1e-13
        assert rel_err(xl.grad, want[1]) <= 1e-12
        assert rel_err(wl.grad, want[2]) <= 1e-12
    held = sum(b.numel() * b.element_size() for b in cpu._pool)
    assert 0 < held <= 2 * 600
