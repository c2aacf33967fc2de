"""LoOp geometry dispatch and the public functional API.

Three geometries, each a (search, measure) couple on :class:`QuadGram`:

- ``"segment"``: straight segments, measure = squared Euclidean distance;
- ``"arc"``: geodesic arcs on the unit sphere, measure = cosine (larger is closer);
- ``"dot"``: segments under the plain dot product, measure = dot product.
  p.q is bilinear in (s, t), so its maximum is at a corner.

The search runs without gradient; the measure is then evaluated with gradient
at the fixed optimum, which is the exact gradient of the optimum wherever the
minimiser is unique (Danskin's theorem).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .arcs import (
    arc_angles,
    arc_candidate_cosines,
    arc_candidate_weights,
    arc_cosine,
    arc_squared_chord,
    arc_terms,
)
from .gram import PairWeights, QuadGram, first_max, quad_gram
from .segments import measure_raw_segment, segment_candidates, segment_squared_distance, segment_weights

Geometry = Literal["segment", "arc", "dot"]
GEOMETRIES = ("segment", "arc", "dot")


def _dot_at(q: QuadGram, w: PairWeights) -> Tensor:
    a1, a2, b1, b2 = w
    return a1 * b1 * q.g13 + a1 * b2 * q.g14 + a2 * b1 * q.g23 + a2 * b2 * q.g24


@torch.no_grad()
def candidate_scores(q: QuadGram, geometry: Geometry) -> Tensor:
    """``(k, *S)``: the closed-form optimum of each candidate of the geometry,
    larger is better (minus the squared distance for segments; the cosine,
    resp. dot product, for arcs and dot). The best one is the LoOp optimum; the
    batch search ranks pair combinations by it. No gradient."""
    if geometry == "segment":
        return -segment_candidates(q)[2]
    if geometry == "arc":
        return arc_candidate_cosines(q.g12, q.g34, q.g13, q.g14, q.g23, q.g24)
    if geometry == "dot":
        return torch.stack(torch.broadcast_tensors(q.g13, q.g14, q.g23, q.g24))
    raise ValueError(f"unknown geometry {geometry!r}; expected one of {GEOMETRIES}")


@torch.no_grad()
def best_candidate(q: QuadGram, geometry: Geometry) -> tuple[Tensor, Tensor]:
    """The best of :func:`candidate_scores` and which candidate it is, each of
    the broadcast shape of ``q`` (for arcs the first of tied ones on the CPU,
    see :func:`~pml_loop.functional.gram.first_max`)."""
    scores = candidate_scores(q, geometry)
    return first_max(scores) if geometry == "arc" else scores.max(0)


@torch.no_grad()
def candidate_weights(q: QuadGram, which: Tensor, geometry: Geometry) -> PairWeights:
    """Weights (see :class:`PairWeights`) of candidate ``which`` (an index into
    :func:`candidate_scores`), shape of ``which``."""
    if geometry == "segment":
        s, t, _ = segment_candidates(q)
        at = which.unsqueeze(0)
        return segment_weights(s.gather(0, at).squeeze(0), t.gather(0, at).squeeze(0))
    if geometry == "arc":
        return arc_candidate_weights(q.g12, q.g34, q.g13, q.g14, q.g23, q.g24, which)
    if geometry == "dot":  # corners 13, 14, 23, 24
        first_a = (which < 2).to(q.g13.dtype)
        first_b = (which % 2 == 0).to(q.g13.dtype)
        return PairWeights(first_a, 1 - first_a, first_b, 1 - first_b)
    raise ValueError(f"unknown geometry {geometry!r}; expected one of {GEOMETRIES}")


@torch.no_grad()
def optimal_weights(q: QuadGram, geometry: Geometry) -> PairWeights:
    """Weights of the optimal points on each pair (see :class:`PairWeights`)."""
    return candidate_weights(q, best_candidate(q, geometry)[1], geometry)


def closest_arc_weights(q: QuadGram) -> PairWeights:
    """Conic weights of the closest points of two arcs (largest p.q)."""
    return optimal_weights(q, "arc")


def closest_segment_params(q: QuadGram) -> tuple[Tensor, Tensor]:
    """Optimal (s, t) in [0, 1]^2 of two segments; shapes broadcast of ``q``."""
    w = optimal_weights(q, "segment")
    return w.a2, w.b2


def measure_at(q: QuadGram, w: PairWeights, geometry: Geometry) -> Tensor:
    """Squared distance ("segment"), cosine ("arc") or dot product ("dot") at ``w``."""
    if geometry == "segment":
        return segment_squared_distance(q, w)
    if geometry == "arc":
        return arc_cosine(q, w)
    if geometry == "dot":
        return _dot_at(q, w)
    raise ValueError(f"unknown geometry {geometry!r}; expected one of {GEOMETRIES}")


@torch.no_grad()
def measure_partials(q: QuadGram, w: PairWeights, geometry: Geometry) -> QuadGram:
    """Partial derivatives of :func:`measure_at` with respect to each field of
    ``q`` at fixed weights (what its autograd gives, without keeping a graph);
    fields that the measure does not read are ``None``."""
    a1, a2, b1, b2 = w
    if geometry == "dot":
        return QuadGram(None, None, None, None, None, None, a1 * b1, a1 * b2, a2 * b1, a2 * b2)
    if geometry == "segment":
        m = (measure_raw_segment(q, w) >= 0).to(a1.dtype)  # clamp_min(0) passes the gradient there
        ma1, ma2, mb1, mb2 = m * a1, m * a2, m * b1, m * b2
        return QuadGram(ma1 * a1, 2 * ma1 * a2, ma2 * a2, mb1 * b1, 2 * mb1 * b2, mb2 * b2,
                        -2 * ma1 * b1, -2 * ma1 * b2, -2 * ma2 * b1, -2 * ma2 * b2)
    if geometry == "arc":
        num, na, nb = arc_terms(q, w)
        prod = na * nb
        tiny = torch.finfo(num.dtype).tiny
        r = torch.rsqrt(prod.clamp_min(tiny))
        raw = num * r
        inside = (raw.abs() <= 1).to(num.dtype)  # clamp(-1, 1) passes the gradient there
        dn = inside * r  # d cos / d num
        # d cos / d na = -num r^3 nb / 2 (0 where the product was clamped)
        dr = inside * (prod >= tiny).to(num.dtype) * (-0.5 * num * r * r * r)
        da, db = dr * nb, dr * na
        return QuadGram(da * a1 * a1, 2 * da * a1 * a2, da * a2 * a2, db * b1 * b1, 2 * db * b1 * b2, db * b2 * b2,
                        dn * a1 * b1, dn * a1 * b2, dn * a2 * b1, dn * a2 * b2)
    raise ValueError(f"unknown geometry {geometry!r}; expected one of {GEOMETRIES}")


def _check_inputs(xs: tuple[Tensor, ...], sphere: bool) -> None:
    names = ("x1", "x2", "x3", "x4")
    for name, x in zip(names, xs):
        if not torch.is_tensor(x):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"{name} must have shape (N, d), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise ValueError(f"x1..x4 must share one shape (N, d), got {[tuple(x.shape) for x in xs]}")
    for name, x in zip(names, xs):
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if sphere:
        tol = 10 * torch.finfo(xs[0].dtype).eps ** 0.5
        for name, x in zip(names, xs):
            dev = (x.detach().norm(dim=1) - 1).abs()
            if len(dev) and dev.max() > tol:
                raise ValueError(
                    f"sphere=True needs unit vectors, but {name} has a row of norm "
                    f"{1 + float(dev.max()):.6g} (tolerance {tol:.1e}); normalise first, "
                    "e.g. torch.nn.functional.normalize(x, dim=1)"
                )


def _prepare(x1, x2, x3, x4, sphere: bool) -> tuple[QuadGram, PairWeights, Geometry]:
    xs = (x1, x2, x3, x4)
    _check_inputs(xs, sphere)
    geometry: Geometry = "arc" if sphere else "segment"
    q = quad_gram(*xs)
    return q, optimal_weights(q.detach(), geometry), geometry


def loop_distance(x1: Tensor, x2: Tensor, x3: Tensor, x4: Tensor, sphere: bool) -> Tensor:
    """Optimal hard negative distance of N quadruples.

    Args:
        x1, x2: ``(N, d)``, the ends of the first segment / arc (a positive pair).
        x3, x4: ``(N, d)``, the ends of the second segment / arc (a negative pair).
        sphere: False: Euclidean distance between the segments x1-x2 and x3-x4.
            True: chord distance between the shortest geodesic arcs x1-x2 and
            x3-x4 of the unit sphere (inputs must be unit vectors).

    Returns:
        ``(N,)`` distances, differentiable with respect to all four inputs.
    """
    q, w, geometry = _prepare(x1, x2, x3, x4, sphere)
    sq = segment_squared_distance(q, w) if geometry == "segment" else arc_squared_chord(q, w)
    return safe_sqrt(sq)


def loop_params(x1: Tensor, x2: Tensor, x3: Tensor, x4: Tensor, sphere: bool) -> tuple[Tensor, Tensor]:
    """Where the optimum lies, for users and plots (no gradient).

    Returns ``(s, t)`` in [0, 1] with p = (1-s) x1 + s x2, q = (1-t) x3 + t x4
    (segments), or angles ``(a, b)`` in radians from x1 towards x2 and from x3
    towards x4 along the arcs (sphere). Each ``(N,)``.
    """
    q, w, geometry = _prepare(x1, x2, x3, x4, sphere)
    q = q.detach()
    if geometry == "segment":
        return w.a2, w.b2
    return arc_angles(q, w)


def safe_sqrt(sq: Tensor) -> Tensor:
    """sqrt with a finite gradient at 0 (clamped *before* the root, see ECOSYSTEM-NOTES)."""
    return sq.clamp_min(torch.finfo(sq.dtype).tiny ** 0.5).sqrt()
