"""LoOpLoss / LoOpMiner / LoOpReducer inside PML: every listed loss and wrapper."""
import copy
import io
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.distances import (
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
    SNRDistance,
)
from pytorch_metric_learning.utils import common_functions as c_f

from pml_loop import LoOpDistance, LoOpLoss, LoOpMiner, LoOpReducer


def _batch(seed=0, classes=8, per_class=4, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(classes * per_class, d, generator=g, dtype=dtype)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return emb, labels


LOSSES = {
    "TripletMarginLoss": lambda: losses.TripletMarginLoss(margin=0.2),
    "TripletMarginLoss(swap)": lambda: losses.TripletMarginLoss(margin=0.2, swap=True),
    "ContrastiveLoss": lambda: losses.ContrastiveLoss(),
    "MultiSimilarityLoss": lambda: losses.MultiSimilarityLoss(),
    "GeneralizedLiftedStructureLoss": lambda: losses.GeneralizedLiftedStructureLoss(),
    "LiftedStructureLoss": lambda: losses.LiftedStructureLoss(),
    "SupConLoss": lambda: losses.SupConLoss(),
    "CircleLoss": lambda: losses.CircleLoss(),
    "NTXentLoss": lambda: losses.NTXentLoss(),
    "TupletMarginLoss": lambda: losses.TupletMarginLoss(),
    "MarginLoss": lambda: losses.MarginLoss(),
    "FastAPLoss": lambda: losses.FastAPLoss(),
    "NPairsLoss": lambda: losses.NPairsLoss(),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_forward_backward(name):
    emb, labels = _batch()
    emb.requires_grad_()
    loss = LoOpLoss(LOSSES[name]())
    value = loss(emb, labels)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(LOSSES))
def test_batch_of_singletons_gives_the_plain_loss(name):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(12, 8, generator=g)
    labels = torch.arange(12)  # no positives anywhere: every pair is a point
    torch.manual_seed(0)
    plain = LOSSES[name]()(emb, labels)
    torch.manual_seed(0)
    wrapped = LoOpLoss(LOSSES[name]())(emb, labels)
    assert torch.allclose(plain, wrapped, atol=1e-5)


@pytest.mark.parametrize("distance", [
    LpDistance(), LpDistance(normalize_embeddings=False), LpDistance(power=2),
    CosineSimilarity(), DotProductSimilarity(), DotProductSimilarity(normalize_embeddings=False),
])
def test_each_distance_form(distance):
    emb, labels = _batch(2)
    emb.requires_grad_()
    plain = losses.ContrastiveLoss(distance=copy.deepcopy(distance))
    wrapped = LoOpLoss(losses.ContrastiveLoss(distance=copy.deepcopy(distance)))
    v = wrapped(emb, labels)
    v.backward()
    assert torch.isfinite(emb.grad).all()
    assert v >= plain(emb, labels) - 1e-6


@pytest.mark.parametrize("make", [lambda: losses.TripletMarginLoss(margin=0.5), lambda: losses.ContrastiveLoss(neg_margin=2.0)])
def test_loop_never_lowers_triplet_and_contrastive(make):
    for seed in range(5):
        emb, labels = _batch(seed, d=6)
        assert LoOpLoss(make())(emb, labels) >= make()(emb, labels) - 1e-6


def test_triplet_loss_uses_loop_negative_distance_exactly():
    emb, labels = _batch(3, classes=4, per_class=3, d=5, dtype=torch.float64)
    a, p, n = torch.tensor([0]), torch.tensor([1]), torch.tensor([4])
    loss = LoOpLoss(losses.TripletMarginLoss(margin=10.0, reducer=None))
    value = loss(emb, labels, indices_tuple=(a, p, n))
    mat = LoOpDistance(LpDistance()).loop_mat(emb, labels)
    assert value.item() == pytest.approx((mat[0, 1] - mat[0, 4] + 10.0).item())


@pytest.mark.parametrize("miner", [
    miners.MultiSimilarityMiner(), miners.TripletMarginMiner(margin=0.5), miners.BatchHardMiner(),
    miners.PairMarginMiner(),
])
def test_indices_tuple_from_pml_miners(miner):
    emb, labels = _batch(4)
    emb.requires_grad_()
    loss = LoOpLoss(losses.TripletMarginLoss() if len(miner(emb, labels)) == 3 else losses.ContrastiveLoss())
    loss(emb, labels, miner(emb, labels)).backward()
    assert torch.isfinite(emb.grad).all()


def test_ref_emb_and_ref_labels():
    emb, labels = _batch(5, classes=4, per_class=2)
    ref, ref_labels = _batch(6, classes=6, per_class=3)
    emb.requires_grad_()
    value = LoOpLoss(losses.ContrastiveLoss())(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    value.backward()
    plain = losses.ContrastiveLoss()(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    assert torch.isfinite(emb.grad).all() and value >= plain - 1e-6


def test_cross_batch_memory():
    cbm = losses.CrossBatchMemory(losses.ContrastiveLoss(), embedding_size=16, memory_size=64,
                                  miner=LoOpMiner(margin=0.5))
    inner, miner_distance = cbm.loss, cbm.miner.distance
    plain = copy.deepcopy(cbm)
    loss = LoOpLoss(cbm)
    for seed in range(4):
        emb, labels = _batch(seed)
        emb.requires_grad_()
        value = loss(emb, labels)
        value.backward()
        assert torch.isfinite(emb.grad).all()
        reference = plain(emb.detach(), labels)
        if seed > 0:  # the memory holds earlier batches: LoOp moves its negatives
            assert not torch.allclose(value, reference)
    assert cbm.has_been_filled
    # The memory, its loss and its miner are given back as they were.
    assert cbm.loss is inner and type(cbm.loss) is losses.ContrastiveLoss
    assert cbm.miner.distance is miner_distance and cbm.loss.distance.__class__ is LpDistance


def test_miner_shares_the_search_with_the_loss(monkeypatch, backend):
    import pml_loop.distance as dist_mod
    calls = []
    for name in ("search_winners", "numba_winners"):
        original = getattr(dist_mod, name)
        monkeypatch.setattr(dist_mod, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    emb, labels = _batch(7)
    LoOpLoss(losses.TripletMarginLoss(), miner=LoOpMiner(type_of_tuples="semihard", backend=backend),
             backend=backend)(emb, labels)
    assert calls == ["search_winners" if backend == "torch" else "numba_winners"]


def test_loop_miner_outputs():
    emb, labels = _batch(8, d=4)
    a, p, n = LoOpMiner(margin=0.1)(emb, labels)
    mat = LoOpDistance(LpDistance()).loop_mat(emb, labels)
    assert (mat[a, n] - mat[a, p] <= 0.1 + 1e-6).all()
    assert (labels[a] == labels[p]).all() and (labels[a] != labels[n]).all()
    hard = LoOpMiner(margin=0.1, type_of_tuples="hard")(emb, labels)
    assert len(hard[0]) <= len(a)
    a1, pos, a2, neg = LoOpMiner(margin=0.1, output="pairs")(emb, labels)
    assert (labels[a1] == labels[pos]).all() and (labels[a2] != labels[neg]).all()
    qa, qp, qn, qq = LoOpMiner(margin=0.1, output="quadruplets")(emb, labels)
    assert (labels[qa] == labels[qp]).all() and (labels[qn] == labels[qq]).all()
    assert (labels[qa] != labels[qn]).all()
    from pml_loop.functional import loop_distance
    x = F.normalize(emb, dim=1)
    d = loop_distance(x[qa], x[qp], x[qn], x[qq], sphere=True)
    assert torch.allclose(d, mat[qa, qn], atol=1e-4)
    # A LoOpMiner also serves a plain PML loss.
    losses.TripletMarginLoss()(emb, labels, (a, p, n))


def test_loop_reducer_modes():
    emb, labels = _batch(9)
    emb.requires_grad_()
    values = {}
    for mode in ("hardest", "mean", "soft"):
        loss = LoOpLoss(losses.TripletMarginLoss(margin=0.5), reducer=LoOpReducer(mode=mode))
        values[mode] = loss(emb, labels)
        values[mode].backward()
        assert torch.isfinite(emb.grad).all()
    assert values["hardest"] >= values["mean"]
    assert values["soft"] >= values["hardest"] - 1e-6  # log-sum-exp bounds the max from above
    # Per positive pair, "hardest" is the max over negatives of the triplet loss.
    loss = losses.TripletMarginLoss(margin=0.5, reducer=LoOpReducer(mode="hardest", positives="hardest"))
    mat = LpDistance()(emb.detach())
    expected = []
    for i in range(len(labels)):
        pos = (labels == labels[i]) & (torch.arange(len(labels)) != i)
        neg = labels != labels[i]
        expected.append(F.relu(mat[i][pos].max() - mat[i][neg].min() + 0.5))
    assert loss(emb.detach(), labels).item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-5)
    # Contrastive gives pos_pair / neg_pair losses: the reducer groups negatives per anchor.
    LoOpLoss(losses.ContrastiveLoss(), reducer=LoOpReducer(mode="soft"))(emb, labels).backward()


def test_save_deepcopy_and_record_keeper(tmp_path):
    import record_keeper as rk
    loss = LoOpLoss(losses.MultiSimilarityLoss(), miner=LoOpMiner(distance=CosineSimilarity()), reducer=None)
    emb, labels = _batch(10)
    before = loss(emb, labels)
    clone = copy.deepcopy(loss)
    buf = io.BytesIO()
    torch.save(loss, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.allclose(clone(emb, labels), before) and torch.allclose(loaded(emb, labels), before)
    keeper = rk.RecordKeeper(record_writer=rk.RecordWriter(str(tmp_path)),
                             attributes_to_search_for=c_f.list_of_recordable_attributes_list_names())
    keeper.update_records({"metric_loss": loss}, 1, recursive_types=[torch.nn.Module])
    recorded = keeper.get_record("metric_loss_LoOpLoss")
    assert recorded["num_negative_entries"] == {1: len(labels) * (len(labels) - 4)}
    assert recorded["avg_base_minus_loop"][1] > 0
    keeper.save_records()
    assert (tmp_path / "logs.db").exists()


def test_distributed_loss_wrapper_in_a_real_process_group(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "rdzv")), nprocs=2, join=True)


def _distributed_worker(rank, world_size, rdzv):
    import torch.distributed as dist
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world_size)
    try:
        emb, labels = _batch(rank, classes=4, per_class=2)
        emb.requires_grad_()
        for efficient in (False, True):
            DistributedLossWrapper(LoOpLoss(losses.TripletMarginLoss()), efficient=efficient)(emb, labels).backward()
            assert torch.isfinite(emb.grad).all()
    finally:
        dist.destroy_process_group()


def test_errors_name_the_problem():
    emb, labels = _batch(11)
    with pytest.raises(ValueError, match="SignalToNoise"):
        LoOpLoss(losses.SignalToNoiseRatioContrastiveLoss())
    with pytest.raises(ValueError, match="LoOp supports"):
        LoOpLoss(losses.ContrastiveLoss(distance=SNRDistance()))
    with pytest.raises(ValueError, match="p=1"):
        LoOpLoss(losses.ContrastiveLoss(distance=LpDistance(p=1)))
    with pytest.raises(ValueError, match="labels"):
        LoOpLoss(losses.ContrastiveLoss())(emb)
    with pytest.raises(ValueError, match="Number of embeddings"):
        LoOpLoss(losses.ContrastiveLoss())(emb, labels[:-1])
    with pytest.raises(ValueError, match="shape"):
        LoOpLoss(losses.ContrastiveLoss())(emb[None], labels)
    bad = emb.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        LoOpLoss(losses.ContrastiveLoss(), nonfinite="raise")(bad, labels)
    with pytest.raises(TypeError, match="embedding_regularizer.*wrapped loss"):
        LoOpLoss(losses.ContrastiveLoss(), embedding_regularizer=object())
    with pytest.raises(ValueError, match="ProxyAnchorLoss compares embeddings with learned"):
        LoOpLoss(losses.ProxyAnchorLoss(num_classes=4, embedding_size=8))
    with pytest.raises(ValueError, match="distance: loss .*CosineSimilarity.*miner .*LpDistance"):
        LoOpLoss(losses.MultiSimilarityLoss(), miner=LoOpMiner())
    with pytest.raises(ValueError, match="partners"):
        LoOpLoss(losses.TripletMarginLoss(), miner=LoOpMiner(partners="hardest"))
    with pytest.raises(ValueError, match="nonfinite"):
        LoOpDistance(nonfinite="skip")
    with pytest.raises(ValueError, match="chunk_elements"):
        LoOpDistance(chunk_elements=0)
    with pytest.raises(RuntimeError, match="needs labels"):
        LoOpDistance()(emb)
    with pytest.raises(ValueError, match="partners"):
        LoOpDistance(partners="some")
    with pytest.raises(ValueError, match="mode"):
        LoOpReducer(mode="max")
    with pytest.raises(ValueError, match="quadruplets"):
        LoOpLoss(losses.TripletMarginLoss(), miner=LoOpMiner(output="quadruplets"))


@pytest.mark.parametrize("layout", ["zeros", "duplicates and antipodes"])
def test_degenerate_batches_have_finite_gradients(layout, backend):
    """Pairs whose ends coincide, are antipodal (a flat arc) or are zero
    vectors: finite values and gradients on every backend."""
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(10, 4, generator=g)
    if layout == "zeros":
        emb[:4] = 0
    else:
        emb[1] = emb[0]  # a pair of one point
        emb[3] = -emb[2]  # an antipodal pair
        emb[5] = emb[0]  # a negative equal to a positive pair's end
    emb.requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    for d in (LpDistance(), LpDistance(normalize_embeddings=False), CosineSimilarity()):
        emb.grad = None
        value = LoOpLoss(losses.ContrastiveLoss(distance=d), backend=backend)(emb, labels)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(emb.grad).all(), (layout, d)


def test_compiled_search_matches_eager():
    """compile=True (torch.compile'd kernels) gives the same loss and gradient,
    and really ran compiled: a silent fallback to eager fails the test."""
    import pml_loop.batch_loop as bl
    import pml_loop.functional.compiled as compiled
    emb, labels = _batch(12, d=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the fallback warns: make it fail here
        _compare_compiled(emb, labels)
    assert {bl._block_values, bl._entry_partials} <= set(compiled._compiled)
    assert not compiled._failed


def _compare_compiled(emb, labels):
    for distance in (LpDistance(), LpDistance(normalize_embeddings=False)):
        results = []
        for compile in (False, True):
            x = emb.clone().requires_grad_()
            value = LoOpLoss(losses.ContrastiveLoss(distance=copy.deepcopy(distance)), compile=compile)(x, labels)
            value.backward()
            results.append((value.detach(), x.grad))
        assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
        assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_the_wrapped_loss_is_left_as_given():
    emb, labels = _batch(13)
    base = losses.TripletMarginLoss(margin=0.1)
    distance, reducer = base.distance, base.reducer
    wrapped = LoOpLoss(base, reducer=LoOpReducer())
    first = wrapped(emb, labels)
    # The loss still computes the plain loss, with its own distance and reducer.
    assert base.distance is distance and base.reducer is reducer
    assert torch.allclose(base(emb, labels), losses.TripletMarginLoss(margin=0.1)(emb, labels))
    # Later changes to it (a margin schedule, another distance) reach the wrapper.
    base.margin = 0.5
    assert torch.allclose(wrapped(emb, labels),
                          LoOpLoss(losses.TripletMarginLoss(margin=0.5), reducer=LoOpReducer())(emb, labels))
    assert not torch.allclose(wrapped(emb, labels), first)
    base.distance = LpDistance(normalize_embeddings=False)
    unnormalised = LoOpLoss(losses.TripletMarginLoss(margin=0.5, distance=LpDistance(normalize_embeddings=False)),
                            reducer=LoOpReducer())
    assert torch.allclose(wrapped(emb, labels), unnormalised(emb, labels))
    # A LoOpMiner passed in keeps its own distance object.
    miner = LoOpMiner()
    own = miner.distance
    LoOpLoss(losses.TripletMarginLoss(), miner=miner)(emb, labels)
    assert miner.distance is own


def _instance(cls):
    """An instance of a PML loss class, filling required arguments with small values."""
    import inspect
    fills = dict(num_classes=4, embedding_size=8, l=8, descriptors_dim=8, margin=0.4, Tn=10,
                 loss=losses.TripletMarginLoss(), losses=[losses.TripletMarginLoss()])
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: fills.get(k) for k, p in params.items()
              if k != "self" and p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD}
    try:
        return cls(**kwargs)
    except (TypeError, KeyError):  # required arguments hidden behind *args (e.g. CosFaceLoss)
        return cls(num_classes=4, embedding_size=8, **kwargs)


def _pml_loss_classes():
    import inspect
    return [name for name in dir(losses) if inspect.isclass(getattr(losses, name))]


def test_every_pml_loss_class_is_classified():
    from pml_loop.support import NOT_LOSSES, REFUSED, SUPPORTED
    for name in _pml_loss_classes():
        assert (name in SUPPORTED) + (name in REFUSED) + (name in NOT_LOSSES) == 1, (
            f"{name} (new in this PML release?) must be listed in pml_loop/support.py")


@pytest.mark.parametrize("name", sorted(set(_pml_loss_classes()) & set(__import__("pml_loop.support").support.REFUSED)))
def test_refused_losses_say_why_at_construction(name):
    from pml_loop.support import REFUSED
    with pytest.raises(ValueError, match=re.escape(REFUSED[name][:30])):
        LoOpLoss(_instance(getattr(losses, name)))


@pytest.mark.parametrize("name", sorted(set(__import__("pml_loop.support").support.SUPPORTED) - {"CrossBatchMemory"}))
def test_supported_losses_move_negatives_only(name):
    """LoOp changes the value where the batch has negatives and positives, and
    leaves it exactly where no sample has a positive partner."""
    cls = getattr(losses, name)
    emb, labels = _batch(14, classes=6, per_class=4, d=8, dtype=torch.float64)
    emb.requires_grad_()
    torch.manual_seed(0)
    plain = _instance(cls)(emb, labels)
    torch.manual_seed(0)
    looped = LoOpLoss(_instance(cls))(emb, labels)
    looped.backward()
    assert torch.isfinite(looped) and torch.isfinite(emb.grad).all()
    assert not torch.allclose(looped, plain), f"LoOp did not change {name}"
    if name in ("NPairsLoss",):  # pairs are (anchor, positive) rows: no singleton form
        return
    single = torch.arange(len(labels))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "every sample is its own class", when the loss asks
        torch.manual_seed(0)
        looped = LoOpLoss(_instance(cls))(emb, single)
    torch.manual_seed(0)
    assert torch.allclose(looped, _instance(cls)(emb, single), atol=1e-10, equal_nan=True)


def test_batches_that_cannot_work_as_meant_warn_once():
    emb, _ = _batch(18)
    loss = LoOpLoss(losses.ContrastiveLoss())
    with pytest.warns(UserWarning, match="its own class") as record:
        loss(emb, torch.arange(len(emb)))
        loss(emb + 1, torch.arange(len(emb)))
    assert sum("its own class" in str(w.message) for w in record) == 1


def test_nonfinite_embeddings_give_a_nan_loss_and_a_warning_like_pml():
    emb, labels = _batch(15)
    emb[3, 1] = float("nan")
    emb.requires_grad_()
    with pytest.warns(RuntimeWarning, match="NaN"):
        value = LoOpLoss(losses.TripletMarginLoss())(emb, labels)
    assert torch.isnan(value)
    value.backward()  # a GradScaler would now skip the step; nothing raised


def test_shared_search_follows_in_place_edits():
    """Between a miner and a loss an embedding edited in place is a new batch:
    the shared search must not hand out the old winners."""
    emb, labels = _batch(16, d=6)
    dist = LoOpDistance(LpDistance())
    with dist.sharing():
        dist.loop_mat(emb, labels)
        emb.mul_(torch.linspace(0.2, 3.0, emb.shape[1]))  # in place: same tensor object
        after = dist.loop_mat(emb, labels)
    fresh = LoOpDistance(LpDistance()).loop_mat(emb, labels)
    assert torch.allclose(after, fresh, atol=1e-6)


def test_one_class_batch_costs_no_search(monkeypatch):
    import pml_loop.distance as dist_mod
    monkeypatch.setattr(dist_mod, "search_winners", lambda *a, **k: pytest.fail("searched a one-class batch"))
    emb, labels = _batch(17, classes=1, per_class=12)
    with pytest.warns(UserWarning, match="single class"):
        value = LoOpLoss(losses.MultiSimilarityLoss())(emb, labels)
    assert torch.allclose(value, losses.MultiSimilarityLoss()(emb, labels))
