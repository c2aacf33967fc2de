"""LoOp under mixed precision: autocast (bfloat16; float16 on CUDA) and
half-precision embeddings. The geometry runs in float32; the matrix comes back
in the dtype the base distance gives, close to the float32 value."""
import warnings

import pytest
import torch
from pytorch_metric_learning import losses
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance

from pml_loop import LoOpDistance, LoOpLoss
from pml_loop.distance import working_dtype

LOSSES = {
    "TripletMarginLoss": lambda d: losses.TripletMarginLoss(margin=0.2, distance=d),
    "MultiSimilarityLoss": lambda d: losses.MultiSimilarityLoss(distance=d),
    "ContrastiveLoss": lambda d: losses.ContrastiveLoss(distance=d),
}
# MultiSimilarityLoss is a similarity loss: give it similarities (its default).
DISTANCES = {
    "CosineSimilarity": CosineSimilarity,
    "LpDistance(normalize=False)": lambda: LpDistance(normalize_embeddings=False),
    "LpDistance": LpDistance,
}
CUDA = pytest.param("cuda", marks=pytest.mark.cuda)
# (device, half dtype): bfloat16 everywhere, float16 where autocast is meant for it.
PRECISIONS = [("cpu", torch.bfloat16), pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda),
              pytest.param("cuda", torch.float16, marks=pytest.mark.cuda)]
# Relative accuracy of the result: the inputs (half inputs) or the output are
# rounded once to 8 (bfloat16) or 11 (float16) significant bits.
RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _batch(device, seed=0, classes=6, per_class=4, d=16, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    emb = scale * torch.randn(classes * per_class, d, generator=g)
    return emb.to(device), torch.arange(classes).repeat_interleave(per_class).to(device)


def _plain_dtype(base, emb, half, autocast):
    """What PML's own distance returns for these inputs (None if it has no kernel)."""
    try:
        with torch.autocast(emb.device.type, dtype=half, enabled=autocast):
            return base(emb if autocast else emb.to(half)).dtype
    except RuntimeError:  # NotImplementedError included; torch 2.13: no CPU bfloat16 cdist
        return None


@pytest.mark.parametrize("device, half", PRECISIONS)
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "half_inputs"])
@pytest.mark.parametrize("dist", list(DISTANCES) + ["DotProductSimilarity"])
def test_matrix_dtype_value_and_bound(device, half, autocast, dist):
    base = DotProductSimilarity(normalize_embeddings=False) if dist == "DotProductSimilarity" else DISTANCES[dist]()
    emb, labels = _batch(device)
    inputs = emb if autocast else emb.to(half)
    loop = LoOpDistance(base)
    with torch.autocast(device, dtype=half, enabled=autocast):
        mat = loop.loop_mat(inputs, labels)
    # Reference: float32 (float64 for the bound) on the same numbers the half run saw.
    exact = inputs.to(torch.float64)
    ref = LoOpDistance(base).loop_mat(exact, labels)
    plain = base(exact)
    expected = _plain_dtype(base, emb, half, autocast)
    assert mat.dtype == (expected or half), (mat.dtype, expected)
    assert torch.isfinite(mat).all()
    scale = float(plain.abs().max())
    assert torch.allclose(mat.double(), ref, rtol=2 * RTOL[half] if mat.dtype == half else 1e-5,
                          atol=2 * RTOL[half] * scale if mat.dtype == half else 1e-5 * scale)
    # LoOp is never farther than the plain distance (never less similar), up
    # to the output's rounding: the bound holds before the cast, which is monotonic.
    neg = labels[:, None] != labels[None, :]
    slack = (RTOL[half] if mat.dtype == half else 1e-6) * scale
    gap = (mat.double() - plain) if not base.is_inverted else (plain - mat.double())
    assert gap[neg].max() <= slack
    # and the LoOp entries actually moved (else the test could not fail)
    assert (gap[neg] < -slack).any()


@pytest.mark.parametrize("device, half", PRECISIONS)
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("dist", list(DISTANCES))
def test_loss_under_autocast_matches_float32(device, half, loss_name, dist):
    emb, labels = _batch(device)
    make = lambda: LOSSES[loss_name](DISTANCES[dist]())  # noqa: E731
    x32 = emb.clone().requires_grad_()
    ref = LoOpLoss(make())(x32, labels)
    ref.backward()
    x = emb.clone().requires_grad_()
    with torch.autocast(device, dtype=half):
        value = LoOpLoss(make())(x, labels)
        plain = make()(emb, labels)  # the dtype the plain loss has under the same autocast
    value.backward()
    assert value.dtype == plain.dtype
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    assert x.grad.dtype == torch.float32  # autocast keeps the leaf's dtype
    assert abs(value.item() - ref.item()) <= 4 * RTOL[half] * max(1.0, abs(ref.item()))
    cos = torch.nn.functional.cosine_similarity(x.grad.flatten(), x32.grad.flatten(), dim=0)
    assert cos > 0.98


@pytest.mark.parametrize("device, half", PRECISIONS)
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("dist", list(DISTANCES))
def test_loss_with_half_embeddings(device, half, loss_name, dist):
    emb, labels = _batch(device)
    x = emb.to(half).requires_grad_()
    value = LoOpLoss(LOSSES[loss_name](DISTANCES[dist]()))(x, labels)
    value.backward()
    # Reference on the same (rounded) numbers in float32.
    x32 = emb.to(half).float().requires_grad_()
    ref = LoOpLoss(LOSSES[loss_name](DISTANCES[dist]()))(x32, labels)
    ref.backward()
    assert torch.isfinite(value)
    assert x.grad.dtype == half and torch.isfinite(x.grad).all()
    assert abs(value.item() - ref.item()) <= 4 * RTOL[half] * max(1.0, abs(ref.item()))
    cos = torch.nn.functional.cosine_similarity(x.grad.float().flatten(), x32.grad.flatten(), dim=0)
    assert cos > 0.98


def test_float64_and_float32_are_not_touched():
    emb, labels = _batch("cpu")
    for dtype in (torch.float32, torch.float64):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast never casts float64
            mat = LoOpDistance(LpDistance()).loop_mat(emb.to(dtype), labels)
        assert mat.dtype == dtype
    assert working_dtype(emb.bfloat16(), emb.half()) == torch.float32
    assert working_dtype(emb.bfloat16(), emb.double()) == torch.float64


def test_geometry_runs_in_float32_under_autocast(monkeypatch, backend):
    """The search and the measure see float32 Gram blocks, never half ones."""
    import pml_loop.distance as distance_module

    seen = []
    real_measure = distance_module.loop_entries

    def spy(real):
        def search(g, *args, **kwargs):
            seen.append(("search", g.qr.dtype, torch.is_autocast_enabled("cpu")))
            return real(g, *args, **kwargs)
        return search

    def measure(base, g, *args, **kwargs):
        seen.append(("measure", g.qr.dtype, torch.is_autocast_enabled("cpu")))
        return real_measure(base, g, *args, **kwargs)

    for name in ("search_winners", "numba_winners"):  # whichever backend runs
        monkeypatch.setattr(distance_module, name, spy(getattr(distance_module, name)))
    monkeypatch.setattr(distance_module, "loop_entries", measure)
    emb, labels = _batch("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        LoOpLoss(losses.MultiSimilarityLoss(), backend=backend)(emb.bfloat16(), labels)
    assert seen == [("search", torch.float32, False), ("measure", torch.float32, False)]


@pytest.mark.parametrize("device, half", [("cpu", torch.bfloat16), ("cpu", torch.float16),
                                          pytest.param("cuda", torch.float16, marks=pytest.mark.cuda)])
def test_overflowing_half_embeddings_give_nan_loss_and_a_warning(device, half):
    """What a float16 overflow looks like to the loss: NaN and a warning, no
    exception, so GradScaler can skip the step."""
    emb, labels = _batch(device)
    x = emb.to(half)
    x[3, 0] = float("inf")
    x.requires_grad_()
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        value = LoOpLoss(losses.TripletMarginLoss())(x, labels)
    value.backward()  # no exception either way
    assert torch.isnan(value)


def test_half_batch_against_float32_memory():
    """CrossBatchMemory keeps float32; a bfloat16 batch against it works."""
    emb, labels = _batch("cpu")
    loss = LoOpLoss(losses.CrossBatchMemory(losses.ContrastiveLoss(), 16, memory_size=48))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(2):
            x = emb.bfloat16().requires_grad_()
            value = loss(x, labels)
            value.backward()
    assert torch.isfinite(value) and x.grad.dtype == torch.bfloat16
