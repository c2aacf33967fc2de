"""Closest points between two geodesic arcs on the unit sphere, from inner products.

A point of the shortest arc x1 -> x2 is ``normalize(l1 x1 + l2 x2)`` with
l1, l2 >= 0, so "lies on the arc" is two sign tests and needs no angle.
The chord |p - q| is smallest where the cosine p.q is largest. p.q is a
bilinear form on the two circles, not concave on the rectangle of angles, so
the maximum is one of 9 candidates, all found with products and square roots:

- the 4 corners (endpoint against endpoint);
- the 4 edges: one point fixed at an endpoint y, the best point of the other
  arc is the normalised projection of y onto that arc's plane, adj(A) (y.x1, y.x2),
  when it lies on the arc (otherwise a corner wins);
- the interior: the top singular pair of p.q, i.e. the top eigenvector of the
  2 x 2 matrix adj(A) C adj(B) C^T (C the cross Gram block), with the partner
  weights adj(B) C^T l. The other singular pair is a saddle and never wins.

An arc with (near) coincident or antipodal ends has no well-defined plane; it
keeps only its two endpoints, which gives finite values and gradients.
Conditioning: from inner products alone, the plane of a nearly antipodal arc
(angle pi - e) is known only to about eps / e^2, so its cosines carry that
error; arcs of embeddings of one class are far from that regime.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .gram import PairWeights, QuadGram, constant


def _norm_sq(w1: Tensor, w2: Tensor, g11: Tensor, g12: Tensor, g22: Tensor) -> Tensor:
    return w1 * w1 * g11 + 2 * w1 * w2 * g12 + w2 * w2 * g22


def arc_cosine(q: QuadGram, w: PairWeights) -> Tensor:
    """Cosine between ``normalize(a1 x1 + a2 x2)`` and ``normalize(b1 x3 + b2 x4)``.

    Differentiable in ``q`` at fixed weights (Danskin); scale-invariant in the
    inputs, so it is correct for inputs that are only nearly unit.
    """
    num, na, nb = arc_terms(q, w)
    tiny = torch.finfo(num.dtype).tiny
    return (num * torch.rsqrt((na * nb).clamp_min(tiny))).clamp(-1, 1)


def arc_terms(q: QuadGram, w: PairWeights) -> tuple[Tensor, Tensor, Tensor]:
    """p.q before normalisation and the squared norms of the two weighted points."""
    a1, a2, b1, b2 = w
    num = a1 * b1 * q.g13 + a1 * b2 * q.g14 + a2 * b1 * q.g23 + a2 * b2 * q.g24
    return num, _norm_sq(a1, a2, q.g11, q.g12, q.g22), _norm_sq(b1, b2, q.g33, q.g34, q.g44)


def arc_squared_chord(q: QuadGram, w: PairWeights) -> Tensor:
    """|p - q|^2 = 2 - 2 p.q for the unit points given by the weights."""
    return (2 - 2 * arc_cosine(q, w)).clamp_min(0)


#: Below any cosine: marks an infeasible candidate.
_NONE = -4.0


def _planes(g12: Tensor) -> tuple[Tensor, Tensor]:
    """Per arc: 1 / sin^2 of its angle (0 for a flat arc: coincident or
    antipodal ends, see the module docstring) and a ranking penalty that
    removes the candidates needing its plane."""
    det = 1 - g12 * g12
    flat = det <= 1e3 * torch.finfo(det.dtype).eps
    return det.masked_fill(flat, float("inf")).reciprocal(), flat.to(det.dtype) * _NONE


def _edge_weights(y1: Tensor, y2: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Weights adj (y.e1, y.e2) of the projection of unit y onto the plane of an
    arc with ends e1, e2 (c = e1.e2); the point is on the arc iff both >= 0."""
    return y1 - c * y2, y2 - c * y1


def _edge_cosine(y1: Tensor, y2: Tensor, w: tuple[Tensor, Tensor], inv_det: Tensor, penalty: Tensor) -> Tensor:
    # cos(y, projection) = sqrt(y^T adj y / det); a point off the arc (a
    # negative weight) drops below every cosine. sign() rather than a mask and
    # a select: on the CPU those cost several times an arithmetic pass.
    cos = ((y1 * w[0] + y2 * w[1]) * inv_det).clamp_min(0).sqrt()
    off = torch.minimum(w[0], w[1]).clamp_max(0).sign()  # -1 off the arc, else 0
    return torch.add(cos + penalty, off, alpha=-_NONE)


def _interior(g12, g34, g13, g14, g23, g24) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Top eigenvalue mu of K = adj(A) C adj(B) C^T = P R, its eigenvector l and
    the partner weights R l: the interior stationary pair (up to a common sign)."""
    p11, p12 = g13 - g12 * g23, g14 - g12 * g24
    p21, p22 = g23 - g12 * g13, g24 - g12 * g14
    r11, r12 = g13 - g34 * g14, g23 - g34 * g24
    r21, r22 = g14 - g34 * g13, g24 - g34 * g23
    k11, k12 = p11 * r11 + p12 * r21, p11 * r12 + p12 * r22
    k21, k22 = p21 * r11 + p22 * r21, p21 * r12 + p22 * r22
    half_tr = (k11 + k22) / 2
    mu = half_tr + (half_tr * half_tr - (k11 * k22 - k12 * k21)).clamp_min(0).sqrt()
    # Two formulas for the eigenvector; the longer one is the stable one.
    u1, u2, v1, v2 = k12, mu - k11, mu - k22, k21
    use_u = u1 * u1 + u2 * u2 >= v1 * v1 + v2 * v2
    a1, a2 = torch.where(use_u, u1, v1), torch.where(use_u, u2, v2)
    return mu, (a1, a2, r11 * a1 + r12 * a2, r21 * a1 + r22 * a2)


def arc_candidate_groups(g12: Tensor, g34: Tensor, g13: Tensor, g14: Tensor, g23: Tensor,
                         g24: Tensor) -> list[Tensor]:
    """The closed-form cosine of each candidate (see the module docstring), in
    groups computed together: corners ``(4, *S)``, edges on arc B ``(2, *S)``,
    edges on arc A ``(2, *S)``, interior ``(1, *S)`` (candidates 0-8 in order).
    Ranking only: infeasible candidates score below -1.

    The inputs broadcast to a common shape ``S``; ``g12`` may be a column and
    ``g34`` a row of a grid of pair combinations.
    """
    inv_a, pen_a = _planes(g12)
    inv_b, pen_b = _planes(g34)
    none = g13.new_full((), _NONE)  # a tensor: a Python scalar costs conversions per call
    corners = torch.stack(torch.broadcast_tensors(g13, g14, g23, g24))
    # Edges, two at a time (half the operations): x1, x2 against arc B, whose
    # inner products with x3, x4 are (g13, g14), (g23, g24); x3, x4 against
    # arc A: (g13, g23), (g14, g24).
    yb1, yb2 = corners[0::2], corners[1::2]
    ya1, ya2 = corners[:2], corners[2:]
    e12 = _edge_cosine(yb1, yb2, _edge_weights(yb1, yb2, g34), inv_b, pen_b)
    e34 = _edge_cosine(ya1, ya2, _edge_weights(ya1, ya2, g12), inv_a, pen_a)
    mu, (a1, a2, b1, b2) = _interior(g12, g34, g13, g14, g23, g24)
    # (l, R l) has p.q >= 0, so only a common sign flip is allowed; a zero
    # vector has no direction.
    lo = torch.minimum(torch.minimum(a1, a2), torch.minimum(b1, b2))
    hi = torch.maximum(torch.maximum(a1, a2), torch.maximum(b1, b2))
    off = (lo * hi < 0) | (a1 * a1 + a2 * a2 == 0) | (b1 * b1 + b2 * b2 == 0)
    interior = torch.where(off, none, (mu * inv_a * inv_b).clamp_min(0).sqrt() + (pen_a + pen_b))
    return [corners, e12, e34, interior.expand_as(corners[0]).unsqueeze(0)]


def arc_candidate_cosines(g12: Tensor, g34: Tensor, g13: Tensor, g14: Tensor, g23: Tensor, g24: Tensor) -> Tensor:
    """``(9, *S)``: the candidates of :func:`arc_candidate_groups` in one tensor."""
    return torch.cat(arc_candidate_groups(g12, g34, g13, g14, g23, g24))


#: Weights (a1, a2, b1, b2) of the corner candidates and the fixed endpoint of
#: the edge candidates (see :func:`arc_candidate_weights`); 0 where computed.
_FIXED_WEIGHTS = (
    (1, 1, 0, 0, 1, 0, 0, 0, 0),
    (0, 0, 1, 1, 0, 1, 0, 0, 0),
    (1, 0, 1, 0, 0, 0, 1, 0, 0),
    (0, 1, 0, 1, 0, 0, 0, 1, 0),
)


def arc_candidate_weights(g12: Tensor, g34: Tensor, g13: Tensor, g14: Tensor, g23: Tensor, g24: Tensor,
                          which: Tensor) -> PairWeights:
    """Conic weights of candidate ``which`` (0-3 corners, 4-7 edges, 8 interior;
    the order of :func:`arc_candidate_cosines`), each pair summing to 1."""
    e1 = _edge_weights(g13, g14, g34)
    e2 = _edge_weights(g23, g24, g34)
    e3 = _edge_weights(g13, g23, g12)
    e4 = _edge_weights(g14, g24, g12)
    _, interior = _interior(g12, g34, g13, g14, g23, g24)
    fixed = constant(_FIXED_WEIGHTS, g13.dtype, g13.device)
    is_ = [which == k for k in range(4, 9)]
    # The first pair's weights are computed for candidates 6, 7 (edges on arc A),
    # the second pair's for 4, 5 (edges on arc B); both for the interior (8).
    computed = ((6, e3[0], 7, e4[0]), (6, e3[1], 7, e4[1]), (4, e1[0], 5, e2[0]), (4, e1[1], 5, e2[1]))
    w = []
    for k, (c1, x1, c2, x2) in enumerate(computed):
        v = fixed[k].take(which)
        v = torch.where(is_[c1 - 4], x1, v)
        v = torch.where(is_[c2 - 4], x2, v)
        w.append(torch.where(is_[4], interior[k].abs(), v).clamp_min(0))
    # Defined up to scale; projections can be tiny (1e-20) and would make the
    # measured cosine's gradient overflow. Make each pair sum to 1.
    tiny = torch.finfo(g13.dtype).tiny
    sa, sb = (w[0] + w[1]).clamp_min(tiny), (w[2] + w[3]).clamp_min(tiny)
    return PairWeights(w[0] / sa, w[1] / sa, w[2] / sb, w[3] / sb)


def arc_angles(q: QuadGram, w: PairWeights) -> tuple[Tensor, Tensor]:
    """Angles (a, b) of the optimal points from x1 along arc 1 and from x3 along arc 2."""
    a1, a2, b1, b2 = w
    cos_a = (a1 * q.g11 + a2 * q.g12) * torch.rsqrt(
        (_norm_sq(a1, a2, q.g11, q.g12, q.g22) * q.g11).clamp_min(torch.finfo(a1.dtype).tiny)
    )
    cos_b = (b1 * q.g33 + b2 * q.g34) * torch.rsqrt(
        (_norm_sq(b1, b2, q.g33, q.g34, q.g44) * q.g33).clamp_min(torch.finfo(b1.dtype).tiny)
    )
    return torch.arccos(cos_a.clamp(-1, 1)), torch.arccos(cos_b.clamp(-1, 1))
