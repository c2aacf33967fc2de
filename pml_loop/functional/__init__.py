"""Pure LoOp geometry on tensors (no PML): the functional core.

``loop_distance`` / ``loop_params`` work on explicit quadruples; the rest works
on inner products (:class:`QuadGram`) so batches need only their Gram matrix.
"""
from .arcs import arc_angles, arc_cosine, arc_squared_chord
from .gram import PairWeights, QuadGram, quad_gram
from .loop import (
    GEOMETRIES,
    Geometry,
    best_candidate,
    candidate_scores,
    candidate_weights,
    closest_arc_weights,
    closest_segment_params,
    loop_distance,
    loop_params,
    measure_at,
    optimal_weights,
    safe_sqrt,
)
from .segments import segment_squared_distance, segment_weights

__all__ = [
    "GEOMETRIES", "Geometry", "PairWeights", "QuadGram", "arc_angles", "arc_cosine",
    "arc_squared_chord", "best_candidate", "candidate_scores", "candidate_weights",
    "closest_arc_weights", "closest_segment_params", "loop_distance",
    "loop_params", "measure_at", "optimal_weights", "quad_gram", "safe_sqrt",
    "segment_squared_distance", "segment_weights",
]
