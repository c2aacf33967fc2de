"""LoOpMiner: triplet-margin mining where the negative distance is the LoOp one."""
from __future__ import annotations

from typing import Literal

import torch
from pytorch_metric_learning.distances import BaseDistance
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import Tensor

from .backend import Backend
from .distance import LoOpDistance
from .pairs import Partners

TupleType = Literal["all", "hard", "semihard", "easy"]
Output = Literal["triplets", "pairs", "quadruplets"]
TUPLE_TYPES = ("all", "hard", "semihard", "easy")
OUTPUTS = ("triplets", "pairs", "quadruplets")


class LoOpMiner(BaseMiner):
    """Mines (anchor, positive, negative) triplets with LoOp negative distances.

    The margin of a triplet is ``d_loop(a, n) - d(a, p)`` (or the reverse for
    similarities). ``type_of_tuples``: ``"all"`` keeps margins <= ``margin``
    (all violating), ``"hard"`` the subset with margin <= 0, ``"semihard"``
    the subset with margin > 0, ``"easy"`` the rest.

    Args:
        margin: the triplet margin, in the distance's units.
        type_of_tuples: see above.
        output: ``"triplets"`` ``(a, p, n)``; ``"pairs"`` ``(a1, p, a2, n)``
            (PML's pair format, unique pairs of the mined triplets); or
            ``"quadruplets"`` ``(a, p, n, q)``: each mined negative entry (a, n)
            with the partners p of a and q of n whose pairs realise its LoOp
            value (not a PML indices tuple: for your own losses).
        distance: a plain PML distance (wrapped here) or a shared LoOpDistance.
        partners, compile, backend: see :class:`LoOpDistance` (for a plain ``distance``).
    """

    def __init__(
        self,
        margin: float = 0.2,
        type_of_tuples: TupleType = "all",
        output: Output = "triplets",
        distance: BaseDistance | None = None,
        partners: Partners = "all",
        compile: bool = False,
        backend: Backend = "auto",
        **kwargs,
    ):
        if type_of_tuples not in TUPLE_TYPES:
            raise ValueError(f"type_of_tuples must be one of {TUPLE_TYPES}, got {type_of_tuples!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if not isinstance(distance, LoOpDistance):
            distance = LoOpDistance(distance, partners=partners, compile=compile, backend=backend)
        elif partners != distance.partners:
            raise ValueError(f"partners={partners!r} conflicts with the given LoOpDistance's "
                             f"partners={distance.partners!r}")
        super().__init__(distance=distance, **kwargs)
        self.margin = margin
        self.type_of_tuples = type_of_tuples
        self.output = output
        self.add_to_recordable_attributes(list_of_names=["margin"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["avg_triplet_margin", "pos_pair_dist", "neg_pair_dist"], is_stat=True
        )

    def mine(self, embeddings: Tensor, labels: Tensor, ref_emb: Tensor, ref_labels: Tensor):
        if labels is None:
            raise ValueError("LoOpMiner needs labels")
        self.distance.follow(self.distance.base)
        with self.distance.sharing():
            mat = self.distance.loop_mat(embeddings, labels, ref_emb, ref_labels)
            partners = self.distance.last_partners()
        a, p, n = lmu.get_all_triplets_indices(labels, ref_labels)
        ap, an = mat[a, p], mat[a, n]
        margin = ap - an if self.distance.is_inverted else an - ap
        self._set_stats(ap, an, margin)
        keep = self._select(margin)
        a, p, n = a[keep], p[keep], n[keep]
        if self.output == "triplets":
            return a, p, n
        if self.output == "pairs":
            a1, pos = _unique_pairs(a, p, len(ref_labels))
            a2, neg = _unique_pairs(a, n, len(ref_labels))
            return a1, pos, a2, neg
        a, n = _unique_pairs(a, n, len(ref_labels))
        p_star, q_star = partners
        return a, p_star[a, n], n, q_star[a, n]

    def _select(self, margin: Tensor) -> Tensor:
        if self.type_of_tuples == "easy":
            return margin > self.margin
        keep = margin <= self.margin
        if self.type_of_tuples == "hard":
            keep &= margin <= 0
        elif self.type_of_tuples == "semihard":
            keep &= margin > 0
        return keep

    def _set_stats(self, ap: Tensor, an: Tensor, margin: Tensor) -> None:
        if self.collect_stats and len(ap):
            self.pos_pair_dist = float(ap.mean())
            self.neg_pair_dist = float(an.mean())
            self.avg_triplet_margin = float(margin.mean())

    def output_assertion(self, output):
        if self.output == "quadruplets":
            assert len(output) == 4 and all(len(x) == len(output[0]) for x in output)
            self.num_triplets = len(output[0])
            return
        super().output_assertion(output)


def _unique_pairs(i: Tensor, j: Tensor, n_ref: int) -> tuple[Tensor, Tensor]:
    key = torch.unique(i * n_ref + j)
    return key // n_ref, key % n_ref
