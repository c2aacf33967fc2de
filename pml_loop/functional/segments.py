"""Closest points between two straight segments, from inner products only.

p(s) = (1-s) x1 + s x2, q(t) = (1-t) x3 + t x4, s, t in [0, 1].
|p(s) - q(t)|^2 = f + a s^2 + c t^2 - 2 b s t + 2 d s - 2 e t is a convex
quadratic on the unit square, so its minimum is the interior stationary point
when that is feasible, otherwise the best of the four edge minima (each a
clamped 1-D solution; the corners are among them).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .gram import PairWeights, QuadGram


def segment_coefficients(q: QuadGram) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Coefficients (a, b, c, d, e, f) of the quadratic above.

    With u = x2 - x1, v = x4 - x3, w = x1 - x3: a = u.u, b = u.v, c = v.v,
    d = u.w, e = v.w, f = w.w.
    """
    a = q.g22 - 2 * q.g12 + q.g11
    c = q.g44 - 2 * q.g34 + q.g33
    b = q.g24 - q.g23 - q.g14 + q.g13
    d = q.g12 - q.g23 - q.g11 + q.g13
    e = q.g14 - q.g34 - q.g13 + q.g33
    f = q.g11 - 2 * q.g13 + q.g33
    return a, b, c, d, e, f


def _safe_ratio(num: Tensor, den: Tensor, tiny: Tensor) -> Tensor:
    # A zero-length segment has every s optimal; 0 keeps it on its first end.
    ok = den > tiny
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def segment_candidates(q: QuadGram) -> tuple[Tensor, Tensor, Tensor]:
    """The 5 candidate minimisers (4 clamped edges, the interior point when it is
    feasible): ``s``, ``t`` and the squared distance at each, all ``(5, *S)``.

    The fields of ``q`` broadcast to ``S`` (a column of first pairs against a
    row of second pairs works).
    """
    a, b, c, d, e, f = segment_coefficients(q)
    eps = torch.finfo(a.dtype).eps
    scale = (q.g11 + q.g22 + q.g33 + q.g44).abs() + 1  # degeneracy is relative
    tiny = eps * scale
    # Edge candidates: fix one parameter at 0 or 1, clamp the other's optimum.
    zero, one = torch.zeros_like(b), torch.ones_like(b)
    s_edges = [zero, one, _safe_ratio(-d, a, tiny).clamp(0, 1), _safe_ratio(b - d, a, tiny).clamp(0, 1)]
    t_edges = [_safe_ratio(e, c, tiny).clamp(0, 1), _safe_ratio(e + b, c, tiny).clamp(0, 1), zero, one]
    # Interior stationary point: only when the quadratic is strictly convex
    # (non-parallel segments) and it falls inside the square.
    det = a * c - b * b
    well_posed = det > 64 * eps * (a * c) + tiny * tiny
    safe_det = torch.where(well_posed, det, torch.ones_like(det))
    s_in = (b * e - c * d) / safe_det
    t_in = (a * e - b * d) / safe_det
    inside = well_posed & (s_in >= 0) & (s_in <= 1) & (t_in >= 0) & (t_in <= 1)
    s = torch.stack(torch.broadcast_tensors(*s_edges, torch.where(inside, s_in, zero)))
    t = torch.stack(torch.broadcast_tensors(*t_edges, torch.where(inside, t_in, zero)))
    sq = a * s * s + c * t * t - 2 * b * s * t + 2 * d * s - 2 * e * t + f
    # An interior point outside the square is no candidate (never a tie to break).
    sq[4].masked_fill_(~inside, float("inf"))
    return s, t, sq


def segment_weights(s: Tensor, t: Tensor) -> PairWeights:
    return PairWeights(1 - s, s, 1 - t, t)


def segment_squared_distance(q: QuadGram, w: PairWeights) -> Tensor:
    """|w.a1 x1 + w.a2 x2 - w.b1 x3 - w.b2 x4|^2 at fixed weights, differentiable in ``q``."""
    return measure_raw_segment(q, w).clamp_min(0)


def measure_raw_segment(q: QuadGram, w: PairWeights) -> Tensor:
    """The same squared distance from inner products, before clamping rounding below 0."""
    a1, a2, b1, b2 = w
    return (
        a1 * a1 * q.g11 + 2 * a1 * a2 * q.g12 + a2 * a2 * q.g22
        + b1 * b1 * q.g33 + 2 * b1 * b2 * q.g34 + b2 * b2 * q.g44
        - 2 * (a1 * b1 * q.g13 + a1 * b2 * q.g14 + a2 * b1 * q.g23 + a2 * b2 * q.g24)
    )
