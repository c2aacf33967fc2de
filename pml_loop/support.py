"""Which PML losses LoOp can wrap, and why the others cannot.

LoOp changes the negative entries of the distance matrix a loss reads through
its ``distance``; a loss qualifies when it compares samples with samples that
way. Every class exported by ``pytorch_metric_learning.losses`` is listed here
(a test walks over them, so a new PML release's losses get classified).
"""
from __future__ import annotations

#: Losses that read a sample-to-sample matrix through their distance.
SUPPORTED = (
    "CircleLoss", "ContrastiveLoss", "DynamicSoftMarginLoss", "FastAPLoss",
    "GeneralizedLiftedStructureLoss", "HistogramLoss", "InstanceLoss", "IntraPairVarianceLoss",
    "LiftedStructureLoss", "MarginLoss", "MultiSimilarityLoss", "NCALoss", "NPairsLoss",
    "NTXentLoss", "PNPLoss", "RankedListLoss", "SmoothAPLoss", "SupConLoss",
    "TripletMarginLoss", "TupletMarginLoss",
    "CrossBatchMemory",  # its memory becomes the reference set
)

_PROXIES = ("compares embeddings with learned class weights or proxies, not with other "
            "samples: there is no negative pair of samples for LoOp to replace")
_OWN_MATHS = ("computes its similarities from the embeddings itself, not through its "
              "distance, so LoOp cannot reach them")

#: Losses LoOp refuses at construction, with the reason.
REFUSED = {
    "ArcFaceLoss": _PROXIES, "CosFaceLoss": _PROXIES, "LargeMarginSoftmaxLoss": _PROXIES,
    "ManifoldLoss": _PROXIES, "NormalizedSoftmaxLoss": _PROXIES, "P2SGradLoss": _PROXIES,
    "ProxyAnchorLoss": _PROXIES, "ProxyNCALoss": _PROXIES, "SoftTripleLoss": _PROXIES,
    "SphereFaceLoss": _PROXIES, "SubCenterArcFaceLoss": _PROXIES,
    "AngularLoss": _OWN_MATHS, "ThresholdConsistentMarginLoss": _OWN_MATHS,
    "SignalToNoiseRatioContrastiveLoss": ("measures the SNR distance (a variance ratio), which has "
                                          "no segment or arc between points"),
    "VICRegLoss": "is a label-free self-supervised loss: LoOp needs classes to form positive pairs",
    "SelfSupervisedLoss": ("makes its own labels (a sample's only positive is its augmented view); "
                           "LoOp needs labelled classes"),
    "MultipleLosses": "is a container: wrap each loss, MultipleLosses([LoOpLoss(a), LoOpLoss(b)])",
}

#: Base classes and mixins the module exports (not losses).
NOT_LOSSES = ("BaseLossWrapper", "BaseMetricLossFunction", "EmbeddingRegularizerMixin",
              "GenericPairLoss", "WeightRegularizerMixin")


def refusal_reason(loss) -> str | None:
    """Why LoOp cannot wrap ``loss`` (an instance), or ``None`` if it can.

    The most specific PML class in the loss's MRO decides, so a subclass of a
    supported loss is supported and ``ProxyNCALoss`` is refused though it
    derives from ``NCALoss``. A class unknown to PML (your own loss) is
    accepted if it has a distance.
    """
    for cls in type(loss).__mro__:
        if not cls.__module__.startswith("pytorch_metric_learning."):
            continue
        name = cls.__name__
        if name in REFUSED:
            return f"{name} {REFUSED[name]}"
        if name in SUPPORTED:
            return None
    if not hasattr(loss, "distance"):
        return f"{type(loss).__name__} has no distance matrix for LoOp to change"
    return None
