"""The LoOp optimum of every combination of two sets of pairs, values only.

The batch search needs, for R first pairs against C second pairs, only the
best value of each of the R x C combinations; which candidate wins, and where,
is worked out later for the few winning combinations (see ``batch_loop``).
On the CPU and on a GPU alike the cost of an elementwise pass over a grid of
10^4 - 10^5 combinations is mostly its launch, so these functions are written
for the fewest passes: the four corners are views of one gathered Gram block,
edges are computed two at a time and once per sample rather than per pair
end, and infeasible candidates are pushed below every value by arithmetic
rather than by masks and selects.

Inputs: ``cross`` ``(2R, 2C)``, the inner products of the pairs' ends
``[x1 of each first pair; x2 of each]`` against ``[x3 of each second pair; x4
of each]`` (or, with each pair's ends given as positions, the inner products
of the samples), and per pair the inner products of its own ends.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .gram import constant, first_max, scalar, steps, take


def arc_planes(c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per arc with ends x1, x2 (``c = x1.x2``): ``(-c, s, 1/s)`` with ``s`` the
    sine of its angle, for the orthonormal basis (x1, e2), e2 = (x2 - c x1) / s
    of its plane. A flat arc (coincident or antipodal ends) has no plane: its
    ``s`` and ``1/s`` are 0, which makes every candidate needing the plane fail
    the strict feasibility tests below, leaving its endpoints."""
    det = torch.sub(scalar(1.0, c), c * c)
    flat_below = scalar(1e3 * torch.finfo(det.dtype).eps, det)
    s = torch.gt(det, flat_below, out=torch.empty_like(det)).mul_(det).sqrt_()  # 0 if flat
    return -c, s, s / det.clamp_min_(torch.finfo(det.dtype).tiny)


def _edge_values(w1: Tensor, w2: Tensor, s: Tensor, neg_c: Tensor, out: Tensor | None = None) -> Tensor:
    """Best cosine of a fixed unit point y against an arc, given y's
    coordinates (w1, w2) in the arc's orthonormal basis: |w| when the direction
    of w lies strictly inside the arc (w2 > 0 and w1 s - w2 c > 0), else below
    -1 (an end of the arc, a corner candidate, is then at least as good).
    Written into ``out`` if given."""
    value = torch.mul(w1, w1, out=out).addcmul_(w2, w2).sqrt_()
    inside = torch.minimum(w2, (w1 * s).addcmul_(w2, neg_c)).sign_()  # 1 strictly inside
    return value.add_(inside.sub_(scalar(1.0, inside)), alpha=2)


def _interior(m11: Tensor, m12: Tensor, m21: Tensor, m22: Tensor, s_q: Tensor, nc_q: Tensor, s_r: Tensor,
              nc_r: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The interior candidate of two arcs from the 2 x 2 cross matrix
    M = [[m11, m12], [m21, m22]] of their planes' orthonormal bases: its top
    singular value where both singular vectors lie strictly inside their arcs
    (with one common sign), else a value below -1 (written into ``out`` if
    given); and the (unnormalised) singular vectors u = M v, v in those bases."""
    s11 = (m11 * m11).addcmul_(m21, m21)  # M^T M = [[s11, s12], [s12, s22]]
    s22 = (m12 * m12).addcmul_(m22, m22)
    s12 = (m11 * m12).addcmul_(m21, m22)
    half = (s11 - s22).mul_(scalar(0.5, s11))
    root = (half * half).addcmul_(s12, s12).sqrt_()
    sigma = torch.add(s22, root, out=out).add_(half).sqrt_()
    # Top eigenvector of M^T M as the sum of its two textbook forms, signed so
    # that they add up: (+-(|s12| + lambda - s22), |s12| + lambda - s11).
    both = s12.abs().add_(root)
    v2 = both - half
    v1 = torch.copysign(both.add_(half), s12)
    u1 = (m11 * v1).addcmul_(m12, v2)  # u = M v, the partner direction
    u2 = (m21 * v1).addcmul_(m22, v2)
    # Inside both arcs (v2 >= 0 by construction): v2, u2 and the two "before
    # the far end" tests all strictly positive; a zero v (M a multiple of a
    # rotation) or a flat arc fails.
    t_q = (u1 * s_q).addcmul_(u2, nc_q)
    t_r = (v1 * s_r).addcmul_(v2, nc_r)
    inside = torch.minimum(torch.minimum(u2, v2), torch.minimum(t_q, t_r)).sign_()
    return sigma.add_(inside.sub_(scalar(1.0, inside)), alpha=2), u1, u2, v1, v2


def arc_grid_values(cross: Tensor, c_q: Tensor, c_r: Tensor, symmetric: bool = False,
                    ends_q: Tensor | None = None, ends_r: Tensor | None = None) -> Tensor:
    """``(R, C)``: the largest cosine between the shortest arc of each first
    pair and that of each second pair (unit ends).

    ``cross`` ``(s_q, s_r)``: the inner products of the first pairs' samples
    with the second pairs'; ``ends_q`` ``(2, R)`` and ``ends_r`` ``(2, C)``:
    the pairs' first ends, then their second ends, as positions in them (by
    default ``cross`` is ``(2R, 2C)``, rows and columns the pairs' first ends,
    then their second). ``c_q`` ``(R,)`` and ``c_r`` ``(C,)``: each pair's
    x1.x2 (resp. x3.x4). ``symmetric``: the two sets of pairs are one
    (``cross`` symmetric), so the second set's half of the work is the
    transpose of the first's.

    The optimum is a corner, an edge point (an end against the other arc) or
    the interior stationary pair: the top singular pair of the 2 x 2 cross
    matrix M of the two planes' orthonormal bases, when both singular vectors
    lie inside their arcs (with one common sign). The other singular pair is a
    saddle and never wins. Corners and edges depend on a sample and an arc
    only, so they are found once per (sample, pair) and read off per pair's
    end: with m samples per class a sample ends m - 1 pairs.
    """
    R, C = c_q.shape[0], c_r.shape[0]
    ends_q = _default_ends(ends_q, R, cross.device)
    ends_r = ends_q if symmetric and ends_r is None else _default_ends(ends_r, C, cross.device)
    nc_r, s_r, inv_r = arc_planes(c_r)
    if symmetric:
        nc_q, s_q, inv_q = nc_r.unsqueeze(1), s_r.unsqueeze(1), inv_r.unsqueeze(1)
    else:
        nc_q, s_q, inv_q = (t.unsqueeze(1) for t in arc_planes(c_q))
    # Per first pair's end and second pair: x.x3, x.e2 of the second pair's
    # plane, and the best corner or edge of x against the second arc, read off
    # at the x1 (first half) and the x2 (second half): (3, 2, R, C).
    at_ends = _rows_of_planes(_arc_per_sample(cross, ends_r[0], ends_r[1], nc_r, s_r, inv_r), ends_q.view(-1))
    at_x1, at_x2 = at_ends.view(3, 2, R, C).unbind(1)
    best = torch.maximum(at_x1[2], at_x2[2])
    if symmetric:  # x3, x4 against the first arc: the transpose
        best = torch.maximum(best, best.T)
    else:  # the same per sample of the second side and first pair, read off at x3, x4
        best_q = _best_end(cross.index_select(0, ends_q[0]), cross.index_select(0, ends_q[1]), nc_q, s_q, inv_q)[1]
        best_q = best_q.index_select(1, ends_r.view(-1))
        torch.maximum(best, torch.maximum(best_q[:, :C], best_q[:, C:]), out=best)
    # Interior: M in the bases (x1, e2_q), (x3, e2_r): the row (x1.x3, x1.e2_r)
    # and the row of e2_q, from the same at x2. e2_q . x3 is computed rather
    # than transposed: elementwise work on a transposed operand runs several
    # times slower on the CPU.
    first_row = at_x1[:2]
    second_row = torch.addcmul(at_x2[:2], first_row, nc_q).mul_(inv_q)
    m11, m12 = first_row.unbind()
    m21, m22 = second_row.unbind()
    interior = _interior(m11, m12, m21, m22, s_q, nc_q, s_r, nc_r)[0]
    return torch.maximum(best, interior, out=best)


def _rows_of_planes(x: Tensor, rows: Tensor) -> Tensor:
    """``x.index_select(1, rows)`` for a contiguous ``x`` ``(k, s, C)``, as one
    gather along the leading dimension of ``x`` viewed as ``(k s, C)``: on the
    CPU 1.4 - 1.5 times as fast (torch 2.13, ``benchmarks/cpu_facts.py``)."""
    k, s, width = x.shape
    at = torch.add(rows.view(1, -1), steps(k, s, rows.dtype, rows.device).view(k, 1))
    return x.view(k * s, width).index_select(0, at.view(-1)).view(k, -1, width)


def _default_ends(ends: Tensor | None, n: int, device: torch.device) -> Tensor:
    """``(2, n)``: the given ends, or by default ``0, ..., n - 1`` then ``n, ..., 2 n - 1``."""
    return torch.arange(2 * n, device=device).view(2, n) if ends is None else ends


def _arc_per_sample(cross: Tensor, x3: Tensor, x4: Tensor, nc: Tensor, s: Tensor, inv: Tensor) -> Tensor:
    """``(3, samples, arcs)``: each sample (a row of ``cross``) against each
    arc x3 -> x4 (columns of ``cross``; ``nc``, ``s``, ``inv``: the arcs'
    planes, see :func:`arc_planes`): x.x3, x.e2 of the arc's plane and the
    best corner or edge of x against the arc."""
    out = torch.empty(3, cross.shape[0], x3.shape[0], dtype=cross.dtype, device=cross.device)
    g3 = torch.index_select(cross, 1, x3, out=out[0])
    _best_end(g3, cross.index_select(1, x4), nc, s, inv, out[1], out[2])
    return out


def _best_end(g3: Tensor, g4: Tensor, nc: Tensor, s: Tensor, inv: Tensor, y: Tensor | None = None,
              best: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Points against arcs x3 -> x4, from their inner products ``g3``, ``g4``
    with the ends (the arcs' planes broadcast against them): each point's
    coordinate on the arc's e2 and its best corner or edge (into ``y``,
    ``best`` if given)."""
    y = torch.addcmul(g4, g3, nc, out=y).mul_(inv)
    best = torch.maximum(g3, g4, out=best)
    return y, torch.maximum(best, _edge_values(g3, y, s, nc), out=best)


#: Per candidate of :func:`arc_entry_optimum` (corners 13, 14, 23, 24; x1, x2
#: against the second arc; x3, x4 against the first; interior): which point
#: of the second pair's (x3, x4, a projection of x1, of x2, interior) and of
#: the first pair's (x1, x2, a projection of x3, of x4, interior) it uses, as
#: a row of the options of :func:`_unit_weights` (option * 2 + arc).
_OPTION_OF_CANDIDATE = ((0, 2, 0, 2, 4, 6, 0, 2, 8), (1, 1, 3, 3, 1, 3, 5, 7, 9))
#: Rows of ``fields`` for :func:`arc_entry_optimum`, per (end, arc): the
#: inner products of the other pair's first end (then of its second) with the
#: arc's first end, then with its second; the second arc, then the first.
_FIRST_END, _SECOND_END = (2, 2, 4, 3), (3, 4, 5, 5)


def arc_entry_optimum(fields: Tensor) -> tuple[Tensor, Tensor]:
    """The optimum of N arc couples, one each, with where it lies.

    ``fields`` ``(6, N)``: x3.x4, x1.x2, then x1.x3, x1.x4, x2.x3, x2.x4
    (unit ends). Returns the largest cosine ``(N,)`` and the weights
    ``(2, 2, N)`` of the optimal points q = b1 x3 + b2 x4 and p = a1 x1 + a2 x2,
    scaled so that p and q are unit vectors: ``[[b1, a1], [b2, a2]]``. At those
    weights the partial derivatives of the cosine are a_k b_l (cross terms),
    -cos a1 a2 and -cos b1 b2 (Danskin).

    The two arcs' work is stacked (the second arc, then the first), each
    arc's quantities ``(1, 2, N)`` against the other pair's two ends
    ``(2, 2, N)`` (end, arc).
    """
    n = fields.shape[1]
    c = fields[:2]
    neg_c, s, inv_s = arc_planes(c.unsqueeze(0))  # (1, 2, N)
    # The other pair's ends in each plane's basis: x1, x2 against (x3, e2_r),
    # x3, x4 against (x1, e2_q).
    w1 = fields.index_select(0, constant(_FIRST_END, torch.long, c.device)).view(2, 2, n)
    w2 = fields.index_select(0, constant(_SECOND_END, torch.long, c.device)).view(2, 2, n)
    w2.addcmul_(w1, neg_c).mul_(inv_s)
    nc_r, nc_q = neg_c.view(2, n)
    s_r, s_q = s.view(2, n)
    x1_e2r, x3_e2q = w2[0]  # the other pair's first end on each plane's e2
    m22 = torch.addcmul(w2[1, 0], x1_e2r, nc_q).mul_(inv_s[0, 1])  # e2_q.e2_r = (x2.e2_r - c_q x1.e2_r) / s_q
    candidates = torch.empty(9, n, dtype=c.dtype, device=c.device)  # corners, edges (arc, end), interior
    candidates[:4] = fields[2:]
    _edge_values(w1, w2, s, neg_c, out=candidates[4:8].view(2, 2, n).transpose(0, 1))
    _, u1, u2, v1, v2 = _interior(fields[2], x1_e2r, x3_e2q, m22, s_q, nc_q, s_r, nc_r, out=candidates[8])
    cos, which = first_max(candidates, torch.int32)
    return cos, _unit_weights(w1, w2, torch.stack((v1, u1, v2, u2)).view(2, 2, n), which, c, neg_c, inv_s)


def _unit_weights(w1: Tensor, w2: Tensor, interior: Tensor, which: Tensor, c: Tensor, neg_c: Tensor,
                  inv_s: Tensor) -> Tensor:
    """``(2, 2, N)``: per arc, the weights on its ends of the point the winning
    candidate ``which`` uses, scaled to a unit point: an end itself, or a
    computed direction (w1, w2) of the orthonormal basis, w1 x1 + w2 e2 =
    (w1 - w2 c / s) x1 + (w2 / s) x2. The computed directions: the
    projections of the other pair's two ends ``w1``, ``w2`` ``(2, 2, N)``
    (end, arc) and the interior one ``interior`` ``(2, 2, N)`` (w1 | w2, arc);
    ``c`` ``(2, N)``, ``neg_c``, ``inv_s`` ``(1, 2, N)``."""
    n = which.shape[0]
    # (weight, option, arc): the ends, then the computed directions. In this
    # order compile=True makes fewer kernels of it than in (weight, arc,
    # option) (a multi-similarity step: 141 against 145, ATen calls 601
    # against 645; benchmarks/bench_loop.py --only aten); eager, the same.
    options = torch.empty(2, 5, 2, n, dtype=c.dtype, device=c.device)
    options[:, :2] = constant(((((1.0,),), ((0.0,),)), (((0.0,),), ((1.0,),))), c.dtype, c.device)
    along_x1, along_x2 = options[:, 2:]  # (option, arc, N): projections of the other pair's ends, interior
    torch.mul(w2, inv_s, out=along_x2[:2])
    torch.mul(interior[1], inv_s, out=along_x2[2:])
    torch.addcmul(w1, along_x2[:2], neg_c, out=along_x1[:2])
    torch.addcmul(interior[0], along_x2[2:], neg_c, out=along_x1[2:])
    # Each arc's chosen option, as a column of options viewed as (2, 10 N)
    # (int32 positions: twice as fast to compute on the CPU as int64).
    option = take(constant(_OPTION_OF_CANDIDATE, torch.int32, which.device),
                  which.unsqueeze(0) + constant(((0,), (9,)), torch.int32, which.device))
    at = torch.add(steps(n, 1, torch.int32, which.device), option, alpha=n)
    w = options.view(2, 10 * n).index_select(1, at.view(-1)).view(2, 2, n)
    first, second = w
    norm_sq = (first * first).addcmul_(second, second).addcmul_(first * second, c, value=2)
    return w.mul_(norm_sq.rsqrt_())


def dot_grid_values(cross: Tensor) -> Tensor:
    """``(R, C)``: the largest dot product between the segments (a bilinear
    form: one of the four corners)."""
    R, C = cross.shape[0] // 2, cross.shape[1] // 2
    best = torch.maximum(cross[:, :C], cross[:, C:])
    return torch.maximum(best[:R], best[R:])


def _point_segment(yy: Tensor, y0: Tensor, y1: Tensor, n0: Tensor, k: Tensor, length: Tensor, inv: Tensor) -> Tensor:
    """Squared distance of points y to segments z0 -> z1, from y.y, y.z0, y.z1,
    z0.z0, k = z0.z0 - z0.z1, |z1 - z0|^2 and its inverse (0 for a point)."""
    along = (y1 - y0).add_(k)  # (y - z0).(z1 - z0)
    t = (along * inv).clamp_(0, 1)
    return (y0 * -2).add_(yy).add_(n0).addcmul_(t, torch.add(along, t * length, alpha=-0.5), value=-2)


def segment_grid_values(cross: Tensor, own_q: Tensor, own_r: Tensor, symmetric: bool = False,
                        ends_q: Tensor | None = None, ends_r: Tensor | None = None,
                        norms_q: Tensor | None = None, norms_r: Tensor | None = None) -> Tensor:
    """``(R, C)``: the smallest squared distance between the segment of each
    first pair and that of each second pair.

    ``own_q`` ``(3, R)``: each first pair's x1.x1, x1.x2, x2.x2; ``own_r``
    ``(3, C)``: x3.x3, x3.x4, x4.x4. ``cross``, ``ends_q``, ``ends_r`` and
    ``symmetric`` as for :func:`arc_grid_values`; ``norms_q`` ``(s_q,)`` and
    ``norms_r`` ``(s_r,)``: the samples' squared norms, needed with given
    ends (``norms_r`` only when not ``symmetric``). The distance is a convex
    quadratic on the unit square: its minimum is the interior stationary
    point when that lies strictly inside, otherwise on an edge, i.e. an end of
    one segment against the other segment (the corners are ends of edges),
    which, as for arcs, is found once per sample and segment.
    """
    R, C = own_q.shape[1], own_r.shape[1]
    if ends_q is None:
        ends_q, norms_q = _default_ends(None, R, cross.device), own_q[0::2].reshape(-1)
    if ends_r is None:
        ends_r, norms_r = _default_ends(None, C, cross.device), own_r[0::2].reshape(-1)
    x1, x2 = ends_q
    x3, x4 = ends_r
    g11, g12, g22 = (t.unsqueeze(1) for t in own_q)
    g33, g34, g44 = own_r
    a, c = (g11 + g22).sub_(g12, alpha=2), (g33 + g44).sub_(g34, alpha=2)  # |x2 - x1|^2, |x4 - x3|^2
    eps = torch.finfo(cross.dtype).eps
    tiny_q, tiny_r = eps * ((g11 + g22).abs() + 1), eps * ((g33 + g44).abs() + 1)  # degeneracy is relative
    inv_a = a.masked_fill(a <= tiny_q, float("inf")).reciprocal()  # 0 for a point
    inv_c = c.masked_fill(c <= tiny_r, float("inf")).reciprocal()
    # Each sample of the first side against each second segment (x.x3, x.x4,
    # the squared distance), read off at x1, x2: (3, 2R, C).
    at_ends = _rows_of_planes(_segment_per_sample(cross, x3, x4, norms_q, g33, g34, c, inv_c), ends_q.view(-1))
    g13, g23, g14, g24 = at_ends[0, :R], at_ends[0, R:], at_ends[1, :R], at_ends[1, R:]
    best = torch.minimum(at_ends[2, :R], at_ends[2, R:])
    if symmetric:  # x3, x4 against the first segment: the transpose
        best = torch.minimum(best, best.T)
    else:  # each sample of the second side against each first segment, read off at x3, x4
        ends = _point_segment(norms_r, cross.index_select(0, x1), cross.index_select(0, x2), g11, g11 - g12, a, inv_a)
        ends = ends.index_select(1, ends_r.view(-1))
        torch.minimum(best, torch.minimum(ends[:, :C], ends[:, C:]), out=best)
    # Interior: with u = x2 - x1, v = x4 - x3, w = x1 - x3, |w + s u - t v|^2 is
    # stationary at (s, t) below, where it equals |w|^2 + (u.w) s - (v.w) t.
    b = (g24 - g23).sub_(g14).add_(g13)  # u.v
    d = (g13 - g23).add_(g12 - g11)  # u.w
    e = (g14 - g13).add_(g33 - g34)  # v.w
    ac = a * c
    det = ac - b * b
    well_posed = det > 64 * eps * ac + tiny_q * tiny_r
    det = torch.where(well_posed, det, torch.ones_like(det))
    s = (b * e).sub_(c * d).div_(det)
    t = (a * e).sub_(b * d).div_(det)
    inside = well_posed & (torch.minimum(s, t) > 0) & (torch.maximum(s, t) < 1)
    interior = (g11 + g33).sub_(g13, alpha=2).addcmul_(d, s).addcmul_(e, t, value=-1)
    return torch.minimum(best, interior.masked_fill_(~inside, float("inf")), out=best)


def _segment_per_sample(cross: Tensor, x3: Tensor, x4: Tensor, norms: Tensor, g33: Tensor, g34: Tensor, c: Tensor,
                        inv_c: Tensor) -> Tensor:
    """``(3, samples, segments)``: each sample (a row of ``cross``, squared
    norms ``norms``) against each segment x3 -> x4 (columns of ``cross``;
    ``g33``, ``g34``, ``c`` = |x4 - x3|^2 and its inverse ``inv_c`` per
    segment): x.x3, x.x4 and the squared distance of x to the segment."""
    out = torch.empty(3, cross.shape[0], x3.shape[0], dtype=cross.dtype, device=cross.device)
    y3 = torch.index_select(cross, 1, x3, out=out[0])
    y4 = torch.index_select(cross, 1, x4, out=out[1])
    out[2] = _point_segment(norms.unsqueeze(1), y3, y4, g33, g33 - g34, c, inv_c)
    return out
