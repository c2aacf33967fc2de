"""Retrieval metrics for the benchmark: PML's AccuracyCalculator plus Recall@K.

PML's `AccuracyCalculator` has precision_at_1, r_precision, MAP@R and NMI but
not the Recall@K that deep-metric-learning papers report (R@1/2/4/8). This
module adds it, keeps the kNN bounded (never `k=None`, which ranks every
reference point and is ~10x slower), and works without faiss by falling back
to PML's pure-torch `CustomKNN` and a small torch k-means.

Device: the tester computes embeddings on the run's device and the
calculator keeps them there. With faiss-gpu (the `[gpu]` extra) and CUDA
embeddings, kNN and k-means run on that GPU; with faiss-cpu, faiss copies
CUDA embeddings to the host; the torch fallback runs wherever they are.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils import accuracy_calculator as pml_acc
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN, FaissKMeans

DEFAULT_RECALL_AT = (1, 2, 4, 8)
# What a DML paper table reports; AMI, MAP and MRR stay available via `include`.
DEFAULT_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI")
BACKENDS = ("auto", "faiss", "torch")


def faiss_is_available() -> bool:
    """True when faiss imports (PML's default kNN and k-means need it)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_num_gpus() -> int:
    """GPUs faiss can use: 0 without faiss or with faiss-cpu (whose
    `get_num_gpus` returns 0, or is missing in some builds)."""
    try:
        import faiss
    except ImportError:
        return 0
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def describe_backend(backend: str = "auto", device: Optional[torch.device] = None) -> str:
    """Which kNN/k-means implementation evaluation on `device` uses:
    "faiss-gpu", "faiss-cpu" or "torch" (for logs and the GPU check)."""
    if not _use_faiss(backend):
        return "torch"
    return "faiss-gpu" if _faiss_on_gpu(device) else "faiss-cpu"


def _faiss_on_gpu(device: Optional[torch.device]) -> bool:
    return device is not None and torch.device(device).type == "cuda" and faiss_num_gpus() > 0


def _faiss_gpus(device: Optional[torch.device]) -> Optional[list]:
    """faiss GPU ids for `device`: ``[N]`` for cuda:N, None (all GPUs, only
    used for CUDA queries) for plain "cuda" or the CPU."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None and faiss_num_gpus() > 0:
        return [device.index]
    return None


def recall_at_k(
    knn_labels: torch.Tensor,
    query_labels: torch.Tensor,
    k: int,
    avg_of_avgs: bool = False,
    return_per_class: bool = False,
    label_comparison_fn: Callable = torch.eq,
) -> Union[float, list]:
    """Recall@K as in DML papers: a query is a hit when any of its K nearest
    neighbours shares its label. `knn_labels` is [N, >=K], `query_labels`
    [N, 1] (PML's shapes)."""
    if knn_labels.shape[1] < k:
        raise ValueError(
            f"recall_at_{k} needs at least {k} neighbours, got {knn_labels.shape[1]}"
        )
    same_label = label_comparison_fn(query_labels, knn_labels[:, :k])
    hit_per_query = torch.any(same_label, dim=1).type(torch.float64)
    return pml_acc.maybe_get_avg_of_avgs(
        hit_per_query, query_labels, avg_of_avgs, return_per_class
    )


class TorchKMeans:
    """Lloyd's k-means with k-means++ seeding, in torch; the fallback for
    faiss.Kmeans. Same call signature as PML's `FaissKMeans`:
    `(x [N, D], num_clusters) -> cluster index per row`."""

    def __init__(self, niter: int = 20, seed: int = 1234, batch_size: int = 4096):
        self.niter = niter
        self.seed = seed
        self.batch_size = batch_size

    def __call__(self, x: torch.Tensor, nmb_clusters: int) -> torch.Tensor:
        x = x.float()
        # A private generator: evaluation must not consume the global RNG, or
        # a resumed run would diverge from an uninterrupted one.
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        centroids = self._kmeans_plus_plus(x, nmb_clusters, generator)
        assignment = self._assign(x, centroids)
        for _ in range(self.niter):
            centroids = self._update(x, assignment, centroids, generator)
            new_assignment = self._assign(x, centroids)
            if torch.equal(new_assignment, assignment):
                break
            assignment = new_assignment
        return assignment

    def _assign(self, x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        # Chunked so memory stays O(batch x k), not O(N x k).
        parts = [
            torch.cdist(chunk, centroids).argmin(dim=1)
            for chunk in torch.split(x, self.batch_size)
        ]
        return torch.cat(parts)

    def _kmeans_plus_plus(
        self, x: torch.Tensor, k: int, generator: torch.Generator
    ) -> torch.Tensor:
        n = len(x)
        if k > n:
            raise ValueError(f"k-means: {k} clusters for only {n} points")
        first = torch.randint(n, (1,), generator=generator).item()
        centroids = [x[first]]
        closest_sq = torch.cdist(x, x[first : first + 1]).squeeze(1) ** 2
        for _ in range(1, k):
            weights = closest_sq.cpu().double()
            if weights.sum() <= 0:
                idx = torch.randint(n, (1,), generator=generator).item()
            else:
                idx = torch.multinomial(weights, 1, generator=generator).item()
            centroids.append(x[idx])
            new_sq = torch.cdist(x, x[idx : idx + 1]).squeeze(1) ** 2
            closest_sq = torch.minimum(closest_sq, new_sq)
        return torch.stack(centroids)

    def _update(
        self,
        x: torch.Tensor,
        assignment: torch.Tensor,
        centroids: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        k = len(centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        counts = torch.bincount(assignment, minlength=k).to(x.dtype)
        new_centroids = sums / counts.clamp(min=1).unsqueeze(1)
        empty = counts == 0
        if empty.any():
            # Re-seed empty clusters on random points, as faiss does.
            picks = torch.randint(len(x), (int(empty.sum()),), generator=generator)
            new_centroids[empty] = x[picks.to(x.device)]
        return new_centroids


def make_knn_func(backend: str = "auto", batch_size: Optional[int] = 4096,
                  device: Optional[torch.device] = None) -> Callable:
    """A kNN callable for AccuracyCalculator: faiss's exact L2 index, or PML's
    pure-torch `CustomKNN` with the same (Euclidean) ordering.

    PML's FaissKNN moves its index to the GPU when the queries are CUDA
    tensors and faiss has GPUs; for ``cuda:N`` it is pinned to GPU N (by
    default faiss would spread the index over every GPU)."""
    if _use_faiss(backend):
        from pytorch_metric_learning.utils.inference import FaissKNN

        return FaissKNN(gpus=_faiss_gpus(device))
    return CustomKNN(LpDistance(normalize_embeddings=False, p=2), batch_size=batch_size)


def make_kmeans_func(backend: str = "auto", device: Optional[torch.device] = None) -> Callable:
    """A k-means callable: faiss.Kmeans (20 iterations, as PML) or TorchKMeans."""
    if _use_faiss(backend):
        # faiss.Kmeans(gpu=True) needs faiss-gpu: with faiss-cpu it fails
        # even for CUDA embeddings (which it copies to the host anyway).
        # (faiss.Kmeans takes True for all GPUs or a count, not device ids.)
        return QuietFaissKMeans(niter=20, gpu=_faiss_on_gpu(device))
    return TorchKMeans(niter=20)


# faiss prints "please provide at least N training points" from C++ on every
# call with fewer points per centroid than this (NMI on a retrieval split
# always has: few samples per class); one Python warning replaces them.
FAISS_MIN_POINTS_PER_CENTROID = 39


class QuietFaissKMeans(FaissKMeans):
    """PML's FaissKMeans that warns once per process about few points per
    cluster. `min_points_per_centroid=1` only silences faiss's message; the
    clustering is unchanged."""

    warned = False

    def __init__(self, **kwargs: Any):
        super().__init__(min_points_per_centroid=1, **kwargs)

    def __call__(self, x: torch.Tensor, nmb_clusters: int) -> torch.Tensor:
        if len(x) < nmb_clusters * FAISS_MIN_POINTS_PER_CENTROID and not QuietFaissKMeans.warned:
            QuietFaissKMeans.warned = True
            warnings.warn(
                f"k-means for NMI: {len(x)} points for {nmb_clusters} clusters (faiss advises "
                f"{FAISS_MIN_POINTS_PER_CENTROID} per cluster); NMI is computed anyway. Shown once.",
                stacklevel=2,
            )
        return super().__call__(x, nmb_clusters)


def _use_faiss(backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "faiss" and not faiss_is_available():
        raise ImportError("backend='faiss' but faiss is not installed (pip install faiss-cpu)")
    return backend == "faiss" or (backend == "auto" and faiss_is_available())


class RecallAtKAccuracyCalculator(AccuracyCalculator):
    """AccuracyCalculator with `recall_at_<k>` metrics for each k in `recall_at`.

    Defaults differ from PML's in two ways that matter for a benchmark:
    `k="max_bin_count"` (exact MAP@R / R-precision at a fraction of `k=None`'s
    cost), raised to at least `max(recall_at)`; and `backend="auto"`, which
    uses faiss when it imports and pure torch otherwise. With `include=None`
    it computes DEFAULT_METRICS and the recall metrics; pass `include=()` for
    every metric PML knows.
    """

    def __init__(
        self,
        recall_at: Sequence[int] = DEFAULT_RECALL_AT,
        k: Union[int, str, None] = "max_bin_count",
        backend: str = "auto",
        include: Optional[Sequence[str]] = None,
        exclude: Sequence[str] = (),
        device: Optional[torch.device] = None,
        knn_func: Optional[Callable] = None,
        kmeans_func: Optional[Callable] = None,
        **kwargs: Any,
    ):
        self.recall_at = self._check_recall_at(recall_at)
        if isinstance(k, int) and k < max(self.recall_at):
            raise ValueError(
                f"k={k} is smaller than max(recall_at)={max(self.recall_at)}"
            )
        # AccuracyCalculator discovers metrics by scanning dir(self) for
        # "calculate_*", so the per-k methods must exist before super().__init__.
        for r in self.recall_at:
            setattr(self, f"calculate_recall_at_{r}", functools.partial(self._calculate_recall, r=r))
        self.backend = backend
        if include is None:
            include = DEFAULT_METRICS + tuple(self.recall_metric_names())
        if knn_func is None:
            knn_func = make_knn_func(backend, device=device)
        if kmeans_func is None:
            kmeans_func = make_kmeans_func(backend, device)
        super().__init__(
            include=tuple(include),
            exclude=tuple(exclude),
            k=k,
            device=device,
            knn_func=knn_func,
            kmeans_func=kmeans_func,
            **kwargs,
        )

    @staticmethod
    def _check_recall_at(recall_at: Sequence[int]) -> tuple:
        values = tuple(sorted(set(int(r) for r in recall_at)))
        if len(values) == 0 or any(r < 1 for r in values):
            raise ValueError(f"recall_at must be positive integers, got {list(recall_at)}")
        return values

    def recall_metric_names(self) -> list:
        return [f"recall_at_{r}" for r in self.recall_at]

    def requires_knn(self) -> list:
        return super().requires_knn() + self.recall_metric_names()

    def determine_k(self, bin_counts, num_reference_embeddings, ref_includes_query):
        k = super().determine_k(bin_counts, num_reference_embeddings, ref_includes_query)
        # max_bin_count can be tiny (e.g. 2 instances per class); Recall@8 still
        # needs 8 neighbours, but never more than the references available.
        available = num_reference_embeddings - int(ref_includes_query)
        wanted = max(k, max(self.recall_at)) if self._needs_recall() else k
        return min(wanted, available)

    def _needs_recall(self) -> bool:
        return any(m in self.recall_metric_names() for m in self.get_curr_metrics())

    def _calculate_recall(
        self, knn_labels, query_labels, not_lone_query_mask, label_counts, r, **kwargs
    ):
        knn_labels, query_labels = pml_acc.try_getting_not_lone_labels(
            knn_labels, query_labels, not_lone_query_mask
        )
        if knn_labels is None:
            return pml_acc.nan_accuracy(label_counts[0], self.return_per_class)
        if knn_labels.shape[1] < r:
            # Fewer references than r: every reference was retrieved.
            r = knn_labels.shape[1]
        return recall_at_k(
            knn_labels,
            query_labels[:, None],
            r,
            self.avg_of_avgs,
            self.return_per_class,
            self.label_comparison_fn,
        )
