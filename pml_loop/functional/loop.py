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

from .arcs import arc_angles, arc_cosine, arc_squared_chord, closest_arc, closest_arc_weights
from .gram import PairWeights, QuadGram, quad_gram
from .segments import closest_segment, closest_segment_params, segment_squared_distance, segment_weights

Geometry = Literal["segment", "arc", "dot"]
GEOMETRIES = ("segment", "arc", "dot")


@torch.no_grad()
def _closest_corner_weights(q: QuadGram) -> PairWeights:
    g13, g14, g23, g24 = torch.broadcast_tensors(q.g13, q.g14, q.g23, q.g24)
    best = torch.stack((g13, g14, g23, g24), -1).argmax(-1)
    first_a = best < 2
    first_b = best % 2 == 0
    one, zero = torch.ones_like(g13), torch.zeros_like(g13)
    return PairWeights(
        torch.where(first_a, one, zero), torch.where(first_a, zero, one),
        torch.where(first_b, one, zero), torch.where(first_b, zero, one),
    )


def _dot_at(q: QuadGram, w: PairWeights) -> Tensor:
    a1, a2, b1, b2 = w
    return a1 * b1 * q.g13 + a1 * b2 * q.g14 + a2 * b1 * q.g23 + a2 * b2 * q.g24


@torch.no_grad()
def optimal_weights(q: QuadGram, geometry: Geometry) -> PairWeights:
    """Weights of the optimal points on each pair (see :class:`PairWeights`)."""
    if geometry == "segment":
        return segment_weights(*closest_segment_params(q))
    if geometry == "arc":
        return closest_arc_weights(q)
    if geometry == "dot":
        return _closest_corner_weights(q)
    raise ValueError(f"unknown geometry {geometry!r}; expected one of {GEOMETRIES}")


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
def search_badness(q: QuadGram, geometry: Geometry) -> tuple[Tensor, PairWeights]:
    """Optimal weights, and a value to *minimise* across pair combinations (the
    searches' own closed-form optimum; measured exactly later). No gradient."""
    if geometry == "segment":
        sq, st = closest_segment(q)
        return sq, segment_weights(*st)
    if geometry == "arc":
        cos, w = closest_arc(q)
        return -cos, w
    w = optimal_weights(q, geometry)
    return -measure_at(q, w, geometry), w


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
