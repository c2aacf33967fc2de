"""RecallAtKAccuracyCalculator: Recall@K against brute force, and the
pure-torch (no faiss) path against the faiss path."""

import numpy as np
import pytest
import torch

from pml_loop.bench import evaluation
from pml_loop.bench.evaluation import RecallAtKAccuracyCalculator, TorchKMeans


def brute_force_recall(query, qlabels, ref, rlabels, k, ref_includes_query):
    """Recall@K straight from the definition, in numpy."""
    d = ((query[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    if ref_includes_query:
        np.fill_diagonal(d[:, : len(query)], np.inf)
    hits = []
    for i in range(len(query)):
        same = rlabels == qlabels[i]
        if ref_includes_query:
            same = same.copy()
            same[i] = False
        if not same.any():
            continue  # lone query: excluded, as PML does for every kNN metric
        nearest = np.argsort(d[i], kind="stable")[:k]
        hits.append(bool((rlabels[nearest] == qlabels[i]).any()))
    return float(np.mean(hits))


def random_embeddings(n=300, d=8, classes=30, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centers = rng.normal(size=(classes, d))
    x = centers[labels] * 0.7 + rng.normal(size=(n, d))
    return x.astype(np.float32), labels


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_recall_matches_brute_force_self_retrieval(backend):
    if backend == "faiss" and not evaluation.faiss_is_available():
        pytest.skip("faiss not installed")
    x, y = random_embeddings()
    calc = RecallAtKAccuracyCalculator(recall_at=[1, 2, 4, 8], backend=backend, device=torch.device("cpu"))
    acc = calc.get_accuracy(x, y)
    for k in (1, 2, 4, 8):
        expected = brute_force_recall(x, y, x, y, k, ref_includes_query=True)
        assert acc[f"recall_at_{k}"] == pytest.approx(expected, abs=1e-12), k
    # Recall@1 is precision@1 by definition; a cheap cross-check against PML.
    assert acc["recall_at_1"] == pytest.approx(acc["precision_at_1"])
    assert acc["recall_at_1"] < acc["recall_at_8"] <= 1.0


def test_recall_matches_brute_force_separate_reference():
    x, y = random_embeddings(seed=1)
    q, qy, r, ry = x[:100], y[:100], x[100:], y[100:]
    calc = RecallAtKAccuracyCalculator(recall_at=[1, 4], backend="torch", device=torch.device("cpu"))
    acc = calc.get_accuracy(q, qy, r, ry, ref_includes_query=False)
    for k in (1, 4):
        assert acc[f"recall_at_{k}"] == pytest.approx(brute_force_recall(q, qy, r, ry, k, False))


def test_k_grows_to_largest_recall_even_when_classes_are_small():
    # two instances per class: max_bin_count - 1 = 1 neighbour, but R@8 needs 8
    y = np.repeat(np.arange(50), 2)
    x = np.random.default_rng(2).normal(size=(100, 4)).astype(np.float32)
    calc = RecallAtKAccuracyCalculator(backend="torch", device=torch.device("cpu"))
    acc = calc.get_accuracy(x, y)
    assert acc["recall_at_8"] == pytest.approx(brute_force_recall(x, y, x, y, 8, True))
    assert acc["recall_at_8"] > acc["recall_at_1"]


def test_default_metrics_and_no_unbounded_k():
    calc = RecallAtKAccuracyCalculator(backend="torch")
    assert calc.k == "max_bin_count"
    assert set(calc.get_curr_metrics()) == {
        "precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI",
        "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8",
    }
    with pytest.raises(ValueError, match="smaller than max"):
        RecallAtKAccuracyCalculator(k=4, recall_at=[1, 8])
    with pytest.raises(ValueError, match="positive"):
        RecallAtKAccuracyCalculator(recall_at=[0])
    with pytest.raises(ValueError, match="backend"):
        RecallAtKAccuracyCalculator(backend="gpu-magic")


def test_torch_fallback_gives_same_metrics_as_faiss():
    if not evaluation.faiss_is_available():
        pytest.skip("faiss not installed")
    x, y = random_embeddings(n=400, classes=20, seed=3)
    kwargs = dict(device=torch.device("cpu"))
    with_faiss = RecallAtKAccuracyCalculator(backend="faiss", **kwargs).get_accuracy(x, y)
    with_torch = RecallAtKAccuracyCalculator(backend="torch", **kwargs).get_accuracy(x, y)
    for metric, value in with_faiss.items():
        if metric == "NMI":
            continue  # two k-means implementations: compared below on clear clusters
        assert with_torch[metric] == pytest.approx(value, abs=1e-9), metric


def test_torch_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(4)
    centers = rng.normal(size=(6, 5)) * 20
    labels = np.repeat(np.arange(6), 40)
    x = torch.tensor(centers[labels] + rng.normal(size=(240, 5)), dtype=torch.float32)
    calc = RecallAtKAccuracyCalculator(backend="torch", include=["NMI"], device=torch.device("cpu"))
    assert calc.get_accuracy(x, labels)["NMI"] == pytest.approx(1.0)
    # deterministic: its own generator, and the global RNG is left untouched
    state = torch.get_rng_state()
    a, b = TorchKMeans()(x, 6), TorchKMeans()(x, 6)
    assert torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state())


def test_works_when_faiss_cannot_be_imported(monkeypatch):
    monkeypatch.setattr(evaluation, "faiss_is_available", lambda: False)
    calc = RecallAtKAccuracyCalculator(device=torch.device("cpu"))
    assert isinstance(calc.kmeans_func, TorchKMeans)
    x, y = random_embeddings(n=120, classes=10, seed=5)
    acc = calc.get_accuracy(x, y)
    assert acc["recall_at_2"] == pytest.approx(brute_force_recall(x, y, x, y, 2, True))
    with pytest.raises(ImportError, match="faiss"):
        RecallAtKAccuracyCalculator(backend="faiss")
