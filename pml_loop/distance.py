"""The labels-aware distance: a PML distance whose negative entries are LoOp values.

A PML distance never sees labels, so :class:`LoOpDistance` is *bound* to the
labels of the current batch by whoever has them (:class:`~pml_loop.LoOpLoss`,
:class:`~pml_loop.LoOpMiner`) and then answers the loss's ordinary
``distance(embeddings, ref_emb)`` call. Inside one ``sharing()`` block the
search result is kept, so a miner and a loss on the same batch search once.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, Literal, NamedTuple

import torch
from pytorch_metric_learning.distances import (
    BaseDistance,
    DotProductSimilarity,
    LpDistance,
)
from torch import Tensor

from .backend import Backend, NumbaLayout, check_backend, numba_layout, resolve_backend
from .batch_loop import (
    DEFAULT_CHUNK_ELEMENTS,
    DEFAULT_GPU_CHUNK_ELEMENTS,
    GramBlocks,
    SearchPlan,
    Winners,
    Units,
    gram_blocks,
    loop_entries,
    numba_winners,
    search_plan,
    search_winners,
)
from .functional import Geometry
from .pairs import PARTNERS, Partners, PairTable, partition_key, positive_pair_table

NonFinite = Literal["warn", "raise", "ignore"]
NONFINITE = ("warn", "raise", "ignore")
SUPPORTED = "LpDistance(p=2), CosineSimilarity or DotProductSimilarity"


def geometry_of(distance: BaseDistance) -> Geometry:
    """Which LoOp geometry a PML distance implies; a clear error for the others."""
    name = type(distance).__name__
    if isinstance(distance, LoOpDistance):
        raise TypeError("the distance is already a LoOpDistance; wrap the plain distance")
    if isinstance(distance, LpDistance):
        if distance.p != 2:
            raise ValueError(f"LoOp needs the Euclidean distance, got LpDistance(p={distance.p})")
        return "arc" if distance.normalize_embeddings else "segment"
    if isinstance(distance, DotProductSimilarity):  # CosineSimilarity included
        return "arc" if distance.normalize_embeddings else "dot"
    raise ValueError(f"LoOp supports {SUPPORTED}; got {name}")


class _Binding(NamedTuple):
    labels: Tensor | None
    ref_labels: Tensor | None
    paired: bool  # NPairs form: row k of query and of ref are one positive pair


class _Structure(NamedTuple):
    """What a batch's partition into classes determines."""

    table_q: PairTable
    table_r: PairTable
    plan: SearchPlan
    has_negatives: bool
    layout: NumbaLayout | None  # for the numba backend


class _Search(NamedTuple):
    keys: tuple
    structure: _Structure
    winners: Winners


class LoOpDistance(BaseDistance):
    """``base`` distance with every negative entry replaced by its LoOp value.

    Entry (i, j) with different labels becomes the optimum over the pairs
    (i, p) and (j, q), p, q positive partners of i and j (the segment, or the
    arc when embeddings are normalised), in the base distance's own units:
    a distance (with ``power``) for ``LpDistance``, a similarity for
    ``CosineSimilarity`` (the hardest cosine) and ``DotProductSimilarity``.
    Positive entries and self-comparisons keep the base value.

    Args:
        distance: the wrapped distance; default ``LpDistance(normalize_embeddings=True)``.
        partners: ``"all"`` (exact LoOp: every positive partner) or
            ``"hardest"`` (only each sample's farthest partner; cheaper for
            large cross-batch memories).
        chunk_elements: pair combinations (and entries) handled at once; the
            extra memory is at most ``batch_loop.memory_bound_bytes``. ``None``:
            2**18 on the CPU, 2**24 on a GPU (where fewer, larger kernels pay).
        compile: run the torch backend's search and gradient kernels through
            ``torch.compile`` (Triton on a GPU; ~20 s to compile once per
            process, eager fallback).
        backend: ``"torch"`` (PyTorch operations, every device), ``"numba"``
            (compiled CPU loops, ``pip install pml-loop[numba]``; several
            times faster on the CPU) or ``"auto"`` (numba for CPU tensors when
            installed and ``compile`` is off, else torch). See ``pml_loop.backend``.
        nonfinite: what a NaN or infinite embedding does: ``"warn"`` (like PML:
            the affected matrix is NaN, so the loss is NaN and a GradScaler can
            skip the step; a warning says so), ``"raise"`` (ValueError) or
            ``"ignore"`` (NaN propagates, no check and so no host sync).

    Output of ``forward(query (n_q, d), ref (n_r, d))``: ``(n_q, n_r)``.

    Mixed precision: under ``torch.autocast`` or with bfloat16/float16
    embeddings, the whole matrix (search, measure, and the base entries) is
    computed in float32 from the un-rounded inputs with autocast disabled, and
    returned in the dtype the base distance would return for the same inputs
    under the same autocast (bfloat16/float16 for the matmul-based cosine and
    dot product, float32 for ``LpDistance``, whose ``cdist`` autocast keeps in
    float32), which is what the wrapped loss expects. Gradients reach half
    inputs in their own dtype.

    Host synchronisation: building the pair structure of a new partition of
    the labels, comparing a batch's partition with the cached one (one
    ``torch.equal``) and the finiteness check (unless ``nonfinite="ignore"``).
    """

    def __init__(
        self,
        distance: BaseDistance | None = None,
        partners: Partners = "all",
        chunk_elements: int | None = None,
        compile: bool = False,
        nonfinite: NonFinite = "warn",
        backend: Backend = "auto",
        **kwargs,
    ):
        base = LpDistance(normalize_embeddings=True, p=2) if distance is None else distance
        if not isinstance(base, BaseDistance):
            raise TypeError(f"distance must be a PML BaseDistance, got {type(base).__name__}")
        geometry = geometry_of(base)
        if partners not in PARTNERS:
            raise ValueError(f"partners must be one of {PARTNERS}, got {partners!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if chunk_elements is not None and int(chunk_elements) < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
        check_backend(backend)  # before anything is built
        super().__init__(
            normalize_embeddings=base.normalize_embeddings, p=base.p, power=base.power,
            is_inverted=base.is_inverted, **kwargs,
        )
        self.base = base
        self.geometry: Geometry = geometry
        self.partners = partners
        self.chunk_elements = None if chunk_elements is None else int(chunk_elements)
        self.compile = bool(compile)
        self.nonfinite = nonfinite
        #: The backend of the last search: "torch" or "numba".
        self.last_backend: str | None = None
        self._binding: _Binding | None = None
        self._share_depth = 0
        self._shared: _Search | None = None
        self._structure_cache = None
        self.backend = backend
        self._dtypes: dict[tuple, torch.dtype] = {}  # see _output_dtype
        self._warned: set[str] = set()
        # How much LoOp moved the negatives, for record-keeper; kept as tensors
        # so that training does not wait for them (read as numbers on demand).
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # base, LoOp, negative mask
        self.add_to_recordable_attributes(
            list_of_names=["num_negative_entries", "avg_base_minus_loop"], is_stat=False
        )

    @property
    def backend(self) -> Backend:
        return self.__dict__.get("_backend", "torch")  # objects pickled before backends ran on torch

    @backend.setter
    def backend(self, value: Backend) -> None:
        check_backend(value)
        self.__dict__["_backend"] = value
        self._structure_cache = None  # its layout is the backend's

    def follow(self, distance: BaseDistance) -> None:
        """Wrap ``distance`` (a loss's current distance), re-reading its settings,
        so that changes made to it after construction are seen."""
        if isinstance(distance, LoOpDistance):
            return  # lent to the loss for the current call
        if distance is not self.base:
            self.geometry = geometry_of(distance)
            self.base = distance
        elif distance.normalize_embeddings != self.normalize_embeddings or distance.p != self.p:
            self.geometry = geometry_of(distance)
        self.normalize_embeddings, self.p = distance.normalize_embeddings, distance.p
        self.power, self.is_inverted = distance.power, distance.is_inverted

    # -- binding ---------------------------------------------------------------
    @contextlib.contextmanager
    def bind(self, labels: Tensor | None, ref_labels: Tensor | None = None, paired: bool = False) -> Iterator["LoOpDistance"]:
        """Let ``forward`` know the labels of its query (and reference) rows."""
        outer = self._binding
        self._binding = _Binding(labels, labels if ref_labels is None else ref_labels, paired)
        try:
            yield self
        finally:
            self._binding = outer

    @contextlib.contextmanager
    def sharing(self) -> Iterator["LoOpDistance"]:
        """Keep the search result for repeated calls on the same, unmodified tensors."""
        self._share_depth += 1
        try:
            yield self
        finally:
            self._share_depth -= 1
            if self._share_depth == 0:
                self._shared = None

    def __getstate__(self):
        # Bindings and shared searches hold batch tensors; never persist them.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.update(_binding=None, _share_depth=0, _shared=None, _structure_cache=None, _last=None)
        return state

    # -- PML interface -----------------------------------------------------------
    def forward(self, query_emb: Tensor, ref_emb: Tensor | None = None) -> Tensor:
        if self._binding is None:
            raise RuntimeError(
                "LoOpDistance needs labels: use it through LoOpLoss or LoOpMiner, "
                "or call loop_mat(embeddings, labels, ref_emb, ref_labels)"
            )
        self.reset_stats()
        self.check_shapes(query_emb, ref_emb)
        same_set = ref_emb is None or ref_emb is query_emb
        ref = query_emb if ref_emb is None else ref_emb
        q_labels, r_labels = self._labels_for(query_emb, ref, same_set)
        out_dtype = self._output_dtype(query_emb, ref)
        work = working_dtype(query_emb, ref)
        # Mixed precision: the closest-point maths (Gram entries, closed forms,
        # square roots of small differences) is wrong in bfloat16/float16, so
        # everything is computed in `work` (float32 at least) with autocast off;
        # the casts are differentiable, so half inputs get half gradients.
        with autocast_off(query_emb.device):
            q = query_emb.to(work)
            qn = self.maybe_normalize(q)
            rn = qn if same_set else self.maybe_normalize(ref.to(work))
            self.set_default_stats(query_emb, ref, qn, rn)
            if self._binding.paired:
                mat = self._paired_mat(qn, rn)
            else:
                same_set = same_set and q_labels is r_labels
                mat = self._loop_mat(qn, rn, q_labels, r_labels, same_set, keys=(query_emb, ref, q_labels, r_labels))
            if self.power != 1:
                mat = mat**self.power
        # Rounding is monotonic, so LoOp <= plain (>= for similarities) survives the cast.
        return mat.to(out_dtype)

    def compute_mat(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        return self.base.compute_mat(query_emb, ref_emb)

    def pairwise_distance(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        return self.base.pairwise_distance(query_emb, ref_emb)

    def loop_mat(self, embeddings: Tensor, labels: Tensor, ref_emb: Tensor | None = None, ref_labels: Tensor | None = None) -> Tensor:
        """The LoOp matrix with explicit labels: ``(n_q, n_r)`` like ``forward``."""
        with self.bind(labels, ref_labels):
            return self(embeddings, ref_emb)

    def last_partners(self) -> tuple[Tensor, Tensor] | None:
        """Inside ``sharing()``: ``(p, q)``, each ``(n_q, n_r)``, the partners whose
        pairs (i, p) and (j, q) realise entry (i, j) of the last matrix."""
        if self._shared is None:
            return None
        w = self._shared.winners
        return w.partners()

    # -- internals ---------------------------------------------------------------
    def _output_dtype(self, query: Tensor, ref: Tensor) -> torch.dtype:
        """The dtype the base distance returns for these inputs under the current
        autocast state (e.g. bfloat16 for a cosine matrix under bfloat16 autocast,
        float32 for ``LpDistance``, whose ``cdist`` autocast keeps in float32):
        what the wrapped loss expects. Found by running the base on one row
        each, once per (inputs' dtypes, device, autocast state)."""
        device = query.device.type
        on = _autocast_enabled(device)
        key = (type(self.base), self.base.normalize_embeddings, query.dtype, ref.dtype, device, on,
               _autocast_dtype(device) if on else None)
        cache = self.__dict__.setdefault("_dtypes", {})  # absent in objects pickled before it existed
        cached = cache.get(key)
        if cached is not None:
            return cached
        with torch.no_grad():
            try:
                probe = self.base.compute_mat(self.base.maybe_normalize(query[:1].detach()),
                                              self.base.maybe_normalize(ref[:1].detach()))
                dtype = probe.dtype
            except (NotImplementedError, RuntimeError):
                # The base has no kernel for these dtypes (torch 2.13: no CPU
                # bfloat16 cdist; a half batch against a float32 memory): LoOp
                # still works and answers in the inputs' promoted dtype.
                dtype = torch.promote_types(query.dtype, ref.dtype)
        cache[key] = dtype
        return dtype

    def _labels_for(self, query: Tensor, ref: Tensor, same_set: bool) -> tuple[Tensor, Tensor]:
        b = self._binding
        if b.paired:
            if len(query) != len(ref):
                raise ValueError("paired LoOp needs as many query rows as reference rows")
            return None, None
        if b.labels is None:
            raise ValueError("LoOp needs labels (a class label per embedding)")
        q_labels = b.labels
        r_labels = b.labels if same_set else b.ref_labels
        for name, emb, lab in (("embeddings", query, q_labels), ("ref_emb", ref, r_labels)):
            if lab.ndim != 1 or len(lab) != len(emb):
                raise ValueError(
                    f"LoOpDistance is bound to labels of shape {tuple(lab.shape)} but {name} "
                    f"has {len(emb)} rows"
                )
        return q_labels, r_labels

    def _farness(self, g: Tensor, diag_a: Tensor, diag_b: Tensor) -> Tensor:
        if self.geometry == "segment":
            return diag_a[:, None] + diag_b[None, :] - 2 * g
        return -g

    def _loop_mat(self, qn, rn, q_labels, r_labels, same_set: bool, keys: tuple) -> Tensor:
        base = self.base.compute_mat(qn, rn)
        neg = q_labels[:, None] != r_labels[None, :]
        g = gram_blocks(qn, rn, same_set, qr=self._cross_gram(base))
        if self.nonfinite != "ignore" and not self._finite(g, same_set):
            self._record(base, base, neg)
            return torch.where(neg, base * float("nan"), base)
        keys = tuple((k, k._version) for k in keys)  # an in-place edit is a new batch
        s = self._shared
        if s is None or len(s.keys) != len(keys) or any(
                a[0] is not b[0] or a[1] != b[1] for a, b in zip(s.keys, keys)):
            st = self._structure(g, q_labels, r_labels, same_set)
            if not st.has_negatives:
                self._record(base, base, neg)
                return base
            if st.layout is not None:
                winners = numba_winners(g, st.layout, self.geometry, st.plan.combos, self._chunk(qn.device))
                self.last_backend = "numba"
            else:
                winners = search_winners(g, st.table_q, st.table_r, self.geometry, st.plan, self.compile)
                self.last_backend = "torch"
            s = _Search(keys, st, winners)
            if self._share_depth > 0:
                self._shared = s
        mat = loop_entries(base, g, neg, s.winners, self._units(), self.is_inverted, self.geometry,
                           self._chunk(qn.device), self.compile, s.structure.layout)
        self._record(base, mat, neg)
        return mat

    def _cross_gram(self, base: Tensor) -> Tensor | None:
        """The cross Gram block read off the base matrix when it holds it, so
        that no second matrix product (and its backward) is needed: a
        similarity's matrix is the Gram block, and between unit vectors the
        Euclidean distance is sqrt(2 - 2 x.y)."""
        if isinstance(self.base, DotProductSimilarity):
            return base
        if self.geometry == "arc" and type(self.base).compute_mat is LpDistance.compute_mat:
            return torch.addcmul(torch.ones_like(base), base, base, value=-0.5)
        return None

    def _finite(self, g: GramBlocks, same_set: bool) -> bool:
        # A NaN or inf in a row shows in its squared norm, and in their sum: n
        # additions, not n x d checks (a sum that overflows means norms LoOp
        # cannot square either).
        ok = math.isfinite(float(g.qq.detach().diagonal().sum())) and (
            same_set or math.isfinite(float(g.rr.detach().diagonal().sum())))
        if ok:
            return True
        message = "LoOp got NaN or infinite embeddings (or norms that overflow)"
        if self.nonfinite == "raise":
            raise ValueError(message)
        warnings.warn(message + "; the negative entries are NaN, so the loss is NaN "
                      "(a GradScaler skips such a step)", RuntimeWarning, stacklevel=4)
        return False

    def _structure(self, g: GramBlocks, q_labels, r_labels, same_set: bool) -> _Structure:
        """Pair tables and search plan of the batch; with ``partners="all"`` they
        depend only on how positions split into classes (for one set), which
        m-per-class batches repeat, so the last one is reused."""
        if self.partners == "hardest":
            far_q = self._farness(g.qq, g.qq.diagonal(), g.qq.diagonal())
            table_q = positive_pair_table(q_labels, "hardest", far_q)
            if same_set:
                return self._new_structure(table_q, table_q, q_labels, r_labels)
            far_r = self._farness(g.rr, g.rr.diagonal(), g.rr.diagonal())
            return self._new_structure(table_q, positive_pair_table(r_labels, "hardest", far_r), q_labels, r_labels)
        # Across two sets, which classes meet depends on the label values too.
        key = (partition_key(q_labels),) if same_set else (q_labels, r_labels)
        cached = self._structure_cache
        if cached is not None and _same_key(cached[0], key):
            return cached[1]
        table_q = positive_pair_table(q_labels)
        table_r = table_q if same_set else positive_pair_table(r_labels)
        structure = self._new_structure(table_q, table_r, q_labels, r_labels)
        self._structure_cache = (tuple(k.clone() for k in key), structure)
        return structure

    def _new_structure(self, table_q: PairTable, table_r: PairTable, q_labels: Tensor, r_labels: Tensor) -> _Structure:
        has_negatives = bool((q_labels[:, None] != r_labels[None, :]).any())
        if not has_negatives:
            self._warn_once("one_class", "a batch with a single class has no negative pair: "
                            "LoOp (and most losses) get nothing to learn from it")
        elif table_q.num_pairs == len(q_labels) and len(table_q.runs) == len(q_labels) and self.partners == "all":
            self._warn_once("singletons", "every sample of the batch is its own class: no positive pairs, "
                            "so LoOp equals the plain distance; sample several per class "
                            "(e.g. PML's MPerClassSampler)")
        device = table_q.ends.device
        plan = search_plan(table_q, table_r, self._chunk(device))
        layout = None
        if has_negatives and resolve_backend(self.backend, device, self.compile) == "numba":
            layout = numba_layout(table_q, table_r, q_labels, r_labels)
        return _Structure(table_q, table_r, plan, has_negatives, layout)

    def _chunk(self, device: torch.device) -> int:
        if self.chunk_elements is not None:
            return self.chunk_elements
        return DEFAULT_CHUNK_ELEMENTS if device.type == "cpu" else DEFAULT_GPU_CHUNK_ELEMENTS

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=5)

    def _paired_mat(self, qn: Tensor, rn: Tensor) -> Tensor:
        """NPairs form: row k of ``qn`` and of ``rn`` are the two ends of pair k;
        entry (i, j), i != j, becomes LoOp between pair i and pair j."""
        m = len(qn)
        both = torch.cat((qn, rn), 0)
        labels = torch.arange(m, device=qn.device).repeat(2)
        full = self._loop_mat(both, both, labels, labels, True, keys=(qn, rn))
        return full[:m, m:]

    def _units(self) -> Units:
        if self.geometry == "segment":
            return "sqrt"
        if self.geometry == "arc" and not self.is_inverted:
            return "chord"
        return "same"  # cosine or dot product: already a similarity

    def _record(self, base: Tensor, loop: Tensor, neg: Tensor) -> None:
        self._last = (base.detach(), loop.detach(), neg)

    @property
    def num_negative_entries(self) -> int:
        """Negative entries replaced in the last matrix."""
        return 0 if self._last is None else int(self._last[2].sum())

    @property
    def avg_base_minus_loop(self) -> float:
        """Mean |plain - LoOp| over those entries."""
        if self._last is None or not self._last[2].any():
            return 0.0
        base, loop, neg = self._last
        return float((base - loop).abs()[neg].mean())


def working_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype LoOp computes in: the inputs' promoted dtype, at least float32
    (bfloat16 and float16 inputs are upcast; float64 stays float64)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, ValueError):  # a device type autocast does not know (e.g. meta)
        return False


def _autocast_dtype(device_type: str) -> torch.dtype:
    return torch.get_autocast_dtype(device_type)


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast disabled for ``device`` (a no-op when it is off)."""
    if _autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _same_key(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.device == y.device and torch.equal(x, y) for x, y in zip(a, b))
