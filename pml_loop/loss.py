"""LoOpLoss: make the optimal hard negative distance flow into any PML loss."""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory, NPairsLoss
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.reducers import BaseReducer, DoNothingReducer, MultipleReducers
from pytorch_metric_learning.utils import common_functions as c_f
from torch import Tensor

from .backend import Backend
from .distance import LoOpDistance, NonFinite
from .miner import LoOpMiner
from .pairs import Partners
from .support import refusal_reason


class LoOpLoss(BaseMetricLossFunction):
    """Wraps a PML loss so each negative distance is the LoOp distance.

    At each call the wrapped loss reads a :class:`LoOpDistance` around its own
    distance (same units, ``power`` and inversion), bound to the batch labels,
    so the positive terms are unchanged and every negative entry (i, j)
    becomes the optimum between a positive pair of i and one of j.
    ``NPairsLoss`` gets the paper's N-pair form (pair i against pair j). A
    :class:`CrossBatchMemory` may be wrapped too: the memory then serves as the
    reference set, its positives forming the reference pairs.

    The wrapper borrows the loss, miner and reducer for the duration of a call
    and gives them back unchanged: ``loss(emb, labels)`` still computes the
    plain loss, and later changes to it (a margin schedule, another distance)
    are seen by the wrapper.

    Args:
        loss: a PML pair/tuple loss (or a CrossBatchMemory around one); see
            ``pml_loop.support`` for which losses qualify.
        miner: optional miner run on each batch; a :class:`LoOpMiner` whose
            distance and partners agree with the loss's shares its search (the
            batch is searched once), one that disagrees is an error.
        reducer: optional reducer used instead of the wrapped loss's own during
            the call, e.g. :class:`LoOpReducer`.
        partners, chunk_elements, compile, nonfinite, backend: see :class:`LoOpDistance`.
        collect_stats: as for any PML loss.
    """

    def __init__(
        self,
        loss: BaseMetricLossFunction | CrossBatchMemory,
        miner: BaseMiner | None = None,
        reducer: BaseReducer | None = None,
        partners: Partners = "all",
        chunk_elements: int | None = None,
        compile: bool = False,
        nonfinite: NonFinite = "warn",
        backend: Backend = "auto",
        collect_stats: bool | None = None,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(
                f"LoOpLoss does not take {', '.join(sorted(kwargs))}: set it on the wrapped loss "
                f"(e.g. TripletMarginLoss(embedding_regularizer=...)), which LoOpLoss calls as it is"
            )
        super().__init__(**({} if collect_stats is None else {"collect_stats": collect_stats}))
        if isinstance(loss, LoOpLoss):
            raise TypeError("the loss is already a LoOpLoss")
        inner = loss.loss if isinstance(loss, CrossBatchMemory) else loss
        if isinstance(inner, LoOpLoss):
            raise TypeError("the CrossBatchMemory already wraps a LoOpLoss")
        reason = refusal_reason(inner)
        if reason is not None:
            raise ValueError(f"LoOp cannot wrap this loss: {reason}")
        if not isinstance(inner, BaseMetricLossFunction):
            raise TypeError(f"LoOpLoss wraps a PML BaseMetricLossFunction or CrossBatchMemory, got {type(loss).__name__}")
        if reducer is not None and not isinstance(reducer, BaseReducer):
            raise TypeError(f"reducer must be a PML BaseReducer, got {type(reducer).__name__}")
        if miner is not None and not isinstance(miner, BaseMiner):
            raise TypeError(f"miner must be a PML BaseMiner, got {type(miner).__name__}")
        if isinstance(miner, LoOpMiner) and miner.output == "quadruplets":
            raise ValueError("a LoOpMiner with output='quadruplets' gives no PML indices tuple")
        self.loss, self.miner = loss, miner
        self.reducer_override = None if reducer is None else _reducer_for(inner, reducer)
        self.loop_distance = LoOpDistance(inner.distance, partners=partners, chunk_elements=chunk_elements,
                                          compile=compile, nonfinite=nonfinite, backend=backend)
        self.paired = isinstance(inner, NPairsLoss)
        for m in (miner, getattr(loss, "miner", None)):
            if isinstance(m, LoOpMiner):
                self._shared_distance(m)  # a conflict is an error now, not at the first batch
        self.add_to_recordable_attributes(
            list_of_names=["num_negative_entries", "avg_base_minus_loop"], is_stat=False
        )

    @property
    def inner_loss(self) -> BaseMetricLossFunction:
        """The pair/tuple loss whose distance LoOp replaces."""
        return self.loss.loss if isinstance(self.loss, CrossBatchMemory) else self.loss

    @property
    def num_negative_entries(self) -> int:
        """Negative entries LoOp replaced in the last batch (for record-keeper)."""
        return self._distance().num_negative_entries

    @property
    def avg_base_minus_loop(self) -> float:
        """Mean |plain - LoOp| over those entries in the last batch."""
        return self._distance().avg_base_minus_loop

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple=None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        enqueue_mask: Tensor | None = None,
    ) -> Tensor:
        """Same call as the wrapped loss: ``embeddings (B, d)``, ``labels (B,)``."""
        self.reset_stats()
        if labels is None:
            raise ValueError("LoOpLoss needs labels: LoOp pairs each sample with its positives")
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must have shape (batch_size, embedding_size), got {tuple(embeddings.shape)}")
        c_f.check_shapes(embeddings, labels)
        labels = c_f.to_device(labels, embeddings)
        distance = self._distance()
        with distance.sharing(), self._borrowed(distance):
            if isinstance(self.loss, CrossBatchMemory):
                if ref_emb is not None or ref_labels is not None:
                    raise ValueError("a wrapped CrossBatchMemory takes no ref_emb: its memory is the reference")
                indices_tuple = self._mine(embeddings, labels, indices_tuple, None, None)
                return self.loss(embeddings, labels, indices_tuple, enqueue_mask)
            if enqueue_mask is not None:
                raise ValueError("enqueue_mask is only for a wrapped CrossBatchMemory")
            ref_emb, ref_labels = c_f.set_ref_emb(embeddings, labels, ref_emb, ref_labels)
            indices_tuple = self._mine(embeddings, labels, indices_tuple, ref_emb, ref_labels)
            return self._call_inner(self.loss, distance, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _call_inner(self, loss, distance, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        with distance.bind(labels, ref_labels, paired=self.paired):
            return loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _distance(self) -> LoOpDistance:
        """The LoOp distance around the loss's *current* distance (shared with a
        compatible LoOpMiner)."""
        for m in (self.miner, getattr(self.loss, "miner", None)):
            if isinstance(m, LoOpMiner):
                return self._shared_distance(m)
        self.loop_distance.follow(self.inner_loss.distance)
        return self.loop_distance

    def _shared_distance(self, miner: LoOpMiner) -> LoOpDistance:
        own, theirs = self.loop_distance, miner.distance
        own.follow(self.inner_loss.distance)
        theirs.follow(theirs.base)
        conflicts = [f"{k}: loss {a!r}, miner {b!r}" for k, a, b in (
            ("distance", _describe(own.base), _describe(theirs.base)),
            ("partners", own.partners, theirs.partners), ("backend", own.backend, theirs.backend))
            if a != b]
        if conflicts:
            raise ValueError("the LoOpMiner and the loss must measure alike to share a search; "
                             + "; ".join(conflicts) + ". Give the miner the loss's distance, partners and backend")
        return theirs

    @contextlib.contextmanager
    def _borrowed(self, distance: LoOpDistance) -> Iterator[None]:
        """Lend the wrapped objects LoOp's distance (and reducer) for one call."""
        inner = self.inner_loss
        saved = [(inner, "distance", inner.distance)]
        if self.reducer_override is not None:
            saved.append((inner, "reducer", inner.reducer))
        memory = self.loss if isinstance(self.loss, CrossBatchMemory) else None
        if memory is not None:
            saved.append((memory, "loss", memory.loss))
        try:
            inner.distance = distance
            if self.reducer_override is not None:
                inner.reducer = self.reducer_override
            if memory is not None:
                # The memory calls its loss with the memory as ref_emb; bind the labels there.
                memory.loss = _BoundCall(self, inner, distance)
            yield
        finally:
            for obj, name, value in saved:
                setattr(obj, name, value)

    def _mine(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if self.miner is None:
            return indices_tuple
        mined = self.miner(embeddings, labels, ref_emb, ref_labels)
        if indices_tuple is None:
            return mined
        if len(indices_tuple) != len(mined):
            raise ValueError(
                f"indices_tuple has {len(indices_tuple)} entries but the miner returns {len(mined)}"
            )
        return c_f.concatenate_indices_tuples(indices_tuple, mined)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        raise RuntimeError("LoOpLoss delegates to the wrapped loss in forward()")


class _BoundCall(torch.nn.Module):
    """Stands in for a CrossBatchMemory's loss during one call: binds the labels
    the memory passes (batch and memory) to the LoOp distance."""

    def __init__(self, wrapper: LoOpLoss, loss, distance: LoOpDistance):
        super().__init__()
        # Plain references, not submodules: this object lives for one call.
        for name, value in (("wrapper", wrapper), ("loss", loss), ("distance", distance)):
            object.__setattr__(self, name, value)

    def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None):
        return self.wrapper._call_inner(self.loss, self.distance, embeddings, labels, indices_tuple, ref_emb, ref_labels)


def _reducer_for(loss: BaseMetricLossFunction, reducer: BaseReducer) -> BaseReducer:
    """What PML's ``loss.set_reducer(reducer)`` would install, without touching ``loss``:
    one reducer per sub-loss where the loss has several (e.g. contrastive)."""
    if isinstance(reducer, (MultipleReducers, DoNothingReducer)) or len(loss.sub_loss_names()) == 1:
        return reducer
    return MultipleReducers({k: copy.deepcopy(reducer) for k in loss.sub_loss_names()})


def _describe(distance) -> tuple:
    return (type(distance).__name__, distance.normalize_embeddings, distance.p, distance.power, distance.is_inverted)
