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
from .functional.compiled import maybe_compiled
from .functional.native import can_use_native, native_search_entries
from .pairs import PairTable

#: Pair combinations searched at once. The arc search keeps about 60
#: temporaries of that length, so 2**18 combinations stay near 100 MB in float32.
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


def quad_gram_of(g: GramBlocks, a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> QuadGram:
    """QuadGram of quadruples (x_a, x_b | x_c, x_d): a, b index the query set,
    c, d the reference set, all of one shape.

    One ``torch.gather`` per Gram block (a single one for one set) rather than
    ten advanced-indexing reads: on CPU the backward of advanced indexing is a
    sorting index_put, ~10x slower than gather's scatter_add.
    """
    def take(mat: Tensor, rows: tuple, cols: tuple) -> Tensor:
        flat = torch.stack(rows) * mat.shape[1] + torch.stack(cols)
        return mat.reshape(-1).gather(0, flat.reshape(-1)).view(flat.shape)

    if g.qq is g.qr and g.rr is g.qr:
        return QuadGram(*take(g.qr, (a, a, b, c, c, d, a, a, b, b), (a, b, b, c, d, d, c, d, c, d)).unbind(0))
    qq = take(g.qq, (a, a, b), (a, b, b)).unbind(0)
    rr = take(g.rr, (c, c, d), (c, d, d)).unbind(0)
    qr = take(g.qr, (a, a, b, b), (c, d, c, d)).unbind(0)
    return QuadGram(*qq, *rr, *qr)


def _pair_quad_gram(g: GramBlocks, ends_q: Tensor, ends_r: Tensor) -> QuadGram:
    """QuadGram of pair combinations; ``ends_q``, ``ends_r``: ``(..., 2)`` sample
    indices of the two pairs of each combination (same leading shape)."""
    return quad_gram_of(g, ends_q[..., 0], ends_q[..., 1], ends_r[..., 0], ends_r[..., 1])


@torch.no_grad()
def _search_chunk(g: GramBlocks, ends_q: Tensor, ends_r: Tensor, geometry: Geometry) -> tuple[Tensor, Tensor]:
    """Badness ``(C,)`` and stacked weights ``(4, C)`` of C pair combinations."""
    bad, w = search_badness(_pair_quad_gram(g, ends_q, ends_r), geometry)
    return bad, torch.stack(tuple(w), 0)


class Triangle(NamedTuple):
    """Upper triangle (k < l) of an ``n x n`` matrix and the flat indices of
    both (k, l) and (l, k), to mirror values computed once."""

    rows: Tensor
    cols: Tensor
    mirrored_flat: Tensor

    @property
    def flat(self) -> Tensor:
        """Flat indices of the upper triangle alone."""
        return self.mirrored_flat[: len(self.rows)]


def upper_triangle(n: int, device: torch.device) -> Triangle:
    k, l = torch.triu_indices(n, n, 1, device=device)
    return Triangle(k, l, torch.cat((k * n + l, l * n + k)))


@torch.no_grad()
def search_winners(
    g: GramBlocks,
    table_q: PairTable,
    table_r: PairTable,
    geometry: Geometry,
    symmetric: Triangle | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    compile: bool = False,
) -> tuple[Winners, PairWeights]:
    """Best (query pair, reference pair) of every entry (i, j), and its optimal weights.

    ``symmetric``: for one set (query is reference), the pair combinations to
    search (:func:`upper_triangle` of the pairs; LoOp is symmetric), the
    mirrored ones are filled in. Otherwise the full ``K_q x K_r`` grid is
    searched. Same-class combinations are not filtered out; their entries
    keep the base value later.
    """
    g = GramBlocks(*(x.detach() for x in g))
    kq, kr = table_q.num_pairs, table_r.num_pairs
    total = len(symmetric.rows) if symmetric is not None else kq * kr
    flat = symmetric.mirrored_flat if symmetric is not None else None

    def combinations(start: int, stop: int) -> tuple[Tensor, Tensor]:
        if symmetric is not None:
            return symmetric.rows[start:stop], symmetric.cols[start:stop]
        idx = torch.arange(start, stop, device=g.qr.device)
        return idx // kr, idx % kr

    if can_use_native(g.qr, geometry):  # one C++ pass: search, grid and both reductions
        k, l = combinations(0, total)
        qp, rp, w = native_search_entries(g.qq, g.rr, g.qr, table_q.ends,
                                          table_r.ends, k, l, symmetric is not None,
                                          table_q.owned, table_r.owned, geometry)
        return Winners(qp, rp), PairWeights(*w.unbind(0))
    if total <= chunk_elements and kq * table_r.owned.numel() <= chunk_elements:
        # The common case in one function, so compile=True fuses all of it.
        k, l = combinations(0, total)
        return maybe_compiled(_search_at_once, compile)(g, table_q, table_r, k, l, flat, geometry)
    chunk = maybe_compiled(_search_chunk, compile)
    parts = [chunk(g, table_q.ends[k], table_r.ends[l], geometry)
             for k, l in (combinations(a, min(a + chunk_elements, total))
                          for a in range(0, total, chunk_elements))]
    bad, weights = _pair_grid(torch.cat([b for b, _ in parts]), torch.cat([w for _, w in parts], 1), kq, kr, flat)
    n_r, deg_r = table_r.owned.shape
    rows = max(1, chunk_elements // max(n_r * deg_r, 1))
    best = [_best_ref_pairs(bad[a:a + rows], table_r.owned) for a in range(0, kq, rows)]
    return _best_entries(torch.cat([v for v, _ in best]), torch.cat([r for _, r in best]), weights, table_q.owned)


def _search_at_once(g: GramBlocks, table_q: PairTable, table_r: PairTable, k: Tensor, l: Tensor,
                    flat: Tensor | None, geometry: Geometry) -> tuple[Winners, PairWeights]:
    bad, w = _search_chunk(g, table_q.ends[k], table_r.ends[l], geometry)
    bad, weights = _pair_grid(bad, w, table_q.num_pairs, table_r.num_pairs, flat)
    return _best_entries(*_best_ref_pairs(bad, table_r.owned), weights, table_q.owned)


def _pair_grid(bad: Tensor, w: Tensor, kq: int, kr: int, flat: Tensor | None) -> tuple[Tensor, Tensor]:
    """Searched combinations -> ``(K_q, K_r)`` badness and ``(4, K_q, K_r)`` weights."""
    if flat is None:
        return bad.view(kq, kr), w.view(4, kq, kr)
    # Fill both (k, l) and (l, k) (roles swapped) in one scatter each; the
    # diagonal (a pair against itself, same class) gets finite defaults.
    full = bad.new_full((kq * kr,), float("inf")).index_put((flat,), torch.cat((bad, bad)))
    weights = bad.new_zeros(4, kq * kr)
    weights[0::2] = 1  # the first ends, a valid corner
    weights[:, flat] = torch.cat((w, w[[2, 3, 0, 1]]), 1)
    return full.view(kq, kr), weights.view(4, kq, kr)


def _best_ref_pairs(bad: Tensor, owned_r: Tensor) -> tuple[Tensor, Tensor]:
    """For rows of query pairs: best value and reference pair over the pairs each
    reference sample owns, ``(rows, n_r)`` each."""
    val, slot = bad[:, owned_r].min(-1)  # (rows, n_r, deg_r) -> (rows, n_r)
    cols = torch.arange(owned_r.shape[0], device=owned_r.device)
    return val, owned_r[cols, slot]


def _best_entries(best_val: Tensor, best_ref: Tensor, weights: Tensor, owned_q: Tensor) -> tuple[Winners, PairWeights]:
    """Then over the pairs each query sample owns: the winner of each entry."""
    _, slot = best_val[owned_q].min(1)  # (n_q, deg_q, n_r) -> (n_q, n_r)
    query_pair = owned_q.gather(1, slot)
    ref_pair = best_ref.gather(0, query_pair)
    w = weights.reshape(4, -1)[:, query_pair * weights.shape[2] + ref_pair]
    return Winners(query_pair, ref_pair), PairWeights(*w.unbind(0))


def measure_winners(
    g: GramBlocks, table_q: PairTable, table_r: PairTable, winners: Winners,
    weights: PairWeights, geometry: Geometry, compile: bool = False,
    entries: Tensor | None = None,
) -> Tensor:
    """Measure (squared distance, cosine or dot) of each entry's winner, with gradient.

    ``entries``: flat indices ``i * n_r + j`` of the entries to measure
    (shape ``(M,)`` out); ``None``: every entry (``(n_q, n_r)`` out).
    """
    if entries is not None:
        # Two flat index_selects rather than six 2-D gathers.
        flat = entries
        winners = Winners(*torch.stack(tuple(winners)).flatten(1).index_select(1, flat))
        weights = PairWeights(*torch.stack(tuple(weights)).flatten(1).index_select(1, flat))
    ends_q = table_q.ends[winners.query_pair]  # (..., 2)
    ends_r = table_r.ends[winners.ref_pair]
    return maybe_compiled(_measure, compile)(g, ends_q, ends_r, weights, geometry)


def _measure(g: GramBlocks, ends_q: Tensor, ends_r: Tensor, weights: PairWeights, geometry: Geometry) -> Tensor:
    return measure_at(_pair_quad_gram(g, ends_q, ends_r), weights, geometry)
