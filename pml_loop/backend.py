"""Which implementation runs the LoOp search and gradient passes.

``"torch"``: the PyTorch operations of ``batch_loop`` (every device;
``compile=True`` fuses them). ``"numba"``: the same algorithm as compiled CPU
loops (:mod:`.functional.numba_kernels`), from the ``numba`` extra
(``pip install pml-loop[numba]``): no system compiler, compiled once and then
cached on disk. ``"auto"``: numba for CPU tensors when it is installed and
``compile`` is off, else torch.

Numba keys its disk cache by the kernels' source and the CPU it compiled for
and writes it without locks: a cache from another CPU is recompiled, and
nothing waits on a lock.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .pairs import Combos, PairTable

Backend = Literal["auto", "torch", "numba"]
BACKENDS = ("auto", "torch", "numba")
NUMBA_MISSING = "backend='numba' needs numba: pip install 'pml-loop[numba]'"


@functools.lru_cache(maxsize=1)
def numba_available() -> bool:
    """Whether numba imports (with this numpy)."""
    try:
        importlib.import_module("numba")
    except Exception:  # ImportError, or numba refusing this numpy version
        return False
    return True


def check_backend(backend: str) -> None:
    """A clear error at construction for an unknown or unavailable backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numba" and not numba_available():
        raise ImportError(NUMBA_MISSING)


def resolve_backend(backend: Backend, device: torch.device, compile: bool) -> Literal["torch", "numba"]:
    """The backend a call runs on; ``"numba"`` asked for on another device is an error."""
    if backend == "torch":
        return "torch"
    if backend == "numba":
        if device.type != "cpu":
            raise ValueError(f"backend='numba' runs on the CPU; the embeddings are on {device}: "
                             "use backend='torch' (or 'auto') on a GPU")
        return "numba"
    return "numba" if device.type == "cpu" and not compile and numba_available() else "torch"


class NumbaLayout(NamedTuple):
    """A batch's classes as the kernels read them (numpy, int64).

    order_q: query samples sorted by class (the pair table's class order);
    sample_start, pair_start: ``(C + 1,)`` each class's range of ``order_q``
    and of the query pairs; cls_r: one set only, each sample's class number;
    work: the classes in an order whose equal halves balance the work (the
    gradient's parallel loop, and the search's when no class is split).
    """

    ends_q: np.ndarray
    ends_r: np.ndarray
    owned_q: np.ndarray
    owned_r: np.ndarray
    labels_q: np.ndarray
    labels_r: np.ndarray
    pair_labels_r: np.ndarray
    cls_r: np.ndarray
    order_q: np.ndarray
    sample_start: np.ndarray
    pair_start: np.ndarray
    work: np.ndarray
    one_set: bool
    #: the search's tasks per number of threads: see :func:`search_tasks`
    tasks: dict


def numba_layout(table_q: PairTable, table_r: PairTable, q_labels: Tensor, r_labels: Tensor) -> NumbaLayout:
    """The layout of a batch, from its pair tables and labels."""
    one_set = table_q is table_r

    def host(t: Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.int64))

    labels_q = host(q_labels)
    pair_start = np.concatenate(([0], np.cumsum(table_q.runs))).astype(np.int64)
    # Class numbers in the table's order: its runs' labels, looked up per sample.
    run_labels = host(table_q.labels)[pair_start[:-1]]
    by_label = np.argsort(run_labels, kind="stable")
    cls = by_label[np.searchsorted(run_labels[by_label], labels_q)]
    order_q = np.argsort(cls, kind="stable").astype(np.int64)
    sample_start = np.concatenate(([0], np.cumsum(np.bincount(cls, minlength=len(run_labels))))).astype(np.int64)
    classes = len(run_labels)
    if one_set:  # class c works on the classes after it: pair the longest with the shortest
        work = np.empty(classes, np.int64)
        work[0::2] = np.arange((classes + 1) // 2)
        work[1::2] = np.arange(classes - 1, (classes - 1) // 2, -1)
    else:
        work = np.arange(classes, dtype=np.int64)
    return NumbaLayout(
        host(table_q.ends), host(table_r.ends), host(table_q.owned), host(table_r.owned), labels_q,
        labels_q if one_set else host(r_labels), host(table_r.labels),
        cls.astype(np.int64) if one_set else np.zeros(1, np.int64), order_q, sample_start, pair_start, work,
        one_set, {})


_announced = False


def _kernels():
    global _announced
    from .functional import numba_kernels

    if not _announced:
        _announced = True
        if not kernels_cached(numba_kernels.search):
            warnings.warn("pml_loop: numba compiles LoOp's kernels at their first use on this machine (10 - 15 s on "
                          "2 cores, once; cached on disk afterwards); backend='torch' compiles nothing",
                          UserWarning, stacklevel=5)
    numba_kernels.set_threads(torch.get_num_threads())
    return numba_kernels


def kernels_cached(kernel) -> bool:
    """Whether numba's disk cache holds compiled code of ``kernel`` (True when
    that cannot be told: the check reads numba internals)."""
    try:
        return os.path.exists(kernel._cache._cache_file._index_path)
    except Exception:
        return True


def _slab(chunk_elements: int, k_r: int) -> int:
    """A class's pairs handled at once: about ``chunk_elements`` combinations."""
    return max(1, chunk_elements // max(1, k_r))


def _gram(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().numpy())


def search_tasks(layout: NumbaLayout, threads: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The search's tasks ``(threads * L, 4)`` (class, first pair, end pair,
    first private row, or -1: the outputs, -2: the outputs without their
    mirror images; class -1: padding), in one block of L per thread; the
    split classes' merges ``(m, 3)`` (class, parts, first private row); the
    private rows in all.

    Numba's parallel loop hands each thread one contiguous block of equal
    length, so the tasks are dealt here: largest first, each to the thread
    with the least work so far. A class with more than a thread's share of
    the combinations (a few big classes: two of 64 samples are one class
    pair) is split into parts of its pairs, up to one per thread, each but
    the first writing its own table of the class's entries; those tables
    hold at most ``n_q`` rows in all, so the search's memory stays within
    twice its outputs."""
    pairs = np.diff(layout.pair_start)
    k_r = len(layout.ends_r)
    work = pairs * (k_r - layout.pair_start[1:] if layout.one_set else k_r)
    sizes = np.diff(layout.sample_start)
    parts = np.ones(len(pairs), np.int64)
    if threads > 1 and work.sum() > 0:
        want = np.minimum(np.ceil(work * threads / work.sum()), np.minimum(threads, pairs))
        budget = sizes.sum()
        for c in np.argsort(-work, kind="stable"):
            parts[c] = max(1, min(want[c], 1 + budget // sizes[c]))
            budget -= (parts[c] - 1) * sizes[c]
    if (parts == 1).all():  # the layout's order: equal halves of it balance the work
        tasks = [(c, layout.pair_start[c], layout.pair_start[c + 1], -1) for c in layout.work]
        return np.array(tasks, np.int64).reshape(-1, 4), np.zeros((0, 3), np.int64), 0
    tasks, merges, rows = [], [], 0
    for c in range(len(pairs)):
        if parts[c] == 1:
            tasks.append((work[c], (c, layout.pair_start[c], layout.pair_start[c + 1], -1)))
            continue
        merges.append((c, parts[c], rows))
        cuts = np.linspace(layout.pair_start[c], layout.pair_start[c + 1], parts[c] + 1).round().astype(np.int64)
        tasks.append((work[c] / parts[c], (c, cuts[0], cuts[1], -2)))  # the first part writes the outputs
        for q in range(1, parts[c]):
            tasks.append((work[c] / parts[c], (c, cuts[q], cuts[q + 1], rows)))
            rows += sizes[c]
    blocks, load = [[] for _ in range(threads)], np.zeros(threads)
    for size, task in sorted(tasks, key=lambda t: -t[0]):
        t = int(np.argmin(load))
        blocks[t].append(task)
        load[t] += size
    length = max(len(b) for b in blocks)
    dealt = [task for b in blocks for task in b + [(-1, 0, 0, -1)] * (length - len(b))]
    return np.array(dealt, np.int64).reshape(-1, 4), np.array(merges, np.int64).reshape(-1, 3), int(rows)


def search(qq: Tensor, rr: Tensor, qr: Tensor, layout: NumbaLayout, geometry: str, combos: Combos,
           chunk_elements: int) -> tuple[Tensor, Tensor]:
    """The best score ``(n_q, n_r)`` (see ``batch_loop.measure_of_score``) and
    combination of every entry, by the numba kernel."""
    k = _kernels()
    g_qr = _gram(qr)
    g_qq, g_rr = (g_qr, g_qr) if layout.one_set else (_gram(qq), _gram(rr))
    best = np.empty(g_qr.shape, g_qr.dtype)
    combo = np.empty(g_qr.shape, np.int32 if combos.dtype == torch.int32 else np.int64)
    slab = _slab(chunk_elements, len(layout.ends_r))
    threads = k.numba.get_num_threads()
    if threads not in layout.tasks:
        layout.tasks[threads] = search_tasks(layout, threads)
    items, merges, private_rows = layout.tasks[threads]
    k.search(g_qr, g_qq, g_rr, k.GEOMETRY_CODES[geometry], layout.one_set, layout.ends_q, layout.ends_r,
             layout.owned_q, layout.owned_r, layout.labels_q, layout.labels_r, layout.pair_labels_r,
             layout.cls_r, layout.order_q, layout.sample_start, layout.pair_start, items, merges, private_rows,
             slab, best, combo)
    return torch.from_numpy(best), torch.from_numpy(combo)


def gradient(qq: Tensor, rr: Tensor, qr: Tensor, layout: NumbaLayout, geometry: str, combo: Tensor,
             grad: Tensor, chunk_elements: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(d_qr, d_qq, d_rr)``: the gradient of the winners' measures (``grad``,
    zero off the negative entries) to the Gram blocks; for one set all of it
    in ``d_qr`` (the others ``None``)."""
    g_qr = _gram(qr)
    g_qq, g_rr = (g_qr, g_qr) if layout.one_set else (_gram(qq), _gram(rr))
    d_qr = np.zeros_like(g_qr)
    d_qq, d_rr = (d_qr, d_qr) if layout.one_set else (np.zeros_like(g_qq), np.zeros_like(g_rr))
    grad = _gram(grad)
    if not grad.any():  # e.g. every negative beyond a contrastive margin: nothing to derive
        return _gradient_blocks(d_qr, d_qq, d_rr, layout.one_set)
    k = _kernels()
    own = np.zeros((k.numba.config.NUMBA_NUM_THREADS, 3, len(layout.ends_r)), g_qr.dtype)
    k.gradient(g_qr, g_qq, g_rr, k.GEOMETRY_CODES[geometry], layout.one_set, layout.ends_q, layout.ends_r,
               combo.numpy(), grad, layout.cls_r, layout.order_q, layout.sample_start, layout.pair_start,
               layout.work, _slab(chunk_elements, len(layout.ends_r)), d_qr, d_qq, d_rr, own)
    return _gradient_blocks(d_qr, d_qq, d_rr, layout.one_set)


def _gradient_blocks(d_qr: np.ndarray, d_qq: np.ndarray, d_rr: np.ndarray, one_set: bool
                     ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    if one_set:
        return torch.from_numpy(d_qr), None, None
    return torch.from_numpy(d_qr), torch.from_numpy(d_qq), torch.from_numpy(d_rr)
