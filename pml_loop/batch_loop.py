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

#: Elements of one search chunk (query pairs x reference pairs). The arc
#: search keeps about 10 temporaries of 9 candidates each, so 2**21 elements
#: stay around 1 GB in float32 at most and far less in practice.
DEFAULT_CHUNK_ELEMENTS = 2**21


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


def _pair_quad_gram(g: GramBlocks, ends_q: Tensor, ends_r: Tensor) -> QuadGram:
    """QuadGram of pair combinations; ``ends_q``/``ends_r`` are ``(..., 2)`` index tensors
    whose leading shapes broadcast (``(K_q, 1, 2)`` against ``(1, K_r, 2)``, or two
    ``(n_q, n_r, 2)``)."""
    a, b = ends_q[..., 0], ends_q[..., 1]
    c, d = ends_r[..., 0], ends_r[..., 1]
    dq, dr = g.qq.diagonal(), g.rr.diagonal()
    return QuadGram(
        dq[a], g.qq[a, b], dq[b],
        dr[c], g.rr[c, d], dr[d],
        g.qr[a, c], g.qr[a, d], g.qr[b, c], g.qr[b, d],
    )


@torch.no_grad()
def search_winners(
    g: GramBlocks,
    table_q: PairTable,
    table_r: PairTable,
    geometry: Geometry,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[Winners, PairWeights]:
    """Best (query pair, reference pair) of every entry (i, j), and its optimal weights."""
    kq = table_q.num_pairs
    n_r, deg_r = table_r.owned.shape
    rows = max(1, chunk_elements // max(table_r.num_pairs, n_r * deg_r, 1))
    g = GramBlocks(*(x.detach() for x in g))
    best_val = torch.empty(kq + 1, n_r, dtype=g.qr.dtype, device=g.qr.device)
    best_val[kq] = float("inf")  # sentinel row for the padding of table_q.owned
    best_ref = torch.empty(kq, n_r, dtype=torch.long, device=g.qr.device)
    best_w = torch.empty(4, kq, n_r, dtype=g.qr.dtype, device=g.qr.device)
    cols = torch.arange(n_r, device=g.qr.device)
    for start in range(0, kq, rows):
        stop = min(start + rows, kq)
        ends_q = table_q.ends[start:stop]
        bad, w = search_badness(_pair_quad_gram(g, ends_q[:, None], table_r.ends[None]), geometry)
        # Sentinel column K_r = +inf so padded slots never win.
        bad = torch.cat((bad, bad.new_full((len(ends_q), 1), float("inf"))), 1)
        val, slot = bad[:, table_r.owned].min(-1)  # (rows, n_r, deg_r) -> (rows, n_r)
        ref = table_r.owned[cols, slot]
        best_val[start:stop] = val
        best_ref[start:stop] = ref
        # Keep the winner's weights now rather than searching the winners again.
        best_w[:, start:stop] = torch.stack(tuple(w), 0).gather(2, ref.expand(4, -1, -1))
    _, slot = best_val[table_q.owned].min(1)  # (n_q, deg_q, n_r) -> (n_q, n_r)
    query_pair = table_q.owned.gather(1, slot)
    ref_pair = best_ref.gather(0, query_pair)
    weights = best_w.gather(1, query_pair.expand(4, -1, -1))
    return Winners(query_pair, ref_pair), PairWeights(*weights.unbind(0))


def measure_winners(
    g: GramBlocks, table_q: PairTable, table_r: PairTable, winners: Winners,
    weights: PairWeights, geometry: Geometry,
) -> Tensor:
    """``(n_q, n_r)`` measure (squared distance, cosine or dot) with gradient."""
    q = _pair_quad_gram(g, table_q.ends[winners.query_pair], table_r.ends[winners.ref_pair])
    return measure_at(q, weights, geometry)
