"""LoOp values for every (query, reference) entry of a batch.

Entry (i, j) is the optimum over the pairs owned by i (query side) and by j
(reference side). Two passes, each bounded in memory by ``chunk_elements``:

1. **Search** (no gradient): the closed-form optimum *value* of every
   combination of a query pair and a reference pair of *different* classes,
   block by block (blocks follow the classes, so same-class combinations,
   which cannot give a negative entry, are not computed), reduced at once to
   the best value of each entry and the combination that gives it
   (:class:`Winners`). Which candidate wins and where is not tracked: that
   would cost more passes over every combination than finding it again for
   the winners alone.
2. **Gradient** (backward only): for each winning combination that receives
   a gradient (on the CPU the entries' gradients are summed per combination
   first: entries share winners), its optimum is found again (which
   candidate, and the optimal weights), and the partial derivatives of the
   measure at those fixed weights are scattered to the Gram blocks
   (Danskin). An autograd function keeps only the winners.

This is the torch backend; ``backend.py`` runs the same two passes as numba
kernels (``functional/numba_kernels.py``) when the numba backend is chosen.

Peak extra memory: about ``40 * chunk_elements`` values for the temporaries
of one block, a table of at most ``16 * chunk_elements`` combinations, plus
``O(n_q * n_r)`` for the entries; see :func:`memory_bound_bytes`.
"""
from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from . import backend
from .functional import Geometry, QuadGram, best_candidate, candidate_weights
from .functional.compiled import maybe_compiled
from .functional.gram import constant, first_max, flat_positions, scalar, scatter_add, steps, take
from .functional.grid import arc_entry_optimum, arc_grid_values, dot_grid_values, segment_grid_values
from .functional.loop import measure_partials
from .pairs import Combos, PairTable

#: Pair combinations searched at once (one block). The search keeps at most
#: about 40 temporaries of that size, so 2**18 combinations stay near 40 MB in float32.
DEFAULT_CHUNK_ELEMENTS = 2**18
#: On a GPU each operation is a kernel launch: fewer, larger blocks (about 2.7 GB).
DEFAULT_GPU_CHUNK_ELEMENTS = 2**24

#: Live temporaries of the search and gradient passes per element of a block
#: or chunk: the gathered Gram block (4), the coordinates in the other
#: pair's plane (2), the edge and interior candidates and their inputs (about
#: 15); 40 leaves headroom (checked by ``benchmarks/bench_loop.py --only memory``).
_TEMPORARIES_PER_ELEMENT = 40


#: The gradient pass sums the entries' gradients per winning combination in
#: a table of every combination when it holds at most ``_COMBO_WEIGHT *
#: chunk_elements`` values (B = 1024 at 4 per class: 2.4 M combinations) and
#: at most ``_COMBOS_PER_ENTRY`` per entry (up to 5 per class: with more, the
#: table costs more to clear and scan than sharing saves).
_COMBO_WEIGHT = 16
_COMBOS_PER_ENTRY = 4

#: An entry of the gradient pass keeps about four times the temporaries of a
#: combination of the search (its six inner products and their flat
#: positions, the nine candidates and five directions of each pair): chunks of
#: ``chunk_elements / 4`` entries stay within the same bound.
_ENTRY_WEIGHT = 4


def memory_bound_bytes(n_q: int, n_r: int, chunk_elements: int, itemsize: int = 4) -> int:
    """Documented bound on the extra memory of one LoOp matrix (search + gradient).

    ``40 * chunk_elements`` values for the temporaries of one block or row
    chunk; the gradient pass's table of ``16 * chunk_elements`` combinations
    and its non-zero ones (an int64 and an int32 index and a value each); and
    per entry: the winners (an int32 combination and the value; the numba
    search, splitting a few big classes across threads, at most once more),
    the Gram block, the negative mask and the matrices that turn it into the
    loss's units (with what autograd keeps of them).
    """
    table = _COMBO_WEIGHT * chunk_elements * (2 * itemsize + 12)
    return _TEMPORARIES_PER_ELEMENT * chunk_elements * itemsize + table + n_q * n_r * (9 + 1 + 9 * itemsize)


class GramBlocks(NamedTuple):
    """Inner products of a query set (n_q) and a reference set (n_r)."""

    qq: Tensor  # (n_q, n_q)
    rr: Tensor  # (n_r, n_r)
    qr: Tensor  # (n_q, n_r)

    @property
    def same_set(self) -> bool:
        return self.qq is self.qr and self.rr is self.qr


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
    ends:    ``(2, R)`` the ends of its pairs (sample indices of the set): the
             first ends, then the second ends (contiguous).
    local:   ``(2, R)`` the same as positions in ``samples``.
    slots:   ``(deg, s)`` int32, each sample's owned pairs as offsets in the
             range; ``stop - start`` (a padding row/column) for pairs outside it.
    pairs:   ``(deg, s)`` int32, the same pairs as indices in the table. Both
             slot-major: the search selects rows by the slots and reads a
             winner's pair off its flat position.
    whole:   every pair of these samples lies in the range (no padding).
    label:   the class of the range when it holds a single class, else ``None``.
    span:    ``(a, b)`` when the samples are exactly ``a, a + 1, ..., b - 1``
             (their entries are then a slice of the matrix), else ``None``.
    """

    start: int
    stop: int
    samples: Tensor | None
    ends: Tensor
    local: Tensor
    slots: Tensor
    pairs: Tensor
    whole: bool
    label: int | None
    span: tuple[int, int] | None


def _slot_major(owned: Tensor) -> Tensor:
    return owned.T.int().contiguous()


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
        ends = table.ends.T.contiguous()
        owned = _slot_major(table.owned)
        return [Group(0, table.num_pairs, None, ends, ends, owned, owned, True, None, (0, len(table.owned)))]
    pair_labels = table.labels.tolist()
    return [_group(table, a, b, pair_labels[a] if k == 1 else None, split) for a, b, k, split in spans]


def _group(table: PairTable, start: int, stop: int, label: int | None, split: bool) -> Group:
    ends = table.ends[start:stop].T.contiguous()
    samples = torch.unique(ends.reshape(-1))
    slots = table.owned[samples] - start
    outside = (slots < 0) | (slots >= stop - start)
    whole = not split and not bool(outside.any())
    first, last = samples[[0, -1]].tolist()
    span = (first, last + 1) if last - first + 1 == len(samples) else None
    return Group(start, stop, samples, ends, torch.searchsorted(samples, ends),
                 _slot_major(slots.masked_fill(outside, stop - start)), _slot_major(table.owned[samples]), whole,
                 label, span)


class SearchPlan(NamedTuple):
    """The blocks of a search: row groups (query pairs) x column groups.

    symmetric: one set cut alike on both sides; only the blocks on and above
    the diagonal are searched, each also serving its mirror image.
    """

    rows: list[Group]
    cols: list[Group]
    combos: Combos
    symmetric: bool = False

    @property
    def disjoint(self) -> bool:
        """No sample owns pairs in two groups of a side (no class is split), so
        each entry is settled by one block and written, not merged."""
        return all(g.whole for g in self.rows) and all(g.whole for g in self.cols)


def search_plan(table_q: PairTable, table_r: PairTable, chunk_elements: int) -> SearchPlan:
    """Blocks of at most ``chunk_elements`` combinations (at least one pair each way)."""
    kq, kr = table_q.num_pairs, table_r.num_pairs
    combos = Combos.of_tables(table_q, table_r)
    if table_q is table_r and kq * kr > chunk_elements:
        # LoOp is symmetric: cut both sides alike and search half the blocks.
        groups = class_groups(table_q, max(1, int(chunk_elements**0.5)))
        return SearchPlan(groups, groups, combos, len(groups) > 1)
    if kr * min(kq, 16) <= chunk_elements:
        col_limit = kr  # full rows of the grid: fewest blocks
    else:
        col_limit = max(1, int(chunk_elements**0.5))
    cols = class_groups(table_r, col_limit)
    width = max(g.stop - g.start for g in cols)
    rows = class_groups(table_q, max(1, chunk_elements // width))
    return SearchPlan(rows, cols, combos)


# -- pass 1: search ----------------------------------------------------------------
def _block_values(g: GramBlocks, row: Group, col: Group, geometry: Geometry, symmetric: bool = False) -> Tensor:
    """``(R, C)``: the optimum of the R query pairs of ``row`` against the C
    reference pairs of ``col`` as a score, larger is better (the cosine, the
    dot product, or minus the squared distance: see :func:`measure_of_score`).
    ``symmetric``: the two groups are one, within one set."""
    ends_q, ends_r = row.ends, col.ends
    if geometry == "dot":
        rows = ends_q.view(-1)  # first ends, then second ends
        cols = rows if symmetric else ends_r.view(-1)
        return dot_grid_values(g.qr.index_select(0, rows).index_select(1, cols))  # (2R, 2C): one gather for all
    # The groups' samples against each other: ends against the other side's
    # segments or arcs are searched per sample.
    cross = g.qr if row.samples is None else g.qr.index_select(0, row.samples)
    if col.samples is not None:
        cross = cross.index_select(1, col.samples)
    if geometry == "arc":
        if symmetric:
            own = _pair_gram(cross, row.local)
            return arc_grid_values(cross, own, own, True, row.local)
        return arc_grid_values(cross, _pair_gram(g.qq, ends_q), _pair_gram(g.rr, ends_r), False, row.local, col.local)
    dq, dr = g.qq.diagonal(), g.rr.diagonal()
    own_q = torch.stack((dq[ends_q[0]], _pair_gram(g.qq, ends_q), dq[ends_q[1]]))
    own_r = own_q if symmetric else torch.stack((dr[ends_r[0]], _pair_gram(g.rr, ends_r), dr[ends_r[1]]))
    norms_q = dq if row.samples is None else dq[row.samples]
    norms_r = None if symmetric else dr if col.samples is None else dr[col.samples]
    return -segment_grid_values(cross, own_q, own_r, symmetric, row.local, col.local, norms_q, norms_r)


def measure_of_score(score: Tensor, geometry: Geometry) -> Tensor:
    """The measure (cosine, dot product or squared distance) of a search score
    (a cosine that rounding put above 1 is 1)."""
    if geometry == "arc":
        return score.clamp_max(1)
    return -score if geometry == "segment" else score


def _pair_gram(gram: Tensor, ends: Tensor) -> Tensor:
    """``(R,)``: the inner product of each pair's two ends (``ends`` ``(2, R)``)."""
    return take(gram, flat_positions(ends[0], ends[1], gram.shape[1]))


def _select(x: Tensor, dim: int, index: Tensor) -> Tensor:
    """``x`` indexed along ``dim`` by an index of any shape (a flat index_select:
    on the CPU several times faster than advanced indexing)."""
    out = x.index_select(dim, index.view(-1) if index.is_contiguous() else index.reshape(-1))
    return out.view(*x.shape[:dim], *index.shape, *x.shape[dim + 1:])


def _pad(x: Tensor, dim: int, value: float) -> Tensor:
    """``x`` with one more slice of ``value`` at the end of ``dim``."""
    shape = list(x.shape)
    shape[dim] = 1
    return torch.cat((x, x.new_full(shape, value)), dim)


def _reduce_block(scores: Tensor, row: Group, col: Group, combos: Combos, symmetric: bool = False
                  ) -> tuple[Tensor, Tensor]:
    """Block scores ``(R, C)`` -> per (row sample, column sample) the best score
    and the combination of pairs that realises it (see :class:`Combos`), each
    ``(s_q, s_r)``.

    Both reductions run over the leading dimension of a row selection (on the
    CPU, selecting and reducing along an inner dimension costs several times
    more), so the results come out as ``(s_r, s_q)``. ``symmetric`` (a diagonal
    block within one set): they are read as ``(s_q, s_r)`` as they are, since
    entry (j, i) is entry (i, j) with the two pairs swapped (the same
    combination); otherwise transposed.
    """
    if not row.whole:  # a padding row for the pairs outside the block
        scores = _pad(scores, 0, float("-inf"))
    dtype = _index_dtype(2 * scores.shape[0], scores.shape[1])  # positions below: (row samples <= 2 R) x C
    val, q_slot = first_max(_select(scores, 0, row.slots), dtype)  # (deg_q, s_q, C) -> (s_q, C)
    val = val.T.contiguous()
    if not col.whole:
        val = _pad(val, 0, float("-inf"))
    val, r_slot = first_max(_select(val, 0, col.slots), dtype)  # (deg_r, s_r, s_q) -> (s_r, s_q)
    # Winners are read off flat positions (slot * s + sample) with takes: on
    # the CPU a gather costs several times an index_select.
    (s_r, s_q), width = val.shape, q_slot.shape[1]
    at = torch.add(steps(s_r, 1, dtype, val.device).unsqueeze(1), r_slot, alpha=s_r)
    column, pair_r = take(col.slots, at), take(col.pairs, at)  # j's winning pair: in the block, in the table
    if column.dtype != dtype:
        column = column.to(dtype)
    if not col.whole:
        column.clamp_max_(width - 1)
    slot = take(q_slot, column.add_(steps(s_q, width, dtype, val.device)))  # the slot of i's pair that won against it
    pair_q = take(row.pairs, torch.add(steps(s_q, 1, dtype, val.device), slot, alpha=s_q))
    combo = combos.of(pair_q, pair_r)
    return (val, combo) if symmetric else (val.T, combo.T)


class Winners(NamedTuple):
    """The optimum of every entry (i, j), each ``(n_q, n_r)``: the combination
    of a pair of i and a pair of j that realises it (numbered by ``combos``),
    and its measure (cosine, dot product or squared distance; no gradient)."""

    combo: Tensor
    value: Tensor
    combos: Combos

    def partners(self) -> tuple[Tensor, Tensor]:
        """``(p, q)``, each ``(n_q, n_r)``: the partners whose pairs (i, p) and
        (j, q) realise entry (i, j)."""
        return self.combos.partners(self.combo)


@torch.no_grad()
def search_winners(g: GramBlocks, table_q: PairTable, table_r: PairTable, geometry: Geometry,
                   plan: SearchPlan, compile: bool = False) -> Winners:
    """Best pair combination of every entry (i, j) of different classes (entries
    of one class get a valid but meaningless winner)."""
    g = GramBlocks(*([g.qr.detach()] * 3 if g.same_set else (x.detach() for x in g)))
    n_q, n_r = table_q.owned.shape[0], table_r.owned.shape[0]
    combos = plan.combos
    block_values = maybe_compiled(_block_values, compile)
    if plan.rows[0].samples is None and plan.cols[0].samples is None:  # one block: no merging
        symmetric = table_q is table_r and g.same_set
        scores = block_values(g, plan.rows[0], plan.cols[0], geometry, symmetric)
        best, combo = _reduce_block(scores, plan.rows[0], plan.cols[0], combos, symmetric)
        return Winners(combo.contiguous(), measure_of_score(best.contiguous(), geometry), combos)
    # Every entry starts at its corner (i, j) with a combination of a pair of
    # i and one of j: the corner is a candidate of each such combination, so
    # where no block beats it (a tie: the corner is the optimum) value and
    # combination still agree. Entries no block reaches (one class on both
    # sides) are no negative entries and keep them unused.
    device = g.qr.device
    best = g.qr.clone() if geometry != "segment" else _corner_scores(g)
    combo = combos.of(table_q.owned[:, :1].to(combos.dtype), table_r.owned[None, :, 0].to(combos.dtype))
    disjoint = plan.disjoint

    def settle(row: Group, col: Group, results: tuple[Tensor, Tensor]) -> None:
        """Enter a block's best values and combinations: written where each
        entry lies in one block only (``disjoint``), else kept where better."""
        if row.span is not None and col.span is not None:
            at = (slice(*row.span), slice(*col.span))
        else:
            at = (_samples(row, n_q, device)[:, None], _samples(col, n_r, device)[None, :])
        targets = (best, combo)
        if not disjoint:
            current = [t[at] for t in targets]
            better = results[0] > current[0]
            results = tuple(torch.where(better, new, old) for new, old in zip(results, current))
        for target, value in zip(targets, results):
            target[at] = value

    for r, row in enumerate(plan.rows):
        for c, col in enumerate(plan.cols):
            if (plan.symmetric and c < r) or (row.label is not None and row.label == col.label):
                continue  # the mirror of a searched block, or one class on both sides
            diagonal = plan.symmetric and c == r
            scores = block_values(g, row, col, geometry, diagonal)
            results = _reduce_block(scores, row, col, combos, diagonal)
            settle(row, col, results)
            if plan.symmetric and c > r:  # entry (j, i) is entry (i, j) with its two pairs swapped
                settle(col, row, tuple(x.T for x in results))
    return Winners(combo, measure_of_score(best, geometry), combos)


def _corner_scores(g: GramBlocks) -> Tensor:
    """Minus the squared distances of the samples themselves (the segment score of two points)."""
    return (2 * g.qr).sub_(g.qq.diagonal()[:, None]).sub_(g.rr.diagonal()[None, :])


def _samples(group: Group, n: int, device) -> Tensor:
    return torch.arange(n, device=device) if group.samples is None else group.samples


# -- pass 2: gradient at the winners ---------------------------------------------------
def _entry_chunks(n_q: int, n_r: int, upper: bool, chunk_elements: int) -> list[tuple[int, int]]:
    """Row bands ``[a, b)`` of at most ``chunk_elements`` entries (at least one row);
    with ``upper`` only the strict upper triangle (j > i) of each band counts."""
    if (n_q * (n_r - 1) // 2 if upper else n_q * n_r) <= chunk_elements:
        return [(0, n_q)]
    bands, a = [], 0
    while a < n_q:
        b, size = a, 0
        while b < n_q:
            row = (n_r - 1 - b) if upper else n_r
            if b > a and size + row > chunk_elements:
                break
            size, b = size + row, b + 1
        bands.append((a, b))
        a = b
    return bands


def _index_dtype(n_q: int, n_r: int) -> torch.dtype:
    """int32 for flat positions in an ``(n_q, n_r)`` table (the search's
    winners, the gradient pass's entries) whenever every one of them fits: on
    the CPU int32 arithmetic and casts to int32 take a half to a third of the
    time of their int64 forms (``benchmarks/cpu_facts.py``), and takes accept
    either."""
    return torch.int32 if max(n_q, n_r) ** 2 < 2**31 else torch.int64


def _entries(a: int, b: int, n_q: int, n_r: int, upper: bool, device) -> Tensor:
    """Flat positions of the entries of rows ``a:b``; with ``upper`` only
    j > i. A whole matrix in one band is kept for the next batch of the same
    size (at most ``chunk_elements`` entries)."""
    if a == 0 and b == n_q:
        return _all_entries(n_q, n_r, upper, device)
    return _band(a, b, n_q, n_r, upper, device)


def _band(a: int, b: int, n_q: int, n_r: int, upper: bool, device) -> Tensor:
    dtype = _index_dtype(n_q, n_r)
    if not upper:
        return torch.arange(a * n_r, b * n_r, dtype=dtype, device=device)
    i, j = torch.triu_indices(b - a, n_r - a, offset=1, device=device).add_(a).to(dtype)
    return flat_positions(i, j, n_r)


@functools.lru_cache(maxsize=4)
def _all_entries(n_q: int, n_r: int, upper: bool, device) -> Tensor:
    return _band(0, n_q, n_q, n_r, upper, device)


def _entry_quad_gram(g: GramBlocks, i: Tensor, j: Tensor, p: Tensor, q: Tensor) -> QuadGram:
    """QuadGram of (x_i, x_p | x_j, x_q) for entries given as flat index tensors."""
    n_q, n_r = g.qr.shape
    dq, dr = g.qq.diagonal(), g.rr.diagonal()
    pos = flat_positions
    return QuadGram(
        take(dq, i), take(g.qq, pos(i, p, n_q)), take(dq, p),
        take(dr, j), take(g.rr, pos(j, q, n_r)), take(dr, q),
        take(g.qr, pos(i, j, n_r)), take(g.qr, pos(i, q, n_r)), take(g.qr, pos(p, j, n_r)), take(g.qr, pos(p, q, n_r)),
    )


def _add_partials(d: GramBlocks, i: Tensor, j: Tensor, p: Tensor, q: Tensor, parts: QuadGram) -> None:
    """Add the entries' gradient to the Gram blocks: the transpose of each
    ``take`` of :func:`_entry_quad_gram`, one scatter per block."""
    n_q, n_r = d.qr.shape
    pos = flat_positions
    cross = [(pos(i, j, n_r), parts.g13), (pos(i, q, n_r), parts.g14), (pos(p, j, n_r), parts.g23),
             (pos(p, q, n_r), parts.g24)]
    first = [(pos(i, i, n_q), parts.g11), (pos(i, p, n_q), parts.g12), (pos(p, p, n_q), parts.g22)]
    second = [(pos(j, j, n_r), parts.g33), (pos(j, q, n_r), parts.g34), (pos(q, q, n_r), parts.g44)]
    blocks = [(d.qr, cross + first + second)] if d.same_set else [(d.qr, cross), (d.qq, first), (d.rr, second)]
    for target, pieces in blocks:
        pieces = [(at, v) for at, v in pieces if v is not None]
        if pieces:
            scatter_add(target, torch.cat([at for at, _ in pieces]), torch.cat([v for _, v in pieces]))


def _entry_partials(q: QuadGram, grad: Tensor, geometry: Geometry) -> QuadGram:
    """``grad`` times the partial derivatives of each entry's optimum with
    respect to its ten inner products: those of the measure at the optimal
    weights, held fixed (Danskin)."""
    w = candidate_weights(q, best_candidate(q, geometry)[1], geometry)
    return QuadGram(*(None if x is None else x * grad for x in measure_partials(q, w, geometry)))


def _arc_partials(fields: Tensor, grad: Tensor) -> Tensor:
    """Arcs (unit ends): ``grad`` times the partial derivatives of each entry's
    optimum with respect to its six inner products ``fields`` ``(6, N)``
    (x_j.x_q, x_i.x_p, then x_i|x_p against x_j|x_q; the squared norms are 1
    and the cosine does not depend on them)."""
    cos, w = arc_entry_optimum(fields)  # w: [[b1, a1], [b2, a2]]
    # Rounding can put crossing arcs' cosine just above 1, where the search's
    # value is clamped: no gradient there, as through a clamp.
    grad = torch.le(cos, scalar(1.0, cos), out=torch.empty_like(cos)).mul_(grad)
    b, a = w.unbind(1)
    own = w.prod(0).mul_(cos.neg_())  # -cos b1 b2, -cos a1 a2
    return torch.cat((own, (a.unsqueeze(1) * b).view(4, -1))).mul_(grad)  # then a_k b_l


def _arc_entries(g: GramBlocks, d: GramBlocks, i: Tensor, j: Tensor, p: Tensor, q: Tensor, grad: Tensor,
                 compile: bool) -> None:
    """Add the arc entries' gradient to ``d``: the six inner products of each
    entry gathered, and its partials scattered back, with one index."""
    n_q, n_r = g.qr.shape
    partials = maybe_compiled(_arc_partials, compile)
    # Flat positions of j.q, i.p, i.j, i.q, p.j, p.q: rows of n_r, but i.p in
    # the query block (rows of n_q) when the sets differ.
    lengths = ((n_r,),) * 6 if d.same_set else ((n_r,), (n_q,)) + ((n_r,),) * 4
    rows = torch.stack((j, i, i, i, p, p))
    at = rows.mul_(constant(lengths, rows.dtype, rows.device)).add_(torch.stack((q, p, j, q, j, q)))
    if d.same_set:
        scatter_add(d.qr, at, partials(take(g.qr, at), grad))
        return
    fields = torch.cat((take(g.rr, at[0]).unsqueeze(0), take(g.qq, at[1]).unsqueeze(0), take(g.qr, at[2:])))
    parts = partials(fields, grad)
    scatter_add(d.rr, at[0], parts[0])
    scatter_add(d.qq, at[1], parts[1])
    scatter_add(d.qr, at[2:], parts[2:])


def _winners_grad(qq: Tensor, rr: Tensor, qr: Tensor, same_set: bool, winners: Winners, geometry: Geometry,
                  chunk_elements: int, compile: bool, grad_out: Tensor, sparse: bool | None = None) -> GramBlocks:
    """The gradient of the winners' measures ``(n_q, n_r)`` to the Gram blocks:
    for each winning combination of pairs its optimal weights are found again
    (a handful of entries' worth of work, not the search) and the measure's
    partial derivatives at those fixed weights are added, chunk by chunk. For
    one set (``same_set``, one symmetric matrix) the whole gradient is in the
    ``qr`` field.

    ``grad_out`` is zero off the negative entries. ``sparse`` (by default on
    the CPU): the entries' gradients are first summed per combination, in a
    table of every combination when it is small enough (``_COMBO_WEIGHT``),
    and only combinations with a non-zero sum are visited: entries share their
    winning combination (with m per class, about half of them for m = 4,
    three in four for m = 2), and hinge losses leave many entries without a
    gradient. Finding them is a host sync. Otherwise (a GPU) every entry is
    visited, of the upper triangle for one set; with ``sparse`` but too many
    combinations, every entry with a non-zero gradient."""
    if same_set:
        g = GramBlocks(qq, qq, qq)
        zero = torch.zeros_like(qr)
        d = GramBlocks(zero, zero, zero)
    else:
        g = GramBlocks(qq, rr, qr)
        d = GramBlocks(torch.zeros_like(qq), torch.zeros_like(rr), torch.zeros_like(qr))
    combos = winners.combos
    if sparse is None:
        sparse = qr.device.type == "cpu"
    step = max(1, chunk_elements // _ENTRY_WEIGHT)
    n_q, n_r = qr.shape
    if sparse and combos.count <= min(_COMBO_WEIGHT * chunk_elements, _COMBOS_PER_ENTRY * n_q * n_r):
        live = _live(grad_out.reshape(-1), winners.combo.view(-1), below=0.5)
        if live is None:
            return d
        grad, combo = live
        summed = grad_out.new_zeros(combos.count)
        scatter_add(summed, combo, grad)  # for one set, (i, j) and (j, i) name the same combination
        ids = summed.nonzero().squeeze(1)
        grads = summed.index_select(0, ids)
        del summed
        ids = ids.to(combos.dtype)
        for a in range(0, len(ids), step):
            _add_combos(g, d, combos.ends(ids[a:a + step]), grads[a:a + step], geometry, compile)
        return d
    if same_set:  # the value stands at (i, j) and (j, i)
        grad_out = grad_out + grad_out.T
    grad_flat = grad_out.reshape(-1)
    for a, b in _entry_chunks(n_q, n_r, same_set, step):
        at = _entries(a, b, n_q, n_r, same_set, qr.device)
        grad = take(grad_flat, at)
        if sparse:
            live = _live(grad, at, below=0.9)
            if live is None:
                continue
            grad, at = live
        _add_combos(g, d, combos.ends(take(winners.combo, at)), grad, geometry, compile)
    return d


def _live(grad: Tensor, index: Tensor, below: float) -> tuple[Tensor, Tensor] | None:
    """``grad`` and ``index`` (flat, alike) at the entries with a non-zero
    gradient when fewer than a fraction ``below`` of them have one (hinge
    losses leave many without), else as they are; ``None`` when none has one.
    A host sync."""
    live = int(torch.count_nonzero(grad))  # a reduction: far cheaper than nonzero() when all are live
    if live == 0:
        return None
    if live < below * grad.numel():
        keep = grad.nonzero().squeeze(1)
        return take(grad, keep), take(index, keep)
    return grad, index


def _add_combos(g: GramBlocks, d: GramBlocks, ends: tuple[Tensor, Tensor, Tensor, Tensor], grad: Tensor,
                geometry: Geometry, compile: bool) -> None:
    """Add ``grad`` times the partial derivatives of the optimum of each
    combination of pairs (x_i, x_p | x_j, x_q), given by its ``ends``, to ``d``."""
    i, p, j, q = ends
    if geometry == "arc":
        _arc_entries(g, d, i, j, p, q, grad, compile)
    else:
        partials = maybe_compiled(_entry_partials, compile)
        _add_partials(d, i, j, p, q, partials(_entry_quad_gram(g, i, j, p, q), grad, geometry))


#: How a measure becomes the base distance's units: the Euclidean distance
#: from a squared one, the chord from a cosine, or the measure itself.
Units = Literal["sqrt", "chord", "same"]


def _in_units(measure: Tensor, units: Units) -> tuple[Tensor, Tensor]:
    """The measure in base units and the derivative of that with respect to
    the measure, with the clamps of :func:`~pml_loop.functional.safe_sqrt`
    (0 where clamped)."""
    if units == "same":
        return measure, torch.ones_like(measure)
    arg = measure if units == "sqrt" else (2 - 2 * measure).clamp_min_(0)
    floor = torch.finfo(arg.dtype).tiny ** 0.5
    value = arg.clamp_min(floor).sqrt_()
    slope = torch.gt(arg, floor, out=torch.empty_like(arg)).div_(value)
    return value, slope.mul_(0.5 if units == "sqrt" else -1)


class _LoOpEntries(torch.autograd.Function):
    """The finished LoOp matrix: the negative entries (``neg``) hold the
    winners' measures in the base distance's units, never farther than the
    base value (never less similar), the others the base value. One autograd
    node for what would be half a dozen elementwise ones."""

    @staticmethod
    def forward(ctx, base, qq, rr, qr, neg, winners, units, inverted, geometry, chunk_elements, compile, layout):
        loop, slope = _in_units(winners.value, units)
        # The optimum includes the endpoints; clamping to the base value makes
        # "never farther than the plain distance" exact despite rounding.
        loop = torch.maximum(loop, base) if inverted else torch.minimum(loop, base)
        ctx.same_set = qq is rr and rr is qr
        ctx.settings = (winners, geometry, chunk_elements, compile)
        ctx.layout = layout
        ctx.save_for_backward(qq, rr, qr, neg, slope)
        return torch.where(neg, loop, base)

    @staticmethod
    def backward(ctx, grad_out):
        qq, rr, qr, neg, slope = ctx.saved_tensors
        # The mask as 0 / 1 values (made here: kept from the forward, it would
        # hold n_q x n_r values more): products with it cost a fraction of a
        # select or a masked fill on a boolean mask (CPU).
        neg = neg.to(grad_out.dtype)
        grad_measure = (grad_out * slope).mul_(neg)
        if ctx.layout is None:
            d = _winners_grad(qq, rr, qr, ctx.same_set, *ctx.settings, grad_measure)
        else:
            winners, geometry, chunk_elements, _ = ctx.settings
            d_qr, d_qq, d_rr = backend.gradient(qq, rr, qr, ctx.layout, geometry, winners.combo, grad_measure,
                                                chunk_elements)
            d = GramBlocks(d_qq, d_rr, d_qr)
        grad_base = torch.addcmul(grad_out, grad_out, neg, value=-1)
        if ctx.same_set:
            return grad_base, None, None, d.qr, None, None, None, None, None, None, None, None
        return grad_base, d.qq, d.rr, d.qr, None, None, None, None, None, None, None, None


def loop_entries(base: Tensor, g: GramBlocks, neg: Tensor, winners: Winners, units: Units, inverted: bool,
                 geometry: Geometry, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, compile: bool = False,
                 layout: backend.NumbaLayout | None = None) -> Tensor:
    """``(n_q, n_r)``: ``base`` with its negative entries (``neg``) replaced by
    the winners' measures in base units (``units``; ``inverted``: the base is
    a similarity), with the gradient of the optimum to the Gram blocks (by
    the numba kernel when a ``layout`` is given)."""
    return _LoOpEntries.apply(base, g.qq, g.rr, g.qr, neg, winners, units, inverted, geometry, chunk_elements, compile,
                              layout)


def numba_winners(g: GramBlocks, layout: backend.NumbaLayout, geometry: Geometry, combos: Combos,
                  chunk_elements: int) -> Winners:
    """:func:`search_winners` by the numba kernel."""
    best, combo = backend.search(g.qq, g.rr, g.qr, layout, geometry, combos, chunk_elements)
    return Winners(combo, measure_of_score(best, geometry), combos)
