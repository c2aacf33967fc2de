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


# -- evaluation on the device -------------------------------------------------------
def _fake_gpus(monkeypatch, n):
    monkeypatch.setattr(evaluation, "faiss_num_gpus", lambda: n)


@pytest.mark.skipif(not evaluation.faiss_is_available(), reason="faiss is not installed")
def test_faiss_gpu_is_used_only_with_cuda_and_faiss_gpus(monkeypatch):
    from pytorch_metric_learning.utils.inference import FaissKMeans, FaissKNN

    _fake_gpus(monkeypatch, 0)  # faiss-cpu: never ask faiss for a GPU (Kmeans(gpu=True) would fail)
    assert evaluation.describe_backend("auto", torch.device("cuda")) == "faiss-cpu"
    assert evaluation.make_kmeans_func("faiss", torch.device("cuda")).kwargs["gpu"] is False
    assert evaluation.make_knn_func("faiss", device=torch.device("cuda:1")).gpus is None
    _fake_gpus(monkeypatch, 2)  # faiss-gpu
    assert evaluation.describe_backend("auto", torch.device("cuda:1")) == "faiss-gpu"
    assert evaluation.describe_backend("auto", torch.device("cpu")) == "faiss-cpu"
    knn = evaluation.make_knn_func("faiss", device=torch.device("cuda:1"))
    assert isinstance(knn, FaissKNN) and knn.gpus == [1]  # pinned to the run's GPU
    assert evaluation.make_knn_func("faiss", device=torch.device("cuda")).gpus is None
    kmeans = evaluation.make_kmeans_func("faiss", torch.device("cuda"))
    assert isinstance(kmeans, FaissKMeans) and kmeans.kwargs["gpu"] is True
    assert evaluation.make_kmeans_func("faiss", torch.device("cpu")).kwargs["gpu"] is False
    calc = RecallAtKAccuracyCalculator(device=torch.device("cuda:1"), backend="faiss")
    assert calc.knn_func.gpus == [1] and calc.kmeans_func.kwargs["gpu"] is True


def test_torch_backend_without_faiss(monkeypatch):
    monkeypatch.setattr(evaluation, "faiss_is_available", lambda: False)
    _fake_gpus(monkeypatch, 0)
    assert evaluation.describe_backend("auto", torch.device("cuda")) == "torch"
    assert isinstance(evaluation.make_kmeans_func("auto", torch.device("cuda")), TorchKMeans)
    with pytest.raises(ImportError, match="faiss"):
        evaluation.make_knn_func("faiss")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_evaluation_of_cuda_embeddings_matches_cpu(backend):
    x, labels = random_embeddings()
    results = []
    for device in ("cpu", "cuda"):
        calc = RecallAtKAccuracyCalculator(device=torch.device(device), backend=backend,
                                           exclude=("NMI",))
        results.append(calc.get_accuracy(torch.tensor(x, device=device), torch.tensor(labels, device=device)))
    for key in results[0]:
        assert results[1][key] == pytest.approx(results[0][key], abs=1e-6), key
