"""The LoOp search and gradient as numba kernels: the ``backend="numba"`` path.

The same algorithm as :mod:`.grid` (search) and ``batch_loop``'s gradient
pass, written as loops that numba compiles once (cached on disk): on the CPU
the PyTorch path spends most of a B = 128 step launching a few hundred small
operations, a compiled loop does the arithmetic of a combination in
registers. Imported only when the numba backend is used (``pip install
pml-loop[numba]``).

Work is organised by the query side's classes, one class per iteration of
a parallel loop: a class's samples and pairs are a row band of every
output, so no two iterations write one place. (Python threads over parts of
the classes compile in half the time, but ran slower than the parallel
loops on two cores.) For each class and each reference pair the
kernels compute, as :mod:`.grid` does, each end's best corner or edge against
the other side's pair once per (sample, pair), then each combination's
interior candidate, and keep per entry the best combination. Within one set
a class handles only the entries (i, j) with j's class after i's (a
combination and its mirror image are one) and writes (j, i) with them.

The arithmetic runs in loops that LLVM vectorises (8 float32 lanes on the
AVX-512 machine it was written on): over a row of reference pairs, on
contiguous columns (tables stored field by field), with selects instead of
branches, and with the indexed reads (gathers) in loops of their own, since
a loop holding them stays scalar.
The gradient first lists the combinations with a gradient, then computes
their partials in such a loop and adds them in a scalar one.

A class with more than a thread's share of the work (a few big classes) is
split into parts of its pairs, the parts' winners merged in order after the
parallel loop (see ``backend.search_tasks``).

Memory: per class a few tables of (class samples or pairs) x (reference pairs
or samples), with a class's pairs taken ``slab`` at a time, plus the outputs
and, for split classes, their parts' winners (at most ``n_q`` rows).

Conventions: ``geom`` 0 arcs (score: the cosine), 1 segments (minus the
squared distance), 2 dot product; larger scores are better. Combinations are
numbered as :class:`~pml_loop.pairs.Combos` numbers them.
"""
from __future__ import annotations

import math

import numpy as np
import numba
from numba import njit, prange

ARC, SEGMENT, DOT = 0, 1, 2
GEOMETRY_CODES = {"arc": ARC, "segment": SEGMENT, "dot": DOT}

# error_model numpy: a float division by zero gives inf or nan, as in torch,
# with no check that would keep a loop from vectorising.
_OPTS = dict(cache=True, nogil=True, error_model="numpy")
#: Constants as float32: a Python float would make float32 arithmetic float64
#: (slower square roots); float64 inputs promote them back, exactly.
_ZERO, _HALF, _ONE, _TWO = np.float32(0.0), np.float32(0.5), np.float32(1.0), np.float32(2.0)
_NEG_INF = np.float32(-np.inf)


# -- per pair ------------------------------------------------------------------
@njit(**_OPTS)
def _pair_info(g_own, ends, geom, out):
    """Per pair (rows of ``out``), from the inner products ``g_own`` of its set:
    arcs: -c, the sine s of its angle (0 if flat) and s / (1 - c^2);
    segments: x1.x1, x1.x2, x2.x2, |x2 - x1|^2, its inverse (0 for a point)
    and the degeneracy threshold eps (|x1|^2 + |x2|^2 + 1)."""
    eps = np.finfo(g_own.dtype).eps
    tiny = np.finfo(g_own.dtype).tiny
    for k in range(ends.shape[0]):
        x1, x2 = ends[k, 0], ends[k, 1]
        if geom == ARC:
            c = g_own[x1, x2]
            det = 1.0 - c * c
            if det > 1e3 * eps:
                s = math.sqrt(det)
                out[k, 0], out[k, 1], out[k, 2] = -c, s, s / max(det, tiny)
            else:
                out[k, 0], out[k, 1], out[k, 2] = -c, 0.0, 0.0
        elif geom == SEGMENT:
            g11, g12, g22 = g_own[x1, x1], g_own[x1, x2], g_own[x2, x2]
            length = (g11 + g22) - 2.0 * g12
            small = eps * (abs(g11 + g22) + 1.0)
            out[k, 0], out[k, 1], out[k, 2] = g11, g12, g22
            out[k, 3], out[k, 4], out[k, 5] = length, (1.0 / length if length > small else 0.0), small


@njit(inline="always")
def _edge_value(w1, w2, s, nc):
    """The cosine of a unit point with coordinates (w1, w2) in an arc's basis
    (x_first, e2) and its projection on the arc, when that lies strictly
    inside the arc; else -inf. A select, not a branch: loops of it vectorise."""
    value = math.sqrt(w1 * w1 + w2 * w2)
    return value if min(w2, w1 * s + w2 * nc) > 0 else _NEG_INF


@njit(inline="always")
def _larger(k, value, which, best):
    """Candidate ``k`` and its ``value`` if larger than ``best``, else (which, best): the first of equals wins."""
    return (k, value) if value > best else (which, best)


@njit(inline="always")
def _arc_end(g3, g4, nc, s, inv):
    """A unit point against an arc (its inner products g3, g4 with the ends):
    its coordinate on the arc's e2 and its best corner or edge cosine."""
    y = (g4 + g3 * nc) * inv
    return y, max(max(g3, g4), _edge_value(g3, y, s, nc))


@njit
def _point_segment(yy, y0, y1, n0, k, length, inv):
    """Squared distance of a point to a segment z0 -> z1 (see ``grid._point_segment``)."""
    along = (y1 - y0) + k
    t = min(max(along * inv, _ZERO), _ONE)
    return yy - _TWO * y0 + n0 - _TWO * t * (along - _HALF * t * length)


@njit(inline="always")
def _end_score(geom, g3, g4, yy, info, k):
    """A point (inner products g3, g4 with a pair's ends, yy with itself)
    against pair ``k`` (``info``, see :func:`_pair_info`): the first two
    table fields and its best corner or edge score. Inlined: a call, like a
    row view, would count references to ``info``, which the threads of the
    parallel loop contend for."""
    if geom == ARC:
        y, best = _arc_end(g3, g4, info[k, 0], info[k, 1], info[k, 2])
        return g3, y, best
    if geom == SEGMENT:
        return g3, g4, -_point_segment(yy, g3, g4, info[k, 0], info[k, 0] - info[k, 1], info[k, 3], info[k, 4])
    return g3, g4, max(g3, g4)


@njit(inline="always")
def _arc_interior(m11, m12, m21, m22, s_q, nc_q, s_r, nc_r):
    """Top singular value of the 2 x 2 cross matrix of two arcs' planes when its
    singular vectors lie strictly inside both arcs (else -inf), and the
    vectors u (first arc), v (second) in the planes' bases (see ``grid._interior``).
    Selects, not branches: loops of it vectorise."""
    s11 = m11 * m11 + m21 * m21
    s22 = m12 * m12 + m22 * m22
    s12 = m11 * m12 + m21 * m22
    half = (s11 - s22) * _HALF
    root = math.sqrt(half * half + s12 * s12)
    both = abs(s12) + root
    v2 = both - half
    v1 = math.copysign(both + half, s12)
    u1 = m11 * v1 + m12 * v2
    u2 = m21 * v1 + m22 * v2
    t_q = u1 * s_q + u2 * nc_q
    t_r = v1 * s_r + v2 * nc_r
    value = math.sqrt(max(s22 + root + half, _ZERO))
    return value if min(min(u2, v2), min(t_q, t_r)) > 0 else _NEG_INF, u1, u2, v1, v2


@njit(inline="always")
def _segment_interior(g13, g14, g23, g24, g11, g12, a, tiny_q, g33, g34, c, tiny_r, eps):
    """Minus the squared distance at the interior stationary point of two
    segments when it lies strictly inside (else -inf), from the cross inner
    products and each pair's fields (x1.x1, x1.x2, length, threshold: see
    :func:`_pair_info`). Selects, not branches (a zero determinant divides
    harmlessly: error_model numpy)."""
    b = ((g24 - g23) - g14) + g13
    d = (g13 - g23) + (g12 - g11)
    e = (g14 - g13) + (g33 - g34)
    ac = a * c
    det = ac - b * b
    s = (b * e - c * d) / det
    t = (a * e - b * d) / det
    inside = (det > 64 * eps * ac + tiny_q * tiny_r) & (min(s, t) > 0) & (max(s, t) < 1)
    value = -((g11 + g33) - _TWO * g13 + d * s - e * t)
    return value if inside else _NEG_INF


@njit(inline="always")  # takes arrays: see _end_score
def _table_values(geom, out, nearest, near, first, second, ends_col, info_col, info_q, a, b0, eps):
    """One query pair ``a`` against the reference pairs ``b0:``, into ``out``:
    its ends' table rows ``first``, ``second`` ``(3, nb)`` (see the search),
    the reference ends' best score against pair ``a`` (``near``, per sample)
    and the interior candidates. Contiguous columns and selects only (the
    gathers of ``near`` done first, apart): LLVM vectorises these loops,
    several times faster than the scalar loop over the same arithmetic."""
    nb = out.shape[0]
    for b in range(nb):
        nearest[b] = max(near[ends_col[0, b0 + b]], near[ends_col[1, b0 + b]])
    f13, f14, e1 = first[0], first[1], first[2]
    f23, f24, e2 = second[0], second[1], second[2]
    if geom == ARC:  # f14, f24: x1, x2 on the second arc's e2
        nc_q, s_q, inv_q = info_q[a, 0], info_q[a, 1], info_q[a, 2]
        for b in range(nb):
            m21 = (f23[b] + f13[b] * nc_q) * inv_q
            m22 = (f24[b] + f14[b] * nc_q) * inv_q
            inner = _arc_interior(f13[b], f14[b], m21, m22, s_q, nc_q, info_col[1, b0 + b], info_col[0, b0 + b])[0]
            out[b] = max(max(max(e1[b], e2[b]), nearest[b]), inner)
    elif geom == SEGMENT:
        g11, g12, len_q, tiny_q = info_q[a, 0], info_q[a, 1], info_q[a, 3], info_q[a, 5]
        for b in range(nb):
            k = b0 + b
            inner = _segment_interior(f13[b], f14[b], f23[b], f24[b], g11, g12, len_q, tiny_q,
                                      info_col[0, k], info_col[1, k], info_col[3, k], info_col[5, k], eps)
            out[b] = max(max(max(e1[b], e2[b]), nearest[b]), inner)
    else:
        for b in range(nb):
            out[b] = max(max(e1[b], e2[b]), nearest[b])


# -- search ----------------------------------------------------------------------
@njit(**_OPTS)
def _end_table(geom, samples, g_qr, g_qq, ends_col, info_r, b0, row_of):
    """``(len(samples), 3, k_r - b0)``: each of ``samples`` against each
    reference pair from ``b0`` (the three fields of :func:`_end_score`, stored
    field by field); ``row_of`` gets each sample's row.

    This, :func:`_slab_values` and :func:`_live_partials` are functions of
    their own, called once per class, slab or query pair: inlined into the
    parallel loop, their vectorised loops doubled the first compile. Their
    calls count references to shared arrays (see :func:`_end_score`), but
    per pair, not per combination, which costs nothing measurable."""
    nb = ends_col.shape[1] - b0
    table = np.empty((len(samples), 3, nb), g_qr.dtype)
    for r in range(len(samples)):
        x = samples[r]
        row_of[x] = r
        row, xx = g_qr[x], g_qq[x, x]
        for b in range(nb):
            x3, x4 = ends_col[0, b0 + b], ends_col[1, b0 + b]
            table[r, 0, b], table[r, 1, b], table[r, 2, b] = _end_score(geom, row[x3], row[x4], xx, info_r, b0 + b)
    return table


@njit(**_OPTS)
def _slab_values(geom, one_set, label, p0, p1, b0, g_qr, g_qq, ends_q, ends_r, ends_col, info_q, info_r, info_col,
                 diag_r, pair_labels_r, use_table, table, row_of, eps):
    """``(p1 - p0, k_r - b0)``: the best score of each combination of the
    query pairs ``p0:p1`` with the reference pairs from ``b0``, from the
    class's ``table`` (:func:`_end_table`) when ``use_table``, else
    computed per combination."""
    n_r = g_qr.shape[1]
    nb = ends_r.shape[0] - b0
    nearest = np.empty(nb, g_qr.dtype)
    # Reference samples against the slab's pairs (best end only).
    # (Every sample, also those never read: a loop without a test vectorises.)
    ends_vs = np.empty((p1 - p0, n_r), g_qr.dtype)
    for a in range(p0, p1):
        row1, row2, out = g_qr[ends_q[a, 0]], g_qr[ends_q[a, 1]], ends_vs[a - p0]
        for y in range(n_r):
            out[y] = _end_score(geom, row1[y], row2[y], diag_r[y], info_q, a)[2]
    values = np.empty((p1 - p0, nb), g_qr.dtype)
    for a in range(p0, p1):
        x1, x2 = ends_q[a, 0], ends_q[a, 1]
        if use_table:
            _table_values(geom, values[a - p0], nearest, ends_vs[a - p0], table[row_of[x1]],
                          table[row_of[x2]], ends_col, info_col, info_q, a, b0, eps)
            continue
        nc_q, s_q, inv_q = info_q[a, 0], info_q[a, 1], info_q[a, 2]
        for b in range(nb):
            k = b0 + b
            if not one_set and pair_labels_r[k] == label:  # never read: the search skips those entries
                values[a - p0, b] = -np.inf
                continue
            x3, x4 = ends_r[k, 0], ends_r[k, 1]
            f13, f14, e1 = _end_score(geom, g_qr[x1, x3], g_qr[x1, x4], g_qq[x1, x1], info_r, k)
            f23, f24, e2 = _end_score(geom, g_qr[x2, x3], g_qr[x2, x4], g_qq[x2, x2], info_r, k)
            v = max(max(e1, e2), max(ends_vs[a - p0, x3], ends_vs[a - p0, x4]))
            if geom == ARC:  # f14, f24: x1, x2 on the second arc's e2
                m21 = (f23 + f13 * nc_q) * inv_q
                m22 = (f24 + f14 * nc_q) * inv_q
                v = max(v, _arc_interior(f13, f14, m21, m22, s_q, nc_q, info_r[k, 1], info_r[k, 0])[0])
            elif geom == SEGMENT:
                v = max(v, _segment_interior(f13, f14, f23, f24, info_q[a, 0], info_q[a, 1], info_q[a, 3],
                                             info_q[a, 5], info_r[k, 0], info_r[k, 1], info_r[k, 3], info_r[k, 5],
                                             eps))
            values[a - p0, b] = v
    return values


@njit(**_OPTS)
def _corners(c, samples, one_set, cls_r, geom, g_qr, g_qq, g_rr, best, combo):
    """Class ``c``'s entries start at their corner (i, j) and combination 0,
    until a combination beats them (one set: those with an earlier class are
    an earlier class's to write)."""
    for i in samples:
        for j in range(best.shape[1]):
            if one_set and cls_r[j] < c:
                continue
            if geom == SEGMENT:
                best[i, j] = 2.0 * g_qr[i, j] - g_qq[i, i] - g_rr[j, j]
            else:
                best[i, j] = g_qr[i, j]
            combo[i, j] = 0


@njit(parallel=True, **_OPTS)
def search(g_qr, g_qq, g_rr, geom, one_set, ends_q, ends_r, owned_q, owned_r, labels_q, labels_r, pair_labels_r,
           cls_r, order_q, sample_start, pair_start, items, merges, private_rows, slab, best, combo):
    """The best score and combination of the negative entries (i, j) into
    ``best``, ``combo`` ``(n_q, n_r)``; their other entries get the corner
    (i, j) and combination 0. One set: only entries whose j is of a later
    class, and their mirror images (j, i).

    ``items`` ``(n, 4)``: the parallel loop's tasks, a class (-1: none), a
    range of its pairs and where the task writes: -1, straight into the
    outputs (the class's one task); -2, the same without the mirror images
    (the first part of a class split into parts, so that one big class pair
    is no single task); else its first row of a private table (the other
    parts). The loop deals them out in equal contiguous blocks, one per
    thread. ``merges`` ``(m, 3)``: each split class, its number of parts and
    its second part's first private row (part q's rows follow part q - 1's),
    merged in order afterwards (the first of equals wins, as in one task);
    ``private_rows``: the private tables' rows.

    ``order_q``: query samples sorted by class, class c's being
    ``order_q[sample_start[c]:sample_start[c + 1]]``; its pairs are
    ``pair_start[c]:pair_start[c + 1]`` of ``ends_q``. ``cls_r``: one set
    only, each sample's class number. ``slab``: a task's pairs searched at
    once.
    """
    n_q, n_r = best.shape
    k_q, k_r = ends_q.shape[0], ends_r.shape[0]
    eps = np.finfo(g_qr.dtype).eps
    info_q = np.zeros((k_q, 6), g_qr.dtype)
    info_r = info_q if one_set else np.zeros((k_r, 6), g_qr.dtype)
    _pair_info(g_qq, ends_q, geom, info_q)
    if not one_set:
        _pair_info(g_rr, ends_r, geom, info_r)
    ends_col = np.ascontiguousarray(ends_r.T)  # fields as rows: contiguous along the pairs
    diag_r = np.ascontiguousarray(np.diag(g_rr))
    info_col = np.ascontiguousarray(info_r.T)
    own_best = np.empty((private_rows, n_r), best.dtype)
    own_combo = np.empty((private_rows, n_r), combo.dtype)
    for w in prange(len(items)):
        c, lo, hi, row0 = items[w, 0], items[w, 1], items[w, 2], items[w, 3]
        if c < 0:  # padding: every thread gets as many tasks
            continue
        samples = order_q[sample_start[c]:sample_start[c + 1]]
        label = labels_q[samples[0]]
        b0 = pair_start[c + 1] if one_set else 0  # one set: pairs of later classes only
        nb = k_r - b0
        direct = row0 < 0  # else into the private table, merged below
        if direct:
            _corners(c, samples, one_set, cls_r, geom, g_qr, g_qq, g_rr, best, combo)
        mirror = one_set and row0 == -1  # a split class's first part: the merge mirrors
        if nb <= 0:
            continue
        # The class's samples against every reference pair when that is no
        # larger than a slab's values; else found per combination.
        use_table = len(samples) <= slab
        row_of = np.zeros(n_q, np.int64)  # sample -> its row in the table
        table = _end_table(geom, samples if use_table else samples[:0], g_qr, g_qq, ends_col, info_r, b0, row_of)
        first = True
        for p0 in range(lo, hi, slab):
            p1 = min(p0 + slab, hi)
            values = _slab_values(geom, one_set, label, p0, p1, b0, g_qr, g_qq, ends_q, ends_r, ends_col, info_q,
                                  info_r, info_col, diag_r, pair_labels_r, use_table, table, row_of, eps)
            # Per entry, the best combination of the slab (kept where better).
            for r in range(len(samples)):
                i = samples[r]
                for j in range(n_r):
                    if (cls_r[j] <= c) if one_set else (labels_r[j] == label):
                        continue
                    if first:
                        bv, bc = -np.inf, 0
                    elif direct:
                        bv, bc = best[i, j], combo[i, j]
                    else:
                        bv, bc = own_best[row0 + r, j], own_combo[row0 + r, j]
                    for u in range(owned_q.shape[1]):
                        a = owned_q[i, u]
                        if a < p0 or a >= p1:
                            continue
                        for t in range(owned_r.shape[1]):
                            b = owned_r[j, t]
                            v = values[a - p0, b - b0]
                            if v > bv:
                                bv, bc = v, a * k_r + b
                    if not direct:
                        own_best[row0 + r, j], own_combo[row0 + r, j] = bv, bc
                        continue
                    best[i, j], combo[i, j] = bv, bc
                    if mirror:  # entry (j, i): its pairs swapped, the same combination
                        best[j, i], combo[j, i] = bv, bc
            first = False
    for m in prange(len(merges)):
        c, parts, row0 = merges[m, 0], merges[m, 1], merges[m, 2]
        samples = order_q[sample_start[c]:sample_start[c + 1]]
        label = labels_q[samples[0]]
        for r in range(len(samples)):
            i = samples[r]
            for j in range(n_r):
                if (cls_r[j] <= c) if one_set else (labels_r[j] == label):
                    continue
                bv, bc = best[i, j], combo[i, j]  # the first part's
                for q in range(parts - 1):
                    row = row0 + q * len(samples) + r
                    if own_best[row, j] > bv:
                        bv, bc = own_best[row, j], own_combo[row, j]
                best[i, j], combo[i, j] = bv, bc
                if one_set:
                    best[j, i], combo[j, i] = bv, bc


# -- gradient ----------------------------------------------------------------------
@njit(inline="always")
def _arc_weights(w1, w2, c, nc, inv):
    """Unit-point weights (on x_first, x_second) of the direction (w1, w2) in an
    arc's orthonormal basis (x_first, e2)."""
    along_x2 = w2 * inv
    along_x1 = w1 + along_x2 * nc
    norm_sq = along_x1 * along_x1 + along_x2 * along_x2 + _TWO * along_x1 * along_x2 * c
    scale = _ONE / math.sqrt(norm_sq)
    scale = scale if norm_sq > 0 else _ZERO
    return along_x1 * scale, along_x2 * scale


@njit(inline="always")
def _arc_partials(c34, c12, g13, g14, g23, g24, eps, tiny):
    """Partial derivatives of the largest cosine of two arcs (x1 -> x2, x3 ->
    x4, unit ends) with respect to x3.x4, x1.x2, x1.x3, x1.x4, x2.x3, x2.x4, at
    its optimum (Danskin): the nine candidates of ``grid.arc_entry_optimum``,
    the first best one. Every candidate is computed and the winner's taken
    by selects (no branch): a loop of it vectorises."""
    nc_r, nc_q = -c34, -c12
    det_r, det_q = _ONE - c34 * c34, _ONE - c12 * c12
    s_r = math.sqrt(det_r) if det_r > 1e3 * eps else _ZERO
    s_q = math.sqrt(det_q) if det_q > 1e3 * eps else _ZERO
    inv_r = s_r / max(det_r, tiny)
    inv_q = s_q / max(det_q, tiny)
    # The other pair's ends in each plane's basis.
    y1 = (g14 + g13 * nc_r) * inv_r  # x1 on e2_r
    y2 = (g24 + g23 * nc_r) * inv_r  # x2 on e2_r
    y3 = (g23 + g13 * nc_q) * inv_q  # x3 on e2_q
    y4 = (g24 + g14 * nc_q) * inv_q  # x4 on e2_q
    # Corners (which 0 - 3), edges (4 - 7), the interior (8); a later one wins only if larger.
    which, cos = 0, g13
    which, cos = _larger(1, g14, which, cos)
    which, cos = _larger(2, g23, which, cos)
    which, cos = _larger(3, g24, which, cos)
    which, cos = _larger(4, _edge_value(g13, y1, s_r, nc_r), which, cos)
    which, cos = _larger(5, _edge_value(g23, y2, s_r, nc_r), which, cos)
    which, cos = _larger(6, _edge_value(g13, y3, s_q, nc_q), which, cos)
    which, cos = _larger(7, _edge_value(g14, y4, s_q, nc_q), which, cos)
    m22 = (y2 + y1 * nc_q) * inv_q
    sigma, u1, u2, v1, v2 = _arc_interior(g13, y1, y3, m22, s_q, nc_q, s_r, nc_r)
    which, cos = _larger(8, sigma, which, cos)
    # The optimal points: a1 x1 + a2 x2 on the first arc, b1 x3 + b2 x4 on
    # the second: a corner's ends, or the weights of the winning direction.
    bw1, bw2 = _arc_weights(g13 if which == 4 else g23 if which == 5 else v1,
                            y1 if which == 4 else y2 if which == 5 else v2, c34, nc_r, inv_r)
    aw1, aw2 = _arc_weights(g13 if which == 6 else g14 if which == 7 else u1,
                            y3 if which == 6 else y4 if which == 7 else u2, c12, nc_q, inv_q)
    a_second = (which == 2) | (which == 3) | (which == 5)
    b_second = (which == 1) | (which == 3) | (which == 7)
    a_weighted = which >= 6
    b_weighted = (which == 4) | (which == 5) | (which == 8)
    a1 = aw1 if a_weighted else _ZERO if a_second else _ONE
    a2 = aw2 if a_weighted else _ONE if a_second else _ZERO
    b1 = bw1 if b_weighted else _ZERO if b_second else _ONE
    b2 = bw2 if b_weighted else _ONE if b_second else _ZERO
    live = not cos > 1  # clamped in the forward: no gradient, as through a clamp
    return (-cos * b1 * b2 if live else _ZERO, -cos * a1 * a2 if live else _ZERO, a1 * b1 if live else _ZERO,
            a1 * b2 if live else _ZERO, a2 * b1 if live else _ZERO, a2 * b2 if live else _ZERO)


@njit(inline="always")
def _clamped_ratio(num, den, tiny):
    """num / den clamped to [0, 1]; 0 for a degenerate ``den`` (<= tiny)."""
    ratio = num / den
    return min(max(ratio if den > tiny else _ZERO, _ZERO), _ONE)


@njit(inline="always")
def _segment_square(s, t, a, b, c, d, e, f):
    """The squared distance between the points at s and t of two segments
    (the quadratic of ``segments.segment_candidates``)."""
    return a * s * s + c * t * t - _TWO * b * s * t + _TWO * d * s - _TWO * e * t + f


@njit(inline="always")
def _smaller(s, t, valid, a, b, c, d, e, f, best_s, best_t, best):
    """(s, t) and its squared distance when ``valid`` and smaller than ``best``, else the best so far."""
    sq = _segment_square(s, t, a, b, c, d, e, f)
    return (s, t, sq) if valid & (sq < best) else (best_s, best_t, best)


@njit(inline="always")
def _segment_weights(g11, g12, g22, g33, g34, g44, g13, g14, g23, g24, eps):
    """Optimal (s, t) of two segments: the best of the four clamped edges and
    the interior point (``segments.segment_candidates``), first of equals.
    Every candidate computed, the best taken by selects."""
    a = g22 - _TWO * g12 + g11
    c = g44 - _TWO * g34 + g33
    b = g24 - g23 - g14 + g13
    d = g12 - g23 - g11 + g13
    e = g14 - g34 - g13 + g33
    f = g11 - _TWO * g13 + g33
    tiny = eps * (abs(g11 + g22 + g33 + g44) + _ONE)
    det = a * c - b * b
    s4, t4 = (b * e - c * d) / det, (a * e - b * d) / det
    inside = (det > 64 * eps * (a * c) + tiny * tiny) & (min(s4, t4) >= 0) & (max(s4, t4) <= 1)
    # In order: s = 0, s = 1, t = 0, t = 1, the interior; a later one wins only if smaller.
    t = _clamped_ratio(e, c, tiny)
    best_s, best_t, best = _ZERO, t, _segment_square(_ZERO, t, a, b, c, d, e, f)
    best_s, best_t, best = _smaller(_ONE, _clamped_ratio(e + b, c, tiny), True, a, b, c, d, e, f, best_s, best_t, best)
    best_s, best_t, best = _smaller(_clamped_ratio(-d, a, tiny), _ZERO, True, a, b, c, d, e, f, best_s, best_t, best)
    best_s, best_t, best = _smaller(_clamped_ratio(b - d, a, tiny), _ONE, True, a, b, c, d, e, f, best_s, best_t, best)
    best_s, best_t, best = _smaller(s4, t4, inside, a, b, c, d, e, f, best_s, best_t, best)
    return best_s, best_t


@njit(**_OPTS)  # not inlined: see _end_table
def _live_partials(geom, x1, x2, summed, b0, ends_col, pair_r, diag_r, gqq, gqr, dqq, dqr, own_r, live, inputs,
                   parts, eps, tiny):
    """Add the partial derivatives of the optimum of each combination of pair
    (x1, x2) with a reference pair ``b0 + b`` whose ``summed[b]`` (the
    entries' gradient) is not zero, times it, to ``dqq`` (x1.x2 etc.),
    ``dqr`` (rows x1, x2) and, for the second pair's own inner products
    (x3.x3, x3.x4, x4.x4), ``own_r[:, b0 + b]``.

    In three loops: the live pairs' inputs gathered, their partials computed
    (selects only over contiguous columns: LLVM vectorises it, several
    times faster than a loop with branches), and the sums added. ``live``,
    ``inputs`` ``(8, nb)`` and ``parts`` ``(10, nb)`` are buffers."""
    n = 0
    for b in range(summed.shape[0]):
        live[n] = b
        n += summed[b] != 0
    row1, row2 = gqr[x1], gqr[x2]
    for t in range(n):
        k = b0 + live[t]
        x3, x4 = ends_col[0, k], ends_col[1, k]
        inputs[0, t], inputs[1, t], inputs[2, t] = summed[live[t]], pair_r[k], row1[x3]
        inputs[3, t], inputs[4, t], inputs[5, t] = row1[x4], row2[x3], row2[x4]
        inputs[6, t], inputs[7, t] = diag_r[x3], diag_r[x4]
    # parts: x1.x1, x1.x2, x2.x2 | x3.x3, x3.x4, x4.x4 | x1.x3, x1.x4, x2.x3, x2.x4
    g11, g12, g22 = gqq[x1, x1], gqq[x1, x2], gqq[x2, x2]
    # Loops of one geometry each: a branch inside would keep them from vectorising.
    if geom == ARC:
        for t in range(n):
            g, g34, g13, g14 = inputs[0, t], inputs[1, t], inputs[2, t], inputs[3, t]
            g23, g24 = inputs[4, t], inputs[5, t]
            p34, p12, p13, p14, p23, p24 = _arc_partials(g34, g12, g13, g14, g23, g24, eps, tiny)
            parts[1, t], parts[4, t] = g * p12, g * p34
            parts[6, t], parts[7, t], parts[8, t], parts[9, t] = g * p13, g * p14, g * p23, g * p24
    elif geom == SEGMENT:
        for t in range(n):
            g, g34, g13, g14 = inputs[0, t], inputs[1, t], inputs[2, t], inputs[3, t]
            g23, g24 = inputs[4, t], inputs[5, t]
            g33, g44 = inputs[6, t], inputs[7, t]
            s, u = _segment_weights(g11, g12, g22, g33, g34, g44, g13, g14, g23, g24, eps)
            a1, a2, b1, b2 = _ONE - s, s, _ONE - u, u
            raw = (a1 * a1 * g11 + _TWO * a1 * a2 * g12 + a2 * a2 * g22 + b1 * b1 * g33 + _TWO * b1 * b2 * g34
                   + b2 * b2 * g44 - _TWO * (a1 * b1 * g13 + a1 * b2 * g14 + a2 * b1 * g23 + a2 * b2 * g24))
            g = _ZERO if raw < 0 else g  # clamped at 0 in the forward: no gradient
            parts[0, t], parts[1, t], parts[2, t] = g * a1 * a1, g * _TWO * a1 * a2, g * a2 * a2
            parts[3, t], parts[4, t], parts[5, t] = g * b1 * b1, g * _TWO * b1 * b2, g * b2 * b2
            g = -_TWO * g
            parts[6, t], parts[7, t], parts[8, t], parts[9, t] = g * a1 * b1, g * a1 * b2, g * a2 * b1, g * a2 * b2
    else:  # the best corner, the first of equals
        for t in range(n):
            g, g13, g14, g23, g24 = inputs[0, t], inputs[2, t], inputs[3, t], inputs[4, t], inputs[5, t]
            best = max(max(g13, g14), max(g23, g24))
            p13 = _ONE if g13 == best else _ZERO
            p14 = _ONE if p13 == 0 and g14 == best else _ZERO
            p23 = _ONE if p13 + p14 == 0 and g23 == best else _ZERO
            parts[6, t], parts[7, t], parts[8, t], parts[9, t] = g * p13, g * p14, g * p23, g * (_ONE - p13 - p14 - p23)
    for t in range(n):
        k = b0 + live[t]
        x3, x4 = ends_col[0, k], ends_col[1, k]
        if geom == SEGMENT:
            dqq[x1, x1] += parts[0, t]
            dqq[x2, x2] += parts[2, t]
            own_r[0, k] += parts[3, t]
            own_r[2, k] += parts[5, t]
        if geom != DOT:
            dqq[x1, x2] += parts[1, t]
            own_r[1, k] += parts[4, t]
        dqr[x1, x3] += parts[6, t]
        dqr[x1, x4] += parts[7, t]
        dqr[x2, x3] += parts[8, t]
        dqr[x2, x4] += parts[9, t]


@njit(parallel=True, **_OPTS)
def gradient(g_qr, g_qq, g_rr, geom, one_set, ends_q, ends_r, combo, grad, cls_r, order_q, sample_start,
             pair_start, work, slab, d_qr, d_qq, d_rr, own_r):
    """Add the gradient of the measures of the winners of the classes ``work``
    (``grad`` ``(n_q, n_r)``, zero off the negative entries) to ``d_qr``,
    ``d_qq`` and ``d_rr`` (one array for one set). Entries sharing a
    combination are summed first (per class and ``slab`` of its pairs); one
    set: entry (i, j) and (j, i) are one. ``own_r`` ``(threads, 3, k_r)``,
    zeros: the second pairs' own partials, gathered per thread (they belong
    to rows of other classes) and added to ``d_rr`` at the end."""
    n_q, n_r = grad.shape
    k_r = ends_r.shape[0]
    eps = np.finfo(g_qr.dtype).eps
    tiny = np.finfo(g_qr.dtype).tiny
    ends_col = np.ascontiguousarray(ends_r.T)
    diag_r = np.ascontiguousarray(np.diag(g_rr))
    pair_r = np.empty(k_r, g_qr.dtype)  # x3.x4 of each reference pair
    for b in range(k_r):
        pair_r[b] = g_rr[ends_r[b, 0], ends_r[b, 1]]
    for w in prange(len(work)):
        c = work[w]
        samples = order_q[sample_start[c]:sample_start[c + 1]]
        b0 = pair_start[c + 1] if one_set else 0
        nb = k_r - b0
        if nb <= 0:
            continue
        mine = own_r[numba.get_thread_id()]
        live = np.empty(nb, np.int64)
        inputs = np.empty((8, nb), g_qr.dtype)
        parts = np.empty((10, nb), g_qr.dtype)
        for p0 in range(pair_start[c], pair_start[c + 1], slab):
            p1 = min(p0 + slab, pair_start[c + 1])
            summed = np.zeros((p1 - p0, nb), g_qr.dtype)
            for i in samples:
                for j in range(n_r):
                    if one_set and cls_r[j] <= c:
                        continue
                    g = grad[i, j] + grad[j, i] if one_set else grad[i, j]
                    if g == 0:
                        continue
                    k = combo[i, j]
                    a = k // k_r
                    if p0 <= a < p1:
                        summed[a - p0, k - a * k_r - b0] += g
            for a in range(p0, p1):
                _live_partials(geom, ends_q[a, 0], ends_q[a, 1], summed[a - p0], b0, ends_col, pair_r, diag_r, g_qq,
                               g_qr, d_qq, d_qr, mine, live, inputs, parts, eps, tiny)
    for t in range(own_r.shape[0]):
        for b in range(k_r):
            x3, x4 = ends_r[b, 0], ends_r[b, 1]
            d_rr[x3, x4] += own_r[t, 1, b]
            if geom == SEGMENT:
                d_rr[x3, x3] += own_r[t, 0, b]
                d_rr[x4, x4] += own_r[t, 2, b]



def set_threads(n: int) -> None:
    """Run the parallel loops on ``n`` threads (at most numba's pool), as torch does."""
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
