"""Batch structure: which positive pair (segment / arc) each sample brings.

Every sample i owns a list of *pairs* (i, p) with p a positive partner of i;
a sample without partner owns the degenerate pair (i, i), a point, so that a
batch of singleton classes reduces LoOp to the plain distance. The pairs of a
set are stored once (``ends``), sorted by class so that the pairs of one
class are contiguous, and each sample lists the pairs it owns (``owned``).
A combination of a pair of one set and a pair of another (or the same) set is
one number (:class:`Combos`): what the search reports for each entry.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .functional.gram import flat_positions, scalar, take

Partners = Literal["all", "hardest"]
PARTNERS = ("all", "hardest")


class PairTable(NamedTuple):
    """Positive pairs of one set of ``n`` samples.

    ends:   ``(K, 2)`` sample indices of the two ends of each pair; the pairs of
            one class are contiguous.
    owned:  ``(n, deg)`` pair indices owned by each sample; short rows repeat
            their first pair (harmless under a minimum, and always a valid index).
    labels: ``(K,)`` the class of each pair.
    runs:   the number of pairs of each class, in order (host integers: they
            decide how the search is cut into blocks).
    """

    ends: Tensor
    owned: Tensor
    labels: Tensor
    runs: tuple[int, ...]

    @property
    def num_pairs(self) -> int:
        return self.ends.shape[0]


def _group_by_owner(owner: Tensor, pair_id: Tensor, n: int) -> Tensor:
    """Scatter ``pair_id`` into a ``(n, deg)`` table by ``owner`` (vectorised); every
    sample owns at least one pair, which pads its row."""
    order = torch.argsort(owner, stable=True)
    owner, pair_id = owner[order], pair_id[order]
    counts = torch.bincount(owner, minlength=n)
    deg = int(counts.max()) if n else 0
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(owner), device=owner.device) - starts[owner]
    owned = torch.full((n, max(deg, 1)), -1, dtype=torch.long, device=owner.device)
    owned[owner, slot] = pair_id
    return torch.where(owned < 0, owned[:, :1], owned)


def _sorted_by_class(ends: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    # Classes in the order they first appear: in a batch that keeps each
    # class's samples together (PML's MPerClassSampler), the samples behind a
    # range of pairs are then a range too, and the search writes slices.
    first = partition_key(labels)[ends[:, 0]]
    order = torch.argsort(first, stable=True)
    ends = ends[order]
    runs = torch.unique_consecutive(first[order], return_counts=True)[1]
    return ends, labels[ends[:, 0]], tuple(runs.tolist())


def positive_pair_table(
    labels: Tensor, partners: Partners = "all", farness: Tensor | None = None
) -> PairTable:
    """Pairs of a set from its labels.

    Args:
        labels: ``(n,)`` integer labels.
        partners: ``"all"``: sample i owns every (i, p) with p of its class
            (each unordered pair stored once, owned by both ends);
            ``"hardest"``: only (i, p*) with p* its farthest partner.
        farness: ``(n, n)`` larger = farther, required for ``"hardest"``.
    """
    if partners not in PARTNERS:
        raise ValueError(f"partners must be one of {PARTNERS}, got {partners!r}")
    n = len(labels)
    device = labels.device
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    same.fill_diagonal_(False)
    has_partner = same.any(1)
    idx = torch.arange(n, device=device)
    if partners == "hardest":
        if farness is None:
            raise ValueError('partners="hardest" needs the farness matrix')
        far = farness.detach().masked_fill(~same, float("-inf"))
        partner = torch.where(has_partner, far.argmax(1), idx)
        ends, pair_labels, runs = _sorted_by_class(torch.stack((idx, partner), 1), labels)
        # Sample i owns the pair that starts at i.
        owned = torch.empty(n, dtype=torch.long, device=device)
        owned[ends[:, 0]] = torch.arange(n, device=device)
        return PairTable(ends, owned.unsqueeze(1), pair_labels, runs)
    i, p = torch.triu(same, diagonal=1).nonzero(as_tuple=True)
    lonely = idx[~has_partner]
    ends = torch.cat((torch.stack((i, p), 1), torch.stack((lonely, lonely), 1)), 0)
    ends, pair_labels, runs = _sorted_by_class(ends, labels)
    pair_id = torch.arange(len(ends), device=device)
    # A pair (i, p) is owned by both i and p; a point (i, i) only once.
    is_point = ends[:, 0] == ends[:, 1]
    owner = torch.cat((ends[:, 0], ends[~is_point, 1]))
    ids = torch.cat((pair_id, pair_id[~is_point]))
    return PairTable(ends, _group_by_owner(owner, ids, n), pair_labels, runs)


def partition_key(labels: Tensor) -> Tensor:
    """``(n,)`` index of the first sample of each sample's class.

    Two label vectors with the same key split positions into the same classes
    (e.g. consecutive m-per-class batches), so they share their pair table.
    It is computed at every call (the cache check): on the CPU by sorting,
    far cheaper than the n x n comparison from B = 1024 on
    (``benchmarks/cpu_facts.py``); on a GPU by the comparison, which needs no
    host sync.
    """
    if labels.device.type != "cpu":
        return (labels[None, :] == labels[:, None]).to(torch.uint8).argmax(1)
    uniq, inverse = torch.unique(labels, return_inverse=True)
    n = len(labels)
    first = torch.full((len(uniq),), n, dtype=torch.long).scatter_reduce_(0, inverse, torch.arange(n), "amin")
    return first[inverse]


class Combos(NamedTuple):
    """How a combination of a first pair P (of ``table_q``'s ``K_q``) and a
    second pair Q (of ``table_r``'s ``K_r``) is numbered: ``P K_r + Q``; within
    one set (``one_set``) the pair of smaller index first, ``min K + max``,
    so that entry (i, j) and entry (j, i) name the same combination.

    x1, x2: ``(K_q,)`` int32, the first pairs' ends; x3, x4: ``(K_r,)``, the
    second pairs'.
    """

    x1: Tensor
    x2: Tensor
    x3: Tensor
    x4: Tensor
    one_set: bool

    @staticmethod
    def of_tables(table_q: PairTable, table_r: PairTable) -> "Combos":
        ends_q, ends_r = (t.ends.T.int().contiguous() for t in (table_q, table_r))
        return Combos(ends_q[0], ends_q[1], ends_r[0], ends_r[1], table_q is table_r)

    @property
    def count(self) -> int:
        return self.x1.shape[0] * self.x3.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return torch.int32 if self.count < 2**31 else torch.int64

    def of(self, pair_q: Tensor, pair_r: Tensor) -> Tensor:
        """The combination of pairs ``pair_q`` and ``pair_r`` (int32, any shape)."""
        if self.dtype != pair_q.dtype:
            pair_q, pair_r = pair_q.to(self.dtype), pair_r.to(self.dtype)
        if self.one_set:
            return flat_positions(torch.minimum(pair_q, pair_r), torch.maximum(pair_q, pair_r), self.x3.shape[0])
        return flat_positions(pair_q, pair_r, self.x3.shape[0])

    def ends(self, combo: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four samples (x1, x2 | x3, x4) of each combination: the first
        pair's ends, then the second's (for one set, in the numbering's order)."""
        width = self.x3.shape[0]
        first = torch.div(combo, scalar(width, combo), rounding_mode="floor")
        second = torch.sub(combo, first, alpha=width)
        return take(self.x1, first), take(self.x2, first), take(self.x3, second), take(self.x4, second)

    def partners(self, combo: Tensor) -> tuple[Tensor, Tensor]:
        """``(p, q)`` of each entry (i, j) of ``combo`` ``(n_q, n_r)``: the
        other ends of the pairs of i and of j (int64)."""
        x1, x2, x3, x4 = self.ends(combo)
        i = torch.arange(combo.shape[0], device=combo.device).unsqueeze(1)
        if self.one_set:  # which of the two pairs is i's
            swap = (x1 != i) & (x2 != i)
            x1, x2, x3, x4 = (torch.where(swap, b, a) for a, b in ((x1, x3), (x2, x4), (x3, x1), (x4, x2)))
        j = torch.arange(combo.shape[1], device=combo.device)
        return torch.where(x1 == i, x2, x1).long(), torch.where(x3 == j, x4, x3).long()
