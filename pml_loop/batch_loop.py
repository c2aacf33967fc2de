"""LoOp values for every (query, reference) entry of a batch.

Entry (i, j) is the optimum over the pairs owned by i (query side) and by j
(reference side). The search runs without gradient on the grid of
(query pair, reference pair) combinations, chunked so memory stays bounded;
it only needs the Gram blocks. The winning combination of each entry is then
measured again with gradient at its fixed optimal weights (Danskin), on
``(n_q, n_r)`` entries only.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .functional import Geometry, PairWeights, QuadGram, measure_at, search_badness
from .pairs import PairTable

#: Pair combinations searched at once. The arc search keeps about 60
#: temporaries, 9-candidate stacks included, so 2**18 combinations stay near
#: 100 MB in float32.
DEFAULT_CHUNK_ELEMENTS = 2**18


class GramBlocks(NamedTuple):
    """Inner products of a query set (n_q) and a reference set (n_r)."""

    qq: Tensor  # (n_q, n_q)
    rr: Tensor  # (n_r, n_r)
    qr: Tensor  # (n_q, n_r)


class Winners(NamedTuple):
    """Optimal pair combination of every entry: pair indices, each ``(n_q, n_r)``."""

    query_pair: Tensor
    ref_pair: Tensor


def gram_blocks(query: Tensor, ref: Tensor, same_set: bool) -> GramBlocks:
    """One matrix product per block (a single one when query is reference)."""
    qr = query @ ref.T
    if same_set:
        return GramBlocks(qr, qr, qr)
    return GramBlocks(query @ query.T, ref @ ref.T, qr)


def _take(mat: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``mat[rows, cols]`` through a flat index (faster than 2-D advanced indexing)."""
    return mat.reshape(-1)[rows * mat.shape[1] + cols]


def _pair_quad_gram(g: GramBlocks, ends_q: Tensor, ends_r: Tensor) -> QuadGram:
    """QuadGram of pair combinations; ``ends_q``, ``ends_r``: ``(..., 2)`` sample
    indices of the two pairs of each combination (same leading shape)."""
    a, b = ends_q[..., 0], ends_q[..., 1]
    c, d = ends_r[..., 0], ends_r[..., 1]
    dq, dr = g.qq.diagonal(), g.rr.diagonal()
    return QuadGram(
        dq[a], _take(g.qq, a, b), dq[b],
        dr[c], _take(g.rr, c, d), dr[d],
        _take(g.qr, a, c), _take(g.qr, a, d), _take(g.qr, b, c), _take(g.qr, b, d),
    )


def _combinations(table_q: PairTable, table_r: PairTable, labels_q: Tensor, labels_r: Tensor,
                  same_set: bool) -> tuple[Tensor, Tensor]:
    """Flat (query pair, reference pair) indices worth searching: pairs of different
    classes only (same-class entries keep the base value), and in one set each
    unordered combination once (the LoOp value is symmetric)."""
    lab_q = labels_q[table_q.ends[:, 0]]
    lab_r = labels_r[table_r.ends[:, 0]]
    if same_set:
        k, l = torch.triu_indices(table_q.num_pairs, table_q.num_pairs, 1, device=lab_q.device)
        keep = lab_q[k] != lab_q[l]
        return k[keep], l[keep]
    return (lab_q[:, None] != lab_r[None, :]).nonzero(as_tuple=True)


@torch.no_grad()
def search_winners(
    g: GramBlocks,
    table_q: PairTable,
    table_r: PairTable,
    labels_q: Tensor,
    labels_r: Tensor,
    same_set: bool,
    geometry: Geometry,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    compile: bool = False,
) -> tuple[Winners, PairWeights]:
    """Best (query pair, reference pair) of every entry (i, j), and its optimal weights.

    Entries of one class get an arbitrary (finite) winner: their value is the
    base distance, see :class:`~pml_loop.LoOpDistance`.
    """
    g = GramBlocks(*(x.detach() for x in g))
    kq, kr = table_q.num_pairs, table_r.num_pairs
    dtype, device = g.qr.dtype, g.qr.device
    bad = torch.full((kq, kr + 1), float("inf"), dtype=dtype, device=device)  # column kr: padding
    # Defaults: the first ends (a corner), finite for any geometry.
    weights = torch.zeros(4, kq, kr + 1, dtype=dtype, device=device)
    weights[0] = weights[2] = 1
    k_all, l_all = _combinations(table_q, table_r, labels_q, labels_r, same_set)
    for start in range(0, len(k_all), chunk_elements):
        k, l = k_all[start:start + chunk_elements], l_all[start:start + chunk_elements]
        b, w = search_badness(_pair_quad_gram(g, table_q.ends[k], table_r.ends[l]), geometry, compile)
        w = torch.stack(tuple(w), 0)
        bad[k, l] = b
        weights[:, k, l] = w
        if same_set:  # the mirrored combination: same value, roles of the pairs swapped
            bad[l, k] = b
            weights[:, l, k] = w[[2, 3, 0, 1]]
    # Reduce over the pairs each reference sample owns, then each query sample owns.
    n_r, deg_r = table_r.owned.shape
    rows = max(1, chunk_elements // max(n_r * deg_r, 1))
    best_val = torch.empty(kq + 1, n_r, dtype=dtype, device=device)
    best_val[kq] = float("inf")  # padding row of table_q.owned
    best_ref = torch.empty(kq, n_r, dtype=torch.long, device=device)
    cols = torch.arange(n_r, device=device)
    for start in range(0, kq, rows):
        stop = min(start + rows, kq)
        val, slot = bad[start:stop, table_r.owned].min(-1)  # (rows, n_r, deg_r) -> (rows, n_r)
        best_val[start:stop] = val
        best_ref[start:stop] = table_r.owned[cols, slot]
    _, slot = best_val[table_q.owned].min(1)  # (n_q, deg_q, n_r) -> (n_q, n_r)
    query_pair = table_q.owned.gather(1, slot)
    ref_pair = best_ref.gather(0, query_pair)
    w = weights[:, query_pair, ref_pair]
    return Winners(query_pair, ref_pair), PairWeights(*w.unbind(0))


def measure_winners(
    g: GramBlocks, table_q: PairTable, table_r: PairTable, winners: Winners,
    weights: PairWeights, geometry: Geometry,
) -> Tensor:
    """``(n_q, n_r)`` measure (squared distance, cosine or dot) with gradient.

    Each winning pair is turned so that entry (i, j)'s own samples come first:
    then three of the ten inner products are ``diag``/``G_qr`` themselves and
    only seven need a gather.
    """
    ends_q = table_q.ends[winners.query_pair]  # (n_q, n_r, 2)
    ends_r = table_r.ends[winners.ref_pair]
    n_q, n_r = winners.query_pair.shape
    i = torch.arange(n_q, device=ends_q.device)[:, None]
    j = torch.arange(n_r, device=ends_r.device)[None, :]
    flip_q = ends_q[..., 0] != i
    flip_r = ends_r[..., 0] != j
    p = torch.where(flip_q, ends_q[..., 0], ends_q[..., 1])
    q = torch.where(flip_r, ends_r[..., 0], ends_r[..., 1])
    a1, a2, b1, b2 = weights
    w = PairWeights(
        torch.where(flip_q, a2, a1), torch.where(flip_q, a1, a2),
        torch.where(flip_r, b2, b1), torch.where(flip_r, b1, b2),
    )
    dq, dr = g.qq.diagonal(), g.rr.diagonal()
    quad = QuadGram(
        dq[:, None], _take(g.qq, i, p), dq[p],
        dr[None, :], _take(g.rr, j, q), dr[q],
        g.qr, _take(g.qr, i, q), _take(g.qr, p, j), _take(g.qr, p, q),
    )
    return measure_at(quad, w, geometry)
