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
   the winners for the backward pass (and, with a single chunk, its inner
   products and weights), not the temporaries; for one set it measures only
   the upper triangle.

Peak extra memory: about ``40 * chunk_elements`` values for the temporaries
of one block, plus ``O(n_q * n_r)`` for the entries; see
:func:`memory_bound_bytes`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .functional import Geometry, PairWeights, QuadGram, best_candidate, candidate_weights, measure_at
from .functional.compiled import maybe_compiled
from .functional.gram import constant
from .functional.loop import CANDIDATE_EXCHANGE, CANDIDATE_SWAPS, measure_partials
from .pairs import PairTable

#: Pair combinations searched at once (one block). The arc search keeps about
#: 40 temporaries of that size, so 2**18 combinations stay near 40 MB in float32.
DEFAULT_CHUNK_ELEMENTS = 2**18
#: On a GPU each operation is a kernel launch: fewer, larger blocks (about 2.7 GB).
DEFAULT_GPU_CHUNK_ELEMENTS = 2**24

#: Live temporaries of the search and measure passes per element of a block:
#: the 9 candidates of a block and their inputs. Measured about 20 (peak
#: resident memory of ``search_winners``, B = 1024, blocks of 2**18 and 2**20
#: combinations: 25 MB and 81 MB); 40 leaves headroom.
_TEMPORARIES_PER_ELEMENT = 40


def memory_bound_bytes(n_q: int, n_r: int, chunk_elements: int, itemsize: int = 4) -> int:
    """Documented bound on the extra memory of one LoOp matrix (search + measure).

    ``40 * chunk_elements`` values for the temporaries of one block or row
    chunk, and per entry: the winners (two int32 partners, a uint8 candidate),
    the Gram block, the negative mask, the measure and the few matrices that
    turn it into the loss's units (with what autograd keeps of them).
    """
    return _TEMPORARIES_PER_ELEMENT * chunk_elements * itemsize + n_q * n_r * (9 + 1 + 8 * itemsize)


class GramBlocks(NamedTuple):
    """Inner products of a query set (n_q) and a reference set (n_r)."""

    qq: Tensor  # (n_q, n_q)
    rr: Tensor  # (n_r, n_r)
    qr: Tensor  # (n_q, n_r)

    @property
    def same_set(self) -> bool:
        return self.qq is self.qr and self.rr is self.qr


class Winners(NamedTuple):
    """Optimal pair combination of every entry (i, j), each ``(n_q, n_r)``: the
    partner p of i and q of j whose pairs (i, p) and (j, q) realise it, and which
    candidate of the geometry (in that orientation) is optimal."""

    partner_q: Tensor
    partner_r: Tensor
    candidate: Tensor

    def compact(self) -> "Winners":
        """Stored small (int32 partners, uint8 candidate): a third of int64's memory."""
        return Winners(self.partner_q.to(torch.int32), self.partner_r.to(torch.int32),
                       self.candidate.to(torch.uint8))



def gram_blocks(query: Tensor, ref: Tensor, same_set: bool, qr: Tensor | None = None) -> GramBlocks:
    """One matrix product per block (a single one when query is reference);
    ``qr``: the cross block if it is already computed."""
    qr = query @ ref.T if qr is None else qr
    if same_set:
        return GramBlocks(qr, qr, qr)
    return GramBlocks(query @ query.T, ref @ ref.T, qr)


# -- blocks ---------------------------------------------------------------------
class Group(NamedTuple):
    """A contiguous range of one set's pairs and the samples that own them.

    samples: ``(s,)`` sample indices, or ``None`` for every sample of the set.
    slots:   ``(s, deg)`` each sample's owned pairs as offsets in the range;
             ``stop - start`` (a padding row/column) for pairs outside it.
    partner, flipped: ``(s, deg)`` rows of the table's (see :class:`PairTable`).
    whole:   every pair of these samples lies in the range (no padding).
    label:   the class of the range when it holds a single class, else ``None``.
    """

    start: int
    stop: int
    samples: Tensor | None
    slots: Tensor
    partner: Tensor
    flipped: Tensor
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
        return [Group(0, table.num_pairs, None, table.owned, table.partner, table.flipped, True, None)]
    pair_labels = table.labels.tolist()
    return [_group(table, a, b, pair_labels[a] if k == 1 else None, split) for a, b, k, split in spans]


def _group(table: PairTable, start: int, stop: int, label: int | None, split: bool) -> Group:
    samples = torch.unique(table.ends[start:stop].reshape(-1))
    slots = table.owned[samples] - start
    outside = (slots < 0) | (slots >= stop - start)
    whole = not split and not bool(outside.any())
    return Group(start, stop, samples, slots.masked_fill(outside, stop - start),
                 table.partner[samples], table.flipped[samples], whole, label)


class SearchPlan(NamedTuple):
    """The blocks of a search: row groups (query pairs) x column groups.

    symmetric: one set cut alike on both sides; only the blocks on and above
    the diagonal are searched, each also serving its mirror image.
    """

    rows: list[Group]
    cols: list[Group]
    symmetric: bool = False


def search_plan(table_q: PairTable, table_r: PairTable, chunk_elements: int) -> SearchPlan:
    """Blocks of at most ``chunk_elements`` combinations (at least one pair each way)."""
    kq, kr = table_q.num_pairs, table_r.num_pairs
    if table_q is table_r and kq * kr > chunk_elements:
        # LoOp is symmetric: cut both sides alike and search half the blocks.
        groups = class_groups(table_q, max(1, int(chunk_elements**0.5)))
        return SearchPlan(groups, groups, len(groups) > 1)
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
    """Best candidate score ``(R, C)`` (larger is better, see ``best_candidate``)
    of R query pairs against C reference pairs, and which candidate it is."""
    R, C = len(ends_q), len(ends_r)
    rows = torch.cat((ends_q[:, 0], ends_q[:, 1]))
    cols = torch.cat((ends_r[:, 0], ends_r[:, 1]))
    cross = g.qr.index_select(0, rows).index_select(1, cols)  # (2R, 2C): one gather for all
    dq, dr = g.qq.diagonal(), g.rr.diagonal()
    q = QuadGram(
        dq[ends_q[:, 0]].unsqueeze(1), _pair_gram(g.qq, ends_q).unsqueeze(1), dq[ends_q[:, 1]].unsqueeze(1),
        dr[ends_r[:, 0]].unsqueeze(0), _pair_gram(g.rr, ends_r).unsqueeze(0), dr[ends_r[:, 1]].unsqueeze(0),
        cross[:R, :C], cross[:R, C:], cross[R:, :C], cross[R:, C:],
    )
    return best_candidate(q, geometry)


def _pair_gram(gram: Tensor, ends: Tensor) -> Tensor:
    return gram.reshape(-1).take(ends[:, 0] * gram.shape[1] + ends[:, 1])


def _select(x: Tensor, dim: int, index: Tensor) -> Tensor:
    """``x`` indexed along ``dim`` by an index of any shape (a flat index_select:
    on the CPU several times faster than advanced indexing)."""
    out = x.index_select(dim, index.reshape(-1))
    return out.view(*x.shape[:dim], *index.shape, *x.shape[dim + 1:])


def _reduce_block(scores: Tensor, which: Tensor, row: Group, col: Group, swaps: Tensor) -> tuple[Tensor, Winners]:
    """Block scores and candidates ``(R, C)`` -> per (row sample, column sample)
    the best score and its winner, each ``(s_q, s_r)``."""
    width = scores.shape[1]
    if not col.whole:  # padding column for pairs outside the block
        scores = torch.cat((scores, scores.new_full((scores.shape[0], 1), float("-inf"))), 1)
    val, r_slot = _select(scores, 1, col.slots).max(2)  # (R, s_r, deg_r) -> (R, s_r)
    if not row.whole:
        val = torch.cat((val, val.new_full((1, val.shape[1]), float("-inf"))), 0)
    val, q_slot = _select(val, 0, row.slots).max(1)  # (s_q, deg_q, s_r) -> (s_q, s_r)
    q_local = row.slots.gather(1, q_slot).clamp_max(row.stop - row.start - 1)
    r_slot = r_slot.gather(0, q_local)  # the slot of j that won for that pair of i
    r_local = col.slots.T.gather(0, r_slot).clamp_max(width - 1)
    # The block's candidate index is for the pairs as stored; turn it to (i, p | j, q).
    swap = row.flipped.gather(1, q_slot) * 2 + col.flipped.T.gather(0, r_slot)
    stored = which.reshape(-1).take(q_local * width + r_local)
    winners = Winners(row.partner.gather(1, q_slot), col.partner.T.gather(0, r_slot),
                      swaps.view(-1).take(swap * swaps.shape[1] + stored))
    return val, winners


def _swap_table(geometry: Geometry, device) -> Tensor:
    """``(4, k)``: candidate index after swapping neither pair, the second, the
    first, or both (row ``2 * first + second``)."""
    first, second = CANDIDATE_SWAPS[geometry]
    k = len(first)
    rows = [list(range(k)), list(second), list(first), [second[first[c]] for c in range(k)]]
    return constant(tuple(map(tuple, rows)), torch.long, device)


@torch.no_grad()
def search_winners(g: GramBlocks, table_q: PairTable, table_r: PairTable, geometry: Geometry,
                   plan: SearchPlan, compile: bool = False) -> Winners:
    """Best pair combination of every entry (i, j) of different classes (entries
    of one class get a valid but meaningless winner)."""
    g = GramBlocks(*(x.detach() for x in g))
    swaps = _swap_table(geometry, g.qr.device)
    n_q, n_r = table_q.owned.shape[0], table_r.owned.shape[0]
    block_scores = maybe_compiled(_block_scores, compile)
    if plan.rows[0].samples is None and plan.cols[0].samples is None:  # one block: no merging
        scores, which = block_scores(g, table_q.ends, table_r.ends, geometry)
        return _reduce_block(scores, which, plan.rows[0], plan.cols[0], swaps)[1].compact()
    best = g.qr.new_full((n_q, n_r), float("-inf"))
    # Winners of entries no block reaches (one class): the sample itself, corner 0.
    out = Winners(torch.arange(n_q, device=g.qr.device)[:, None].repeat(1, n_r),
                  torch.arange(n_r, device=g.qr.device)[None, :].repeat(n_q, 1),
                  torch.zeros(n_q, n_r, dtype=torch.long, device=g.qr.device)).compact()
    exchange = constant(CANDIDATE_EXCHANGE[geometry], torch.long, g.qr.device)

    def merge(row: Group, col: Group, scores: Tensor, which: Tensor) -> None:
        val, new = _reduce_block(scores, which, row, col, swaps)
        at = (_samples(row, n_q, g.qr.device)[:, None], _samples(col, n_r, g.qr.device)[None, :])
        better = val > best[at]
        best[at] = torch.where(better, val, best[at])
        for o, n in zip(out, new):
            o[at] = torch.where(better, n.to(o.dtype), o[at])

    for r, row in enumerate(plan.rows):
        for c, col in enumerate(plan.cols):
            if (plan.symmetric and c < r) or (row.label is not None and row.label == col.label):
                continue  # the mirror of a searched block, or one class on both sides
            scores, which = block_scores(g, table_q.ends[row.start:row.stop], table_r.ends[col.start:col.stop], geometry)
            merge(row, col, scores, which)
            if plan.symmetric and c > r:
                merge(col, row, scores.T, exchange.take(which).T)
    return out


def _samples(group: Group, n: int, device) -> Tensor:
    return torch.arange(n, device=device) if group.samples is None else group.samples


# -- pass 2: measure -----------------------------------------------------------------
def _entry_chunks(n_q: int, n_r: int, upper: bool, chunk_elements: int) -> list[tuple[int, int]]:
    total = n_q * (n_q - 1) // 2 if upper else n_q * n_r
    return [(a, min(a + chunk_elements, total)) for a in range(0, total, max(1, chunk_elements))]


def _entries(a: int, b: int, n_q: int, n_r: int, upper: bool, device) -> tuple[Tensor, Tensor]:
    """Rows and columns of the entries ``a:b`` of the matrix, row by row; with
    ``upper``, of its strict upper triangle (i < j), in closed form."""
    k = torch.arange(a, b, device=device)
    if not upper:
        return k // n_r, k % n_r
    n = n_q
    kf = k.to(torch.float64)
    i = (n - 2 - torch.floor(torch.sqrt(-8 * kf + 4 * n * (n - 1) - 7) / 2 - 0.5)).long()
    j = k + i + 1 - n * (n - 1) // 2 + (n - i) * (n - i - 1) // 2
    return i, j


def _entry_quad_gram(g: GramBlocks, i: Tensor, j: Tensor, p: Tensor, q: Tensor) -> QuadGram:
    """QuadGram of (x_i, x_p | x_j, x_q) for entries given as flat index tensors."""
    n_q, n_r = g.qr.shape
    dq, dr = g.qq.diagonal(), g.rr.diagonal()
    return QuadGram(
        dq.take(i), g.qq.take(i * n_q + p), dq.take(p),
        dr.take(j), g.rr.take(j * n_r + q), dr.take(q),
        g.qr.take(i * n_r + j), g.qr.take(i * n_r + q), g.qr.take(p * n_r + j), g.qr.take(p * n_r + q),
    )


def _add_partials(d: GramBlocks, i: Tensor, j: Tensor, p: Tensor, q: Tensor, parts: QuadGram) -> None:
    """Add the entries' gradient to the Gram blocks: the transpose of each
    ``take`` of :func:`_entry_quad_gram`, one ``index_add_`` per block."""
    n_q, n_r = d.qr.shape
    cross = [(i * n_r + j, parts.g13), (i * n_r + q, parts.g14), (p * n_r + j, parts.g23), (p * n_r + q, parts.g24)]
    first = [(i * (n_q + 1), parts.g11), (i * n_q + p, parts.g12), (p * (n_q + 1), parts.g22)]
    second = [(j * (n_r + 1), parts.g33), (j * n_r + q, parts.g34), (q * (n_r + 1), parts.g44)]
    blocks = [(d.qr, cross + first + second)] if d.same_set else [(d.qr, cross), (d.qq, first), (d.rr, second)]
    for target, pieces in blocks:
        pieces = [(at, v) for at, v in pieces if v is not None]
        if pieces:
            target.view(-1).index_add_(0, torch.cat([at for at, _ in pieces]), torch.cat([v for _, v in pieces]))


class _MeasureAtOptimum(torch.autograd.Function):
    """Measure of every entry at its winner's optimal weights; the gradient is
    that of the measure at the fixed weights (Danskin), chunk by chunk, so that
    of all entries only the winners are kept for the backward pass (and, when
    there is a single chunk, its inner products and weights). For one set only
    the upper triangle is measured: the matrix is symmetric."""

    @staticmethod
    def forward(ctx, qq, rr, qr, winners, geometry, chunk_elements, compile):
        g = GramBlocks(qq, qq, qq) if (qq is rr and rr is qr) else GramBlocks(qq, rr, qr)
        n_q, n_r = winners.partner_q.shape
        upper = g.same_set
        chunks = _entry_chunks(n_q, n_r, upper, chunk_elements)
        measure = maybe_compiled(_measure_entries, compile)
        out = qr.new_zeros(n_q * n_r)
        for a, b in chunks:
            i, j = _entries(a, b, n_q, n_r, upper, qr.device)
            value, w, q = measure(g, winners, i, j, geometry)
            out[i * n_r + j] = value
            if upper:
                out[j * n_r + i] = value
        ctx.upper, ctx.geometry, ctx.chunks, ctx.winners = upper, geometry, chunks, winners
        ctx.compile = compile
        # One chunk: keep its inner products and weights; several: recompute
        # them chunk by chunk in the backward pass (memory stays bounded).
        ctx.single = (q, w) if len(chunks) == 1 else None
        ctx.save_for_backward(qq, rr, qr)
        return out.view(n_q, n_r)

    @staticmethod
    def backward(ctx, grad_out):
        qq, rr, qr = ctx.saved_tensors
        upper = ctx.upper
        g = GramBlocks(qq, qq, qq) if upper else GramBlocks(qq, rr, qr)
        if upper:
            zero = torch.zeros_like(qr)
            d = GramBlocks(zero, zero, zero)
        else:
            d = GramBlocks(torch.zeros_like(qq), torch.zeros_like(rr), torch.zeros_like(qr))
        n_q, n_r = qr.shape
        grad_flat = grad_out.reshape(-1)
        partials = maybe_compiled(_partials_entries, ctx.compile)
        for a, b in ctx.chunks:
            i, j = _entries(a, b, n_q, n_r, upper, qr.device)
            p, q_ = _partners(ctx.winners, i * n_r + j)
            if ctx.single is not None:
                quad, weights = ctx.single
            else:
                quad = _entry_quad_gram(g, i, j, p, q_)
                weights = candidate_weights(quad, _candidates(ctx.winners, i * n_r + j), ctx.geometry)
            grad = grad_flat.take(i * n_r + j)
            if upper:  # the value stands at (i, j) and (j, i)
                grad = grad + grad_flat.take(j * n_r + i)
            _add_partials(d, i, j, p, q_, partials(quad, weights, grad, ctx.geometry))
        if upper:  # one matrix passed three times: give it the whole gradient once
            return None, None, d.qr, None, None, None, None
        return d.qq, d.rr, d.qr, None, None, None, None


def _partners(w: Winners, at: Tensor) -> tuple[Tensor, Tensor]:
    return w.partner_q.reshape(-1).take(at).long(), w.partner_r.reshape(-1).take(at).long()


def _candidates(w: Winners, at: Tensor) -> Tensor:
    return w.candidate.reshape(-1).take(at).long()


def _measure_entries(g: GramBlocks, winners: Winners, i: Tensor, j: Tensor, geometry: Geometry):
    at = i * g.qr.shape[1] + j
    q = _entry_quad_gram(g, i, j, *_partners(winners, at))
    w = candidate_weights(q, _candidates(winners, at), geometry)
    return measure_at(q, w, geometry), w, q


def _partials_entries(q: QuadGram, w: PairWeights, grad: Tensor, geometry: Geometry) -> QuadGram:
    return QuadGram(*(None if x is None else x * grad for x in measure_partials(q, w, geometry)))


def measure_winners(g: GramBlocks, winners: Winners, geometry: Geometry,
                    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, compile: bool = False) -> Tensor:
    """``(n_q, n_r)`` measure (squared distance, cosine or dot product) of each
    entry's winner, with gradient to the Gram blocks (for one set the diagonal,
    a sample against itself, is 0)."""
    return _MeasureAtOptimum.apply(g.qq, g.rr, g.qr, winners, geometry, chunk_elements, compile)
