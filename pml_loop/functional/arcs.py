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

from .gram import PairWeights, QuadGram, select_best


def _norm_sq(w1: Tensor, w2: Tensor, g11: Tensor, g12: Tensor, g22: Tensor) -> Tensor:
    return w1 * w1 * g11 + 2 * w1 * w2 * g12 + w2 * w2 * g22


def arc_cosine(q: QuadGram, w: PairWeights) -> Tensor:
    """Cosine between ``normalize(a1 x1 + a2 x2)`` and ``normalize(b1 x3 + b2 x4)``.

    Differentiable in ``q`` at fixed weights (Danskin); scale-invariant in the
    inputs, so it is correct for inputs that are only nearly unit.
    """
    a1, a2, b1, b2 = w
    num = a1 * b1 * q.g13 + a1 * b2 * q.g14 + a2 * b1 * q.g23 + a2 * b2 * q.g24
    na = _norm_sq(a1, a2, q.g11, q.g12, q.g22)
    nb = _norm_sq(b1, b2, q.g33, q.g34, q.g44)
    tiny = torch.finfo(num.dtype).tiny
    return (num * torch.rsqrt((na * nb).clamp_min(tiny))).clamp(-1, 1)


def arc_squared_chord(q: QuadGram, w: PairWeights) -> Tensor:
    """|p - q|^2 = 2 - 2 p.q for the unit points given by the weights."""
    return (2 - 2 * arc_cosine(q, w)).clamp_min(0)


@torch.no_grad()
def closest_arc_weights(q: QuadGram) -> PairWeights:
    """Conic weights of the closest points of the two arcs (largest p.q).

    Shapes: every field of the result has the broadcast shape of ``q``.
    """
    return closest_arc(q)[1]


@torch.no_grad()
def closest_arc(q: QuadGram) -> tuple[Tensor, PairWeights]:
    """Largest cosine between the two arcs, and the weights of its points.

    Candidates are ranked by closed-form cosines that take the inputs as unit
    vectors (9 values, no per-candidate normalisation); the weights are valid
    for any inputs and are measured exactly by :func:`arc_cosine`.
    """
    g12, g34, g13, g14, g23, g24 = torch.broadcast_tensors(q.g12, q.g34, q.g13, q.g14, q.g23, q.g24)
    eps = torch.finfo(g12.dtype).eps
    det_a = 1 - g12 * g12  # sin^2 of each arc's angle
    det_b = 1 - g34 * g34
    # Below this, treat the arc as its two endpoints (see module docstring).
    flat_a, flat_b = det_a <= 1e3 * eps, det_b <= 1e3 * eps
    inv_a = det_a.masked_fill(flat_a, float("inf")).reciprocal()  # 0 on flat arcs
    inv_b = det_b.masked_fill(flat_b, float("inf")).reciprocal()
    none = -2.0  # below any cosine: marks an infeasible candidate

    def projection(y1: Tensor, y2: Tensor, c: Tensor, inv_det: Tensor, flat: Tensor):
        # Weights adj (y.e1, y.e2) of the projection of unit y onto the arc's
        # plane, and its cosine with y: sqrt(y^T adj y / det).
        w1, w2 = y1 - c * y2, y2 - c * y1
        off = flat | (torch.minimum(w1, w2) < 0) | (w1 + w2 <= 0)
        cos = ((y1 * w1 + y2 * w2) * inv_det).clamp_min(0).sqrt()
        return w1, w2, cos.masked_fill_(off, none)

    # Edges: x1 or x2 against arc B; x3 or x4 against arc A.
    e1 = projection(g13, g14, g34, inv_b, flat_b)
    e2 = projection(g23, g24, g34, inv_b, flat_b)
    e3 = projection(g13, g23, g12, inv_a, flat_a)
    e4 = projection(g14, g24, g12, inv_a, flat_a)
    # Interior: top eigenvector of K = adj(A) C adj(B) C^T = P R.
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
    b1, b2 = r11 * a1 + r12 * a2, r21 * a1 + r22 * a2
    # (l, adj(B) C^T l) has p.q >= 0, so only a common sign flip is allowed.
    lo = torch.minimum(torch.minimum(a1, a2), torch.minimum(b1, b2))
    hi = torch.maximum(torch.maximum(a1, a2), torch.maximum(b1, b2))
    off = flat_a | flat_b | ((lo < 0) & (hi > 0)) | (a1.abs() + a2.abs() == 0) | (b1.abs() + b2.abs() == 0)
    interior = (mu * inv_a * inv_b).clamp_min(0).sqrt().masked_fill_(off, none)

    cos, (a1, a2, b1, b2) = select_best(
        (g13, g14, g23, g24, e1[2], e2[2], e3[2], e4[2], interior),
        (
            (1.0, 0.0, 1.0, 0.0), (1.0, 0.0, 0.0, 1.0), (0.0, 1.0, 1.0, 0.0), (0.0, 1.0, 0.0, 1.0),
            (1.0, 0.0, e1[0], e1[1]), (0.0, 1.0, e2[0], e2[1]),
            (e3[0], e3[1], 1.0, 0.0), (e4[0], e4[1], 0.0, 1.0),
            (a1.abs(), a2.abs(), b1.abs(), b2.abs()),
        ),
        largest=True,
    )
    # The weights are defined up to scale; projections can be tiny (1e-20) and
    # would make the measured cosine's gradient overflow. Make each pair sum to 1.
    sa = (a1 + a2).clamp_min(torch.finfo(a1.dtype).tiny)
    sb = (b1 + b2).clamp_min(torch.finfo(b1.dtype).tiny)
    return cos, PairWeights(a1 / sa, a2 / sa, b1 / sb, b2 / sb)


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
