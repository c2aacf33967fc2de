"""Independent references for the tests: brute force on explicit d-dimensional points.

Nothing here uses pml_loop: a grid over the parameters, refined by a bounded
quasi-Newton minimiser (scipy), on points built in the ambient space.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize


def _grid_then_refine(f, lo, hi, n=25):
    g1 = np.linspace(lo[0], hi[0], n)
    g2 = np.linspace(lo[1], hi[1], n)
    vals = np.array([[f((u, v)) for v in g2] for u in g1])
    i, j = np.unravel_index(vals.argmin(), vals.shape)
    best = vals[i, j]
    res = minimize(f, [g1[i], g2[j]], bounds=list(zip(lo, hi)), method="L-BFGS-B",
                   options=dict(ftol=1e-16, gtol=1e-13, maxiter=500))
    return min(best, float(res.fun)), (res.x if res.fun <= best else (g1[i], g2[j]))


def segment_distance(x1, x2, x3, x4):
    """min |p(s) - q(t)| over the unit square, points built in R^d."""
    def f(z):
        s, t = z
        return float(np.sum(((1 - s) * x1 + s * x2 - (1 - t) * x3 - t * x4) ** 2))
    val, _ = _grid_then_refine(f, (0, 0), (1, 1), n=11)
    return np.sqrt(max(val, 0.0))


def _arc(x1, x2):
    c = float(np.clip(x1 @ x2, -1, 1))
    e2 = x2 - c * x1
    n = np.linalg.norm(e2)
    if n < 1e-12:  # degenerate: only the endpoints count
        return None
    return np.arccos(c), e2 / n


def arc_distance(x1, x2, x3, x4):
    """min chord |p(a) - q(b)| over the two shortest geodesic arcs, in R^d."""
    arcs = (_arc(x1, x2), _arc(x3, x4))
    ends = [[x1, x2], [x3, x4]]
    if arcs[0] is None or arcs[1] is None:
        # Brute force over endpoints of the degenerate arc and a dense sweep of the other.
        best = min(np.sum((a - b) ** 2) for a in ends[0] for b in ends[1])
        for k in (0, 1):
            if arcs[k] is not None:
                th, e2 = arcs[k]
                base = ends[k][0]
                for a in np.linspace(0, th, 4001):
                    p = np.cos(a) * base + np.sin(a) * e2
                    best = min(best, min(np.sum((p - y) ** 2) for y in ends[1 - k]))
        return np.sqrt(max(best, 0.0))
    (t1, f1), (t2, f2) = arcs

    def f(z):
        a, b = z
        p = np.cos(a) * x1 + np.sin(a) * f1
        q = np.cos(b) * x3 + np.sin(b) * f2
        return float(np.sum((p - q) ** 2))
    val, _ = _grid_then_refine(f, (0, 0), (t1, t2), n=25)  # not convex: grid for the basin
    # The grid's basin can miss an optimum on an edge (one point at an end):
    # sweep each edge densely as a 1-D problem too.
    sweep = np.linspace(0, 1, 4001)[:, None]
    arc_a = np.cos(sweep * t1) * x1 + np.sin(sweep * t1) * f1
    arc_b = np.cos(sweep * t2) * x3 + np.sin(sweep * t2) * f2
    for end, other in ((x1, arc_b), (x2, arc_b), (x3, arc_a), (x4, arc_a)):
        val = min(val, float(((other - end) ** 2).sum(1).min()))
    return np.sqrt(max(val, 0.0))


def naive_loop_matrix(emb, labels, ref, ref_labels, sphere):
    """Per-quadruple reference of the LoOp matrix: for every negative entry (i, j),
    min over partners p of i (in emb) and q of j (in ref) of the pair distance.
    Positive entries: plain Euclidean distance. Arrays in numpy float64."""
    dist = arc_distance if sphere else segment_distance
    n, m = len(emb), len(ref)
    out = np.linalg.norm(emb[:, None] - ref[None], axis=-1)
    for i in range(n):
        ps = [p for p in range(n) if p != i and labels[p] == labels[i]] or [i]
        for j in range(m):
            if labels[i] == ref_labels[j]:
                continue
            qs = [q for q in range(m) if q != j and ref_labels[q] == ref_labels[j]] or [j]
            out[i, j] = min(dist(emb[i], emb[p], ref[j], ref[q]) for p in ps for q in qs)
    return out
