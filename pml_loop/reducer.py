"""LoOpReducer: reduce a loss per positive pair over its negatives."""
from __future__ import annotations

from typing import Literal

import torch
from pytorch_metric_learning.reducers import BaseReducer
from torch import Tensor

Mode = Literal["hardest", "mean", "soft"]
Positives = Literal["all", "hardest"]
MODES = ("hardest", "mean", "soft")
POSITIVES = ("all", "hardest")


def group_ids(*keys: Tensor) -> Tensor:
    """Dense group index of each row of the given integer keys (indices below
    2**31, one or two keys): one int64 key per row, as ``unique(dim=0)`` is
    many times slower."""
    assert 1 <= len(keys) <= 2
    key = keys[0].long()
    for k in keys[1:]:
        key = key * 2**31 + k.long()
    return torch.unique(key, return_inverse=True)[1]


def group_reduce(values: Tensor, groups: Tensor, mode: Mode, beta: float) -> Tensor:
    """Reduce ``values`` ``(N,)`` within ``groups`` ``(N,)`` -> ``(G,)``.

    ``hardest``: the largest value (the gradient flows to that element only);
    ``mean``; ``soft``: ``logsumexp(beta * v) / beta``, a smooth maximum.
    """
    g = int(groups.max()) + 1
    if mode == "mean":
        total = values.new_zeros(g).index_add(0, groups, values)
        count = values.new_zeros(g).index_add(0, groups, torch.ones_like(values))
        return total / count
    with torch.no_grad():
        top = values.new_full((g,), float("-inf")).scatter_reduce(0, groups, values.detach(), "amax")
    if mode == "hardest":
        with torch.no_grad():
            is_top = values.detach() == top[groups]
            idx = torch.arange(len(values), device=values.device)
            first = torch.full((g,), len(values), device=values.device, dtype=torch.long)
            first = first.scatter_reduce(0, groups[is_top], idx[is_top], "amin")
        return values[first]
    if mode == "soft":
        shifted = torch.exp(beta * (values - top[groups]))
        return top + torch.log(values.new_zeros(g).index_add(0, groups, shifted)) / beta
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


class LoOpReducer(BaseReducer):
    """Per positive pair, reduce over negatives; then average.

    - triplet losses ``(a, p, n)``: group by the positive pair (a, p) and reduce
      over n with ``mode``; ``positives="hardest"`` then keeps, per anchor, the
      largest pair value. ``TripletMarginLoss`` + ``mode="hardest",
      positives="hardest"`` is the hardest-positive-hardest-negative triplet.
    - negative-pair losses ``(a, n)``: group by anchor, reduce over n.
    - positive-pair and per-element losses: ``positives="hardest"`` keeps the
      largest per anchor, otherwise the plain mean.

    Args:
        mode: ``"hardest"``, ``"mean"`` or ``"soft"`` (log-sum-exp with ``beta``).
        positives: ``"all"`` or ``"hardest"``.
        beta: sharpness of the soft form.
        avg_non_zero: average only the groups whose reduced loss is > 0
            (like PML's AvgNonZeroReducer).
    """

    def __init__(self, mode: Mode = "hardest", positives: Positives = "all", beta: float = 10.0,
                 avg_non_zero: bool = False, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if positives not in POSITIVES:
            raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.mode, self.positives, self.beta, self.avg_non_zero = mode, positives, beta, avg_non_zero
        self.add_to_recordable_attributes(name="num_groups", is_stat=True)

    def _average(self, per_group: Tensor, embeddings: Tensor) -> Tensor:
        if self.avg_non_zero:
            per_group = per_group[per_group > 0]
        self.num_groups = len(per_group)
        if len(per_group) == 0:
            return self.zero_loss(embeddings)
        return per_group.mean()

    def _per_anchor(self, values: Tensor, anchors: Tensor, mode: Mode) -> Tensor:
        return group_reduce(values, group_ids(anchors), mode, self.beta)

    def triplet_reduction(self, losses, loss_indices, embeddings, labels):
        a, p, _ = loss_indices
        pair = group_ids(a, p)
        per_pair = group_reduce(losses, pair, self.mode, self.beta)
        if self.positives == "hardest":
            pair_anchor = torch.zeros(len(per_pair), dtype=torch.long, device=a.device)
            pair_anchor[pair] = a
            per_pair = self._per_anchor(per_pair, pair_anchor, "hardest")
        return self._average(per_pair, embeddings)

    def neg_pair_reduction(self, losses, loss_indices, embeddings, labels):
        return self._average(self._per_anchor(losses, loss_indices[0], self.mode), embeddings)

    def pos_pair_reduction(self, losses, loss_indices, embeddings, labels):
        if self.positives == "hardest":
            losses = self._per_anchor(losses, loss_indices[0], "hardest")
        return self._average(losses, embeddings)

    def element_reduction(self, losses, loss_indices, embeddings, labels):
        if self.positives == "hardest":
            losses = self._per_anchor(losses, loss_indices, "hardest")
        return self._average(losses, embeddings)
