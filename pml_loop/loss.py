"""LoOpLoss: make the optimal hard negative distance flow into any PML loss."""
from __future__ import annotations

from pytorch_metric_learning.losses import (
    BaseMetricLossFunction,
    CrossBatchMemory,
    NPairsLoss,
    SignalToNoiseRatioContrastiveLoss,
)
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.reducers import BaseReducer
from pytorch_metric_learning.utils import common_functions as c_f
from torch import Tensor

from .batch_loop import DEFAULT_CHUNK_ELEMENTS
from .distance import LoOpDistance
from .miner import LoOpMiner
from .pairs import Partners


class LoOpLoss(BaseMetricLossFunction):
    """Wraps a PML loss so each negative distance is the LoOp distance.

    The wrapped loss's distance is replaced by a :class:`LoOpDistance` around
    it (same units, ``power`` and inversion), and this wrapper binds the batch
    labels around each call, so the positive terms are unchanged and every
    negative entry (i, j) becomes the optimum between a positive pair of i and
    one of j. ``NPairsLoss`` gets the paper's N-pair form (pair i against pair
    j). A :class:`CrossBatchMemory` may be wrapped too: the memory then serves
    as the reference set, its positives forming the reference pairs.

    Args:
        loss: a PML pair/tuple loss (or a CrossBatchMemory around one).
        miner: optional miner run on each batch; a :class:`LoOpMiner` shares
            this loss's LoOp distance, so the batch is searched once.
        reducer: optional reducer that replaces the wrapped loss's reducer,
            e.g. :class:`LoOpReducer`.
        partners: ``"all"`` or ``"hardest"`` (see :class:`LoOpDistance`).
        chunk_elements: memory bound of the search.
        compile: ``torch.compile`` the search (see :class:`LoOpDistance`).
    """

    def __init__(
        self,
        loss: BaseMetricLossFunction | CrossBatchMemory,
        miner: BaseMiner | None = None,
        reducer: BaseReducer | None = None,
        partners: Partners = "all",
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        compile: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(loss, LoOpLoss):
            raise TypeError("the loss is already a LoOpLoss")
        if isinstance(loss, CrossBatchMemory):
            inner = loss.loss
            if isinstance(inner, LoOpLoss):
                raise TypeError("the CrossBatchMemory already wraps a LoOpLoss")
            # CrossBatchMemory checked the inner loss's name when it was built;
            # the LoOp wrapper goes inside it so each call sees the memory as ref.
            loss.loss = LoOpLoss(inner, reducer=reducer, partners=partners, chunk_elements=chunk_elements, compile=compile)
            self.loop_distance = loss.loss.loop_distance
            if isinstance(loss.miner, LoOpMiner):
                loss.miner.distance = self.loop_distance
        else:
            _check_supported(loss)
            self.loop_distance = LoOpDistance(loss.distance, partners=partners, chunk_elements=chunk_elements, compile=compile)
            loss.distance = self.loop_distance
            if reducer is not None:
                loss.set_reducer(reducer)
        if miner is not None:
            if not isinstance(miner, BaseMiner):
                raise TypeError(f"miner must be a PML BaseMiner, got {type(miner).__name__}")
            if isinstance(miner, LoOpMiner):
                if miner.output == "quadruplets":
                    raise ValueError("a LoOpMiner with output='quadruplets' gives no PML indices tuple")
                miner.distance = self.loop_distance
        self.loss = loss
        self.miner = miner
        self.distance = self.loop_distance
        self.paired = isinstance(loss, NPairsLoss)
        self.add_to_recordable_attributes(
            list_of_names=["num_negative_entries", "avg_base_minus_loop"], is_stat=False
        )

    @property
    def num_negative_entries(self) -> int:
        """Negative entries LoOp replaced in the last batch (for record-keeper)."""
        return self.loop_distance.num_negative_entries

    @property
    def avg_base_minus_loop(self) -> float:
        """Mean |plain - LoOp| over those entries in the last batch."""
        return self.loop_distance.avg_base_minus_loop

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
        with self.loop_distance.sharing():
            if isinstance(self.loss, CrossBatchMemory):
                return self._forward_cross_batch(embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask)
            if enqueue_mask is not None:
                raise ValueError("enqueue_mask is only for a wrapped CrossBatchMemory")
            ref_emb, ref_labels = c_f.set_ref_emb(embeddings, labels, ref_emb, ref_labels)
            indices_tuple = self._mine(embeddings, labels, indices_tuple, ref_emb, ref_labels)
            with self.loop_distance.bind(labels, ref_labels, paired=self.paired):
                return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)

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

    def _forward_cross_batch(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask):
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("a wrapped CrossBatchMemory takes no ref_emb: its memory is the reference")
        if self.miner is not None:
            indices_tuple = self._mine(embeddings, labels, indices_tuple, None, None)
        return self.loss(embeddings, labels, indices_tuple, enqueue_mask)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        raise RuntimeError("LoOpLoss delegates to the wrapped loss in forward()")


def _check_supported(loss) -> None:
    if isinstance(loss, SignalToNoiseRatioContrastiveLoss):
        raise ValueError(
            "SignalToNoiseRatioContrastiveLoss measures the SNR distance (a variance ratio), "
            "which has no segment or arc between points: LoOp does not apply to it"
        )
    if not isinstance(loss, BaseMetricLossFunction):
        raise TypeError(f"LoOpLoss wraps a PML BaseMetricLossFunction or CrossBatchMemory, got {type(loss).__name__}")
    if not hasattr(loss, "distance"):
        raise TypeError(f"{type(loss).__name__} has no distance matrix for LoOp to change")

