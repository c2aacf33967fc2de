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

from .gram import PairWeights, QuadGram


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
    g11, g12, g22, g33, g34, g44, g13, g14, g23, g24 = torch.broadcast_tensors(*q)
    eps = torch.finfo(g11.dtype).eps
    zero, one = torch.zeros_like(g11), torch.ones_like(g11)
    det_a = g11 * g22 - g12 * g12
    det_b = g33 * g44 - g34 * g34
    # sin^2 of the arc angle below this: treat the arc as its two endpoints.
    flat_a = det_a <= 1e3 * eps * g11 * g22
    flat_b = det_b <= 1e3 * eps * g33 * g44

    def project_a(y1: Tensor, y2: Tensor) -> tuple[Tensor, Tensor]:
        # adj(A) (y.x1, y.x2): the projection of y onto span(x1, x2) in weights.
        return g22 * y1 - g12 * y2, g11 * y2 - g12 * y1

    def project_b(y3: Tensor, y4: Tensor) -> tuple[Tensor, Tensor]:
        return g44 * y3 - g34 * y4, g33 * y4 - g34 * y3

    cands_a1, cands_a2, cands_b1, cands_b2, feasible = [], [], [], [], []

    def add(a1, a2, b1, b2, ok):
        cands_a1.append(a1), cands_a2.append(a2), cands_b1.append(b1), cands_b2.append(b2)
        feasible.append(ok)

    always = torch.ones_like(g11, dtype=torch.bool)
    # Corners.
    add(one, zero, one, zero, always)
    add(one, zero, zero, one, always)
    add(zero, one, one, zero, always)
    add(zero, one, zero, one, always)
    # Edges: an endpoint of one arc against its projection on the other.
    for ya, (a1, a2) in (((g13, g14), (one, zero)), ((g23, g24), (zero, one))):
        b1, b2 = project_b(*ya)
        add(a1, a2, b1, b2, ~flat_b & (b1 >= 0) & (b2 >= 0) & (b1 + b2 > 0))
    for yb, (b1, b2) in (((g13, g23), (one, zero)), ((g14, g24), (zero, one))):
        a1, a2 = project_a(*yb)
        add(a1, a2, b1, b2, ~flat_a & (a1 >= 0) & (a2 >= 0) & (a1 + a2 > 0))
    # Interior: top eigenvector of K = adj(A) C adj(B) C^T.
    # P = adj(A) C, R = adj(B) C^T, K = P R.
    p11, p12 = g22 * g13 - g12 * g23, g22 * g14 - g12 * g24
    p21, p22 = g11 * g23 - g12 * g13, g11 * g24 - g12 * g14
    r11, r12 = g44 * g13 - g34 * g14, g44 * g23 - g34 * g24
    r21, r22 = g33 * g14 - g34 * g13, g33 * g24 - g34 * g23
    k11, k12 = p11 * r11 + p12 * r21, p11 * r12 + p12 * r22
    k21, k22 = p21 * r11 + p22 * r21, p21 * r12 + p22 * r22
    half_tr = (k11 + k22) / 2
    mu = half_tr + torch.sqrt((half_tr * half_tr - (k11 * k22 - k12 * k21)).clamp_min(0))
    # Two formulas for the eigenvector; the longer one is the stable one.
    u1, u2 = k12, mu - k11
    v1, v2 = mu - k22, k21
    use_u = u1 * u1 + u2 * u2 >= v1 * v1 + v2 * v2
    a1, a2 = torch.where(use_u, u1, v1), torch.where(use_u, u2, v2)
    b1, b2 = r11 * a1 + r12 * a2, r21 * a1 + r22 * a2
    # The pair (l, adj(B) C^T l) has p.q >= 0, so only a common sign flip is allowed.
    same_sign = ((a1 >= 0) & (a2 >= 0) & (b1 >= 0) & (b2 >= 0)) | (
        (a1 <= 0) & (a2 <= 0) & (b1 <= 0) & (b2 <= 0)
    )
    nonzero = (a1.abs() + a2.abs() > 0) & (b1.abs() + b2.abs() > 0)
    add(a1.abs(), a2.abs(), b1.abs(), b2.abs(), ~flat_a & ~flat_b & same_sign & nonzero)

    w = PairWeights(*(torch.stack(c, -1) for c in (cands_a1, cands_a2, cands_b1, cands_b2)))
    ok = torch.stack(feasible, -1)
    q_ = QuadGram(*(g.unsqueeze(-1) for g in (g11, g12, g22, g33, g34, g44, g13, g14, g23, g24)))
    cos = arc_cosine(q_, w).masked_fill(~ok, -2.0)
    best = cos.argmax(-1, keepdim=True)
    return PairWeights(*(x.gather(-1, best).squeeze(-1) for x in w))


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
