"""Every installed backend on the same inputs, and which one runs.

The correctness tests of ``test_batch_loop`` (brute force, gradcheck) run on
each installed backend through the ``backend`` fixture; here the backends are
compared with each other on larger and odder batches, and a backend that
silently stood in for another fails.
"""
import os
import warnings

import pytest
import torch
from pytorch_metric_learning import losses
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance

import pml_loop.backend as backend_module
import pml_loop.batch_loop as batch_loop
import pml_loop.distance as distance_module
from conftest import INSTALLED_BACKENDS
from pml_loop import LoOpDistance, LoOpLoss, LoOpMiner
from pml_loop.backend import resolve_backend

needs_numba = pytest.mark.skipif("numba" not in INSTALLED_BACKENDS, reason="numba is not installed")

BASES = {
    "euclidean, normalised": lambda: LpDistance(),
    "euclidean": lambda: LpDistance(normalize_embeddings=False),
    "squared euclidean": lambda: LpDistance(normalize_embeddings=False, power=2),
    "cosine": lambda: CosineSimilarity(),
    "dot": lambda: DotProductSimilarity(normalize_embeddings=False),
}


def _labels(sizes, generator):
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    return labels[torch.randperm(len(labels), generator=generator)]  # classes interleaved


def _matrix_and_grads(backend, base, emb, labels, ref=None, ref_labels=None, **kwargs):
    dist = LoOpDistance(BASES[base](), backend=backend, **kwargs)
    e = emb.clone().requires_grad_(True)
    r = None if ref is None else ref.clone().requires_grad_(True)
    mat = dist.loop_mat(e, labels, r, ref_labels)
    weights = torch.randn(mat.shape, generator=torch.Generator().manual_seed(1), dtype=mat.dtype)
    (mat * weights).sum().backward()
    assert dist.last_backend == backend
    return [mat.detach(), e.grad] + ([] if r is None else [r.grad])


def _close(a, b, tol):
    """Equal up to ``tol`` times the largest magnitude (float32: a near-tie of
    two combinations can be won by either, moving a gradient by rounding)."""
    return (a - b).abs().max() <= tol * max(1.0, float(a.abs().max()))


@needs_numba
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-12)])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("sizes", [(4,) * 12, (2, 5, 1, 3, 8, 2), (8,) * 6, (9, 7)])
@pytest.mark.parametrize("partners, chunk", [("all", None), ("all", 7), ("hardest", None)])
def test_backends_agree_within_one_set(dtype, tol, base, sizes, partners, chunk):
    g = torch.Generator().manual_seed(sum(sizes))
    labels = _labels(sizes, g)
    emb = torch.randn(len(labels), 16, generator=g, dtype=dtype)
    got = {b: _matrix_and_grads(b, base, emb, labels, partners=partners, chunk_elements=chunk)
           for b in ("torch", "numba")}
    for a, b in zip(*got.values()):
        assert _close(a, b, tol), (a - b).abs().max()


@needs_numba
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("partners, chunk", [("all", None), ("all", 5), ("hardest", None)])
def test_backends_agree_against_a_reference_set(base, partners, chunk):
    """A query batch against another set (a cross-batch memory), sharing some classes."""
    g = torch.Generator().manual_seed(3)
    labels, ref_labels = _labels((3, 2, 4, 1), g), _labels((2, 5, 3, 3, 2), g) + 2
    emb = torch.randn(len(labels), 8, generator=g, dtype=torch.float64)
    ref = torch.randn(len(ref_labels), 8, generator=g, dtype=torch.float64)
    got = {b: _matrix_and_grads(b, base, emb, labels, ref, ref_labels, partners=partners, chunk_elements=chunk)
           for b in ("torch", "numba")}
    for a, b in zip(*got.values()):
        assert _close(a, b, 1e-12), (a - b).abs().max()


@needs_numba
@pytest.mark.parametrize("name", ["TripletMarginLoss", "MultiSimilarityLoss", "ContrastiveLoss", "NPairsLoss"])
def test_backends_agree_inside_losses(name):
    g = torch.Generator().manual_seed(4)
    labels = torch.arange(16).repeat_interleave(4)
    emb = torch.randn(64, 32, generator=g)
    results = []
    for b in ("torch", "numba"):
        e = emb.clone().requires_grad_(True)
        value = LoOpLoss(getattr(losses, name)(), backend=b)(e, labels)
        value.backward()
        results.append((value.detach(), e.grad))
    (v1, g1), (v2, g2) = results
    assert _close(v1, v2, 1e-5) and _close(g1, g2, 1e-4), ((v1 - v2).abs(), (g1 - g2).abs().max())


@needs_numba
def test_numba_runs_without_the_torch_passes(monkeypatch):
    """With backend='numba' the torch search and gradient passes never run
    (and with 'torch', the kernels never do): no silent stand-in."""
    def refuse(*a, **k):
        raise AssertionError("the other backend ran")

    emb, labels = torch.randn(24, 8, requires_grad=True), torch.arange(6).repeat_interleave(4)
    with monkeypatch.context() as m:
        m.setattr(distance_module, "search_winners", refuse)
        m.setattr(batch_loop, "_winners_grad", refuse)
        LoOpLoss(losses.MultiSimilarityLoss(), backend="numba")(emb, labels).backward()
        LoOpLoss(losses.MultiSimilarityLoss())(emb, labels).backward()  # "auto" picks numba on the CPU
    with monkeypatch.context() as m:
        m.setattr(backend_module, "search", refuse)
        m.setattr(backend_module, "gradient", refuse)
        LoOpLoss(losses.MultiSimilarityLoss(), backend="torch")(emb, labels).backward()


@needs_numba
def test_a_first_compilation_is_announced_once(monkeypatch):
    monkeypatch.setattr(backend_module, "_announced", False)
    monkeypatch.setattr(backend_module, "kernels_cached", lambda kernel: False)
    emb, labels = torch.randn(12, 4), torch.arange(3).repeat_interleave(4)
    with pytest.warns(UserWarning, match="compiles LoOp's kernels"):
        LoOpDistance(backend="numba").loop_mat(emb, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoOpDistance(backend="numba").loop_mat(emb, labels)
    from pml_loop.functional import numba_kernels
    monkeypatch.undo()
    assert backend_module.kernels_cached(numba_kernels.search)  # compiled by now, found in the cache


def test_numba_asked_for_but_missing_is_an_error_at_construction(monkeypatch):
    monkeypatch.setattr(backend_module, "numba_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'pml-loop\[numba\]'"):
        LoOpDistance(backend="numba")
    with pytest.raises(ImportError, match="numba"):
        LoOpLoss(losses.TripletMarginLoss(), backend="numba")
    # "auto" then runs on torch
    emb, labels = torch.randn(12, 4), torch.arange(3).repeat_interleave(4)
    dist = LoOpDistance(backend="auto")
    dist.loop_mat(emb, labels)
    assert dist.last_backend == "torch"


def test_unknown_backend_and_numba_off_the_cpu_are_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        LoOpDistance(backend="cuda")
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_backend("numba", torch.device("cuda"), False)
    assert resolve_backend("auto", torch.device("cuda"), False) == "torch"
    assert resolve_backend("auto", torch.device("cpu"), True) == "torch"  # compile=True is the torch path's
    assert resolve_backend("torch", torch.device("cpu"), False) == "torch"


def test_a_miner_on_another_backend_is_a_conflict():
    with pytest.raises(ValueError, match="backend"):
        LoOpLoss(losses.TripletMarginLoss(), miner=LoOpMiner(backend="torch"), backend="auto")


def test_ci_installs_every_backend():
    """The test extra brings numba, so CI runs the numba kernels rather than
    skipping their comparisons."""
    if os.environ.get("CI") != "true":
        pytest.skip("checked in CI")
    assert INSTALLED_BACKENDS == ("torch", "numba")


def test_changing_the_backend_takes_effect_and_is_checked():
    emb, labels = torch.randn(16, 8), torch.arange(4).repeat_interleave(4)
    dist = LoOpDistance(backend="torch")
    dist.loop_mat(emb, labels)
    assert dist.last_backend == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        dist.backend = "gpu"
    if "numba" in INSTALLED_BACKENDS:
        dist.backend = "numba"  # the cached batch structure is the old backend's: rebuilt
        dist.loop_mat(emb, labels)
        assert dist.last_backend == "numba"


@needs_numba
def test_backends_agree_when_no_negative_entry_has_a_gradient():
    """Only positive entries weighted (as a contrastive loss whose negatives
    all lie beyond its margin): the LoOp part of the gradient is zero."""
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(8).repeat_interleave(4)
    emb = torch.randn(32, 8, generator=g, dtype=torch.float64)
    grads = []
    for b in ("torch", "numba"):
        e = emb.clone().requires_grad_(True)
        mat = LoOpDistance(backend=b).loop_mat(e, labels)
        (mat * (labels[:, None] == labels[None, :])).sum().backward()
        grads.append(e.grad)
    assert grads[0].abs().sum() > 0 and _close(*grads, 1e-12)


@needs_numba
@pytest.mark.parametrize("sizes, threads", [((9, 7), 2), ((12, 2, 3), 3), ((4,) * 12, 2), ((9, 7), 1)])
def test_search_tasks_cover_every_pair_once(sizes, threads):
    """The numba search's tasks: every class's pairs exactly once, a class
    with more than a thread's share split into parts (private rows within
    n_q), one equal block per thread; and the result is the same on one
    thread and on two (with the big class split)."""
    from pml_loop.backend import numba_layout, search_tasks
    from pml_loop.pairs import positive_pair_table

    labels = _labels(sizes, torch.Generator().manual_seed(0))
    table = positive_pair_table(labels)
    layout = numba_layout(table, table, labels, labels)
    items, merges, rows = search_tasks(layout, threads)
    assert len(items) % threads == 0
    real = items[items[:, 0] >= 0]
    for c in range(len(sizes)):
        ranges = sorted((lo, hi) for k, lo, hi, _ in real if k == c)
        assert ranges[0][0] == layout.pair_start[c] and ranges[-1][1] == layout.pair_start[c + 1]
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert rows <= len(labels)
    assert (len(merges) > 0) == (threads > 1 and sizes != (4,) * 12), merges
    emb = torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for n in (1, 2):  # one task per class, or the big class split in two
        torch.set_num_threads(n)
        try:
            results.append(_matrix_and_grads("numba", "euclidean, normalised", emb, labels))
        finally:
            torch.set_num_threads(2)
    (m1, g1), (m2, g2) = results
    # values bitwise; gradients to rounding (each thread sums its own share of the second pairs' partials)
    assert torch.equal(m1, m2) and _close(g1, g2, 1e-12), (g1 - g2).abs().max()
