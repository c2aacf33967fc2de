"""LoOp values for every (query, reference) entry of a batch.

Entry (i, j) is the optimum over the pairs owned by i (query side) and by j
(reference side). Two passes, each bounded in memory by ``chunk_elements``:

1. **Search** (no gradient): the closed-form optimum of every combination of a
   query pair and a reference pair of *different* classes, block by block
   (blocks follow the classes, so same-class combinations, which cannot give a
   negative entry, are not computed), reduced at once to the best combination
   of each entry (:class:`Winners`).
2. **Measure**: for each entry's winning combination, the optimal weights
   again and the measure (squared distance, cosine or dot product) at those
   fixed weights, with gradient (Danskin). An autograd function keeps only
   the winners and weights for the backward pass, not the temporaries.

Peak extra memory: about ``40 * chunk_elements`` floats for the search
temporaries of one block, plus ``O(n_q * n_r)`` for the entries (winners,
weights, result); see :func:`memory_bound_bytes`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .functional import Geometry, PairWeights, QuadGram, candidate_scores, candidate_weights, measure_at
from .pairs import PairTable

#: Pair combinations searched at once (one block). The arc search keeps about
#: 40 temporaries of that size, so 2**18 combinations stay near 40 MB in float32.
DEFAULT_CHUNK_ELEMENTS = 2**18

#: Live temporaries of the search and measure passes per searched element;
#: measured with ``benchmarks/bench_loop.py --memory`` (see the README).
_TEMPORARIES_PER_ELEMENT = 40


def memory_bound_bytes(n_q: int, n_r: int, chunk_elements: int, itemsize: int = 4) -> int:
    """Documented bound on the extra memory of one LoOp matrix (search + measure).

    ``40 * chunk_elements`` values for the temporaries of one block, and per
    entry: two int64 winner indices, four weights, the result and its mask.
    """
    return _TEMPORARIES_PER_ELEMENT * chunk_elements * itemsize + n_q * n_r * (16 + 5 * itemsize + 1)


class GramBlocks(NamedTuple):
    """Inner products of a query set (n_q) and a reference set (n_r)."""

    qq: Tensor  # (n_q, n_q)
    rr: Tensor  # (n_r, n_r)
    qr: Tensor  # (n_q, n_r)

    @property
    def same_set(self) -> bool:
        return self.qq is self.qr and self.rr is self.qr


class Winners(NamedTuple):
    """Optimal pair combination of every entry, each ``(n_q, n_r)``: its query
    pair, its reference pair and which candidate of the geometry is optimal."""

    query_pair: Tensor
    ref_pair: Tensor
    candidate: Tensor


def gram_blocks(query: Tensor, ref: Tensor, same_set: bool) -> GramBlocks:
    """One matrix product per block (a single one when query is reference)."""
    qr = query @ ref.T
    if same_set:
        return GramBlocks(qr, qr, qr)
    return GramBlocks(query @ query.T, ref @ ref.T, qr)


# -- blocks ---------------------------------------------------------------------
class Group(NamedTuple):
    """A contiguous range of one set's pairs and the samples that own them.

    samples: ``(s,)`` sample indices, or ``None`` for every sample of the set.
    slots:   ``(s, deg)`` each sample's owned pairs as offsets in the range;
             ``stop - start`` (a padding row/column) for pairs outside it.
    whole:   every pair of these samples lies in the range (no padding).
    label:   the class of the range when it holds a single class, else ``None``.
    """

    start: int
    stop: int
    samples: Tensor | None
    slots: Tensor
    whole: bool
    label: int | None


def class_groups(table: PairTable, limit: int) -> list[Group]:
    """Cut a table's pairs into ranges of at most ``limit`` pairs along class
    boundaries: small classes share a range, a class of more than ``limit / 4``
    pairs gets ranges of its own (split if needed), so that the search can
    skip a block whose two ranges hold the same single class."""
    limit = max(1, limit)
    spans: list[tuple[int, int, int, bool]] = []  # (start, stop, classes, split)
    start = stop = classes = 0
    for run in table.runs:
        if run > limit // 4:
            if classes:
                spans.append((start, stop, classes, False))
            spans += [(a, min(a + limit, stop + run), 1, run > limit) for a in range(stop, stop + run, limit)]
            start = stop = stop + run
            classes = 0
            continue
        if classes and stop + run - start > limit:
            spans.append((start, stop, classes, False))
            start, classes = stop, 0
        stop += run
        classes += 1
    if classes:
        spans.append((start, stop, classes, False))
    if len(spans) == 1:
        return [Group(0, table.num_pairs, None, table.owned, True, None)]
    pair_labels = table.labels.tolist()
    return [_group(table, a, b, pair_labels[a] if k == 1 else None, split) for a, b, k, split in spans]


def _group(table: PairTable, start: int, stop: int, label: int | None, split: bool) -> Group:
    samples = torch.unique(table.ends[start:stop].reshape(-1))
    slots = table.owned[samples] - start
    outside = (slots < 0) | (slots >= stop - start)
    whole = not split and not bool(outside.any())
    return Group(start, stop, samples, slots.masked_fill(outside, stop - start), whole, label)


class SearchPlan(NamedTuple):
    """The blocks of a search: row groups (query pairs) x column groups."""

    rows: list[Group]
    cols: list[Group]


def search_plan(table_q: PairTable, table_r: PairTable, chunk_elements: int) -> SearchPlan:
    """Blocks of at most ``chunk_elements`` combinations (at least one pair each way)."""
    kq, kr = table_q.num_pairs, table_r.num_pairs
    if kr * min(kq, 16) <= chunk_elements:
        col_limit = kr  # full rows of the grid: fewest blocks
    else:
        col_limit = max(1, int(chunk_elements**0.5))
    cols = class_groups(table_r, col_limit)
    width = max(g.stop - g.start for g in cols)
    rows = class_groups(table_q, max(1, chunk_elements // width))
    return SearchPlan(rows, cols)


# -- pass 1: search ----------------------------------------------------------------
def _block_scores(g: GramBlocks, ends_q: Tensor, ends_r: Tensor, geometry: Geometry) -> tuple[Tensor, Tensor]:
    """Best candidate score ``(R, C)`` (larger is better, see ``candidate_scores``)
    of R query pairs against C reference pairs, and which candidate it is."""
    R, C = len(ends_q), len(ends_r)
    rows = torch.cat((ends_q[:, 0], ends_q[:, 1]))
    cols = torch.cat((ends_r[:, 0], ends_r[:, 1]))
    cross = g.qr.index_select(0, rows).index_select(1, cols)  # (2R, 2C): one gather for all
    dq, dr = g.qq.diagonal(), g.rr.diagonal()
    q = QuadGram(
        dq[ends_q[:, 0]].unsqueeze(1), g.qq[ends_q[:, 0], ends_q[:, 1]].unsqueeze(1), dq[ends_q[:, 1]].unsqueeze(1),
        dr[ends_r[:, 0]].unsqueeze(0), g.rr[ends_r[:, 0], ends_r[:, 1]].unsqueeze(0), dr[ends_r[:, 1]].unsqueeze(0),
        cross[:R, :C], cross[:R, C:], cross[R:, :C], cross[R:, C:],
    )
    return candidate_scores(q, geometry).max(0)


def _reduce_block(scores: Tensor, row: Group, col: Group) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Block scores ``(R, C)`` -> per (row sample, column sample) the best score,
    its query pair and reference pair, each ``(s_q, s_r)``, and the flat index
    of that combination in the block."""
    width = scores.shape[1]
    if not col.whole:  # padding column for pairs outside the block
        scores = torch.cat((scores, scores.new_full((scores.shape[0], 1), float("-inf"))), 1)
    val, ref_slot = scores[:, col.slots].max(-1)  # (R, s_r, deg_r) -> (R, s_r)
    if not row.whole:
        val = torch.cat((val, val.new_full((1, val.shape[1]), float("-inf"))), 0)
    val, q_slot = val[row.slots].max(1)  # (s_q, deg_q, s_r) -> (s_q, s_r)
    q_local = row.slots.gather(1, q_slot).clamp_max(row.stop - row.start - 1)
    r_slot = ref_slot.gather(0, q_local)  # the reference slot that won for that query pair
    r_local = col.slots.T.gather(0, r_slot).clamp_max(width - 1)
    return val, q_local + row.start, r_local + col.start, q_local * width + r_local


@torch.no_grad()
def search_winners(g: GramBlocks, table_q: PairTable, table_r: PairTable, geometry: Geometry,
                   plan: SearchPlan) -> Winners:
    """Best (query pair, reference pair) of every entry (i, j) of different classes
    (entries of one class get an arbitrary valid combination)."""
    g = GramBlocks(*(x.detach() for x in g))
    n_q, n_r = table_q.owned.shape[0], table_r.owned.shape[0]
    if len(plan.rows) == 1 and len(plan.cols) == 1 and plan.rows[0].samples is None and plan.cols[0].samples is None:
        scores, which = _block_scores(g, table_q.ends, table_r.ends, geometry)
        _, qp, rp, flat = _reduce_block(scores, plan.rows[0], plan.cols[0])
        return Winners(qp, rp, which.view(-1).take(flat))
    best = g.qr.new_full((n_q, n_r), float("-inf"))
    out = [torch.zeros(n_q, n_r, dtype=torch.long, device=g.qr.device) for _ in range(3)]
    for row in plan.rows:
        i = _samples(row, n_q, g.qr.device)
        for col in plan.cols:
            if row.label is not None and row.label == col.label:
                continue  # one class on both sides: no negative entry here
            scores, which = _block_scores(g, table_q.ends[row.start:row.stop], table_r.ends[col.start:col.stop], geometry)
            val, q_pair, r_pair, flat = _reduce_block(scores, row, col)
            at = (i[:, None], _samples(col, n_r, g.qr.device)[None, :])
            better = val > best[at]
            best[at] = torch.where(better, val, best[at])
            for o, new in zip(out, (q_pair, r_pair, which.view(-1).take(flat))):
                o[at] = torch.where(better, new, o[at])
    return Winners(*out)


def _samples(group: Group, n: int, device) -> Tensor:
    return torch.arange(n, device=device) if group.samples is None else group.samples


# -- pass 2: measure -----------------------------------------------------------------
def _winner_quad_gram(g: GramBlocks, table_q: PairTable, table_r: PairTable, qp: Tensor, rp: Tensor) -> QuadGram:
    """QuadGram of the winning combinations ``qp``, ``rp`` (any common shape)."""
    eq, er = table_q.ends[qp], table_r.ends[rp]  # (..., 2)
    a, b, c, d = eq[..., 0], eq[..., 1], er[..., 0], er[..., 1]

    def take(mat: Tensor, rows: tuple, cols: tuple) -> list[Tensor]:
        flat = torch.stack(rows) * mat.shape[1] + torch.stack(cols)
        return list(mat.reshape(-1).take(flat).unbind(0))

    if g.same_set:
        return QuadGram(*take(g.qr, (a, a, b, c, c, d, a, a, b, b), (a, b, b, c, d, d, c, d, c, d)))
    return QuadGram(*take(g.qq, (a, a, b), (a, b, b)), *take(g.rr, (c, c, d), (c, d, d)),
                    *take(g.qr, (a, a, b, b), (c, d, c, d)))


def _row_chunks(n_q: int, n_r: int, chunk_elements: int):
    rows = max(1, chunk_elements // max(n_r, 1))
    return [(a, min(a + rows, n_q)) for a in range(0, n_q, rows)]


class _MeasureAtOptimum(torch.autograd.Function):
    """Measure of every entry at its winner's optimal weights; the gradient is
    that of the measure at the fixed weights (Danskin), computed chunk by chunk
    so that no temporaries of all entries are kept for the backward pass."""

    @staticmethod
    def forward(ctx, qq, rr, qr, table_q, table_r, winners, geometry, chunk_elements):
        g = GramBlocks(qq, qq, qq) if (qq is rr and rr is qr) else GramBlocks(qq, rr, qr)
        n_q, n_r = winners.query_pair.shape
        out = qr.new_empty(n_q, n_r)
        weights = qr.new_empty(4, n_q, n_r)
        for a, b in _row_chunks(n_q, n_r, chunk_elements):
            q = _winner_quad_gram(g, table_q, table_r, winners.query_pair[a:b], winners.ref_pair[a:b])
            w = candidate_weights(q, winners.candidate[a:b], geometry)
            out[a:b] = measure_at(q, w, geometry)
            weights[:, a:b] = torch.stack(torch.broadcast_tensors(*w))
        ctx.same_set = g.same_set
        ctx.meta = (table_q, table_r, geometry, chunk_elements)
        ctx.save_for_backward(qq, rr, qr, winners.query_pair, winners.ref_pair, weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qq, rr, qr, qp, rp, weights = ctx.saved_tensors
        table_q, table_r, geometry, chunk_elements = ctx.meta
        g = GramBlocks(qq, qq, qq) if ctx.same_set else GramBlocks(qq, rr, qr)
        d_qq, d_rr, d_qr = torch.zeros_like(qq), torch.zeros_like(rr), torch.zeros_like(qr)
        n_q, n_r = qp.shape
        for a, b in _row_chunks(n_q, n_r, chunk_elements):
            eq, er = table_q.ends[qp[a:b]], table_r.ends[rp[a:b]]
            i1, i2, j1, j2 = eq[..., 0], eq[..., 1], er[..., 0], er[..., 1]
            with torch.enable_grad():
                q = QuadGram(*(x.detach().requires_grad_() for x in _winner_quad_gram(g, table_q, table_r, qp[a:b], rp[a:b])))
                value = measure_at(q, PairWeights(*weights[:, a:b]), geometry)
                parts = torch.autograd.grad(value, q, grad_out[a:b], allow_unused=True)
            parts = [torch.zeros_like(value) if p is None else p for p in parts]
            _scatter(d_qq, (i1, i1, i2), (i1, i2, i2), parts[0:3])
            _scatter(d_rr, (j1, j1, j2), (j1, j2, j2), parts[3:6])
            _scatter(d_qr, (i1, i1, i2, i2), (j1, j2, j1, j2), parts[6:10])
        if ctx.same_set:  # one matrix passed three times: give it all the gradient once
            d_qr += d_qq + d_rr
            return None, None, d_qr, None, None, None, None, None
        return d_qq, d_rr, d_qr, None, None, None, None, None


def _scatter(target: Tensor, rows: tuple, cols: tuple, values) -> None:
    flat = torch.stack(rows) * target.shape[1] + torch.stack(cols)
    target.view(-1).index_add_(0, flat.reshape(-1), torch.stack(values).reshape(-1))


def measure_winners(g: GramBlocks, table_q: PairTable, table_r: PairTable, winners: Winners,
                    geometry: Geometry, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """``(n_q, n_r)`` measure (squared distance, cosine or dot product) of each
    entry's winner, with gradient to the Gram blocks."""
    return _MeasureAtOptimum.apply(g.qq, g.rr, g.qr, table_q, table_r, winners, geometry, chunk_elements)
