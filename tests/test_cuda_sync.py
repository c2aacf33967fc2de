"""No unexpected host synchronisation in a LoOpLoss step on CUDA.

``torch.cuda.set_sync_debug_mode("warn")`` warns at every call that makes the
host wait for the GPU. A warmed-up LoOpLoss forward + backward may sync only
where documented (LoOpDistance's docstring): comparing the batch's label
partition with the cached one (``_same_key``, one ``torch.equal``) and the
finiteness check (``_finite``, unless ``nonfinite="ignore"``). PML's own syncs
(``loss_and_miner_utils`` index building, ``generic_pair_loss``, the reducers:
five in a plain MultiSimilarityLoss step on an H200) are not ours and are
only counted: they depend on the data (a reducer's boolean selection syncs
only when some loss term is positive, and LoOp makes more negative terms
positive). "error" mode cannot be used for the whole step for that
reason; it is used for the LoOp search and measure kernels alone.
"""
import collections
import traceback
import warnings

import pytest
import torch
from pytorch_metric_learning import losses

from pml_loop import LoOpLoss

pytestmark = pytest.mark.cuda

# pml_loop functions allowed to synchronise, per nonfinite setting
ALLOWED = {"ignore": {"_same_key"}, "warn": {"_same_key", "_finite"}}


def sync_sites(step) -> collections.Counter:
    """Run ``step`` under sync debug mode "warn"; count syncs by the innermost
    named function of pml_loop or PML on the stack: "pml:<name>" for ours
    (a generator expression counts as the function that holds it), "PML" for
    PML's own code (reached from our wrapper or not), else "other"."""
    where = collections.Counter()

    def hook(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if ("pml_loop" in f.filename or "pytorch_metric_learning" in f.filename)
                  and not f.name.startswith("<")]
        if not frames:
            where["other"] += 1
        elif "pml_loop" in frames[-1].filename:
            where[f"pml:{frames[-1].name}"] += 1
        else:
            where["PML"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return where


def _batch(classes=32, per_class=4, d=64):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(classes * per_class, d, generator=g).cuda().requires_grad_()
    return emb, torch.arange(classes).repeat_interleave(per_class).cuda()


@pytest.mark.parametrize("nonfinite", ["ignore", "warn"])
@pytest.mark.parametrize("make", [losses.MultiSimilarityLoss, losses.TripletMarginLoss, losses.ContrastiveLoss])
def test_loop_loss_step_syncs_only_where_documented(make, nonfinite):
    emb, labels = _batch()
    loss = LoOpLoss(make(), nonfinite=nonfinite)
    loss(emb, labels).backward()  # builds and caches the pair structure
    torch.cuda.synchronize()
    sites = sync_sites(lambda: loss(emb, labels).backward())
    ours = {k: v for k, v in sites.items() if k.startswith("pml:")}
    assert set(k[4:] for k in ours) <= ALLOWED[nonfinite], sites
    assert sum(ours.values()) <= len(ALLOWED[nonfinite]), sites


def test_search_and_gradient_kernels_never_sync():
    """The search and the gradient pass on a cached structure run under "error" mode."""
    from pml_loop.batch_loop import gram_blocks, loop_entries, search_winners
    from pml_loop.distance import LoOpDistance

    emb, labels = _batch()
    d = LoOpDistance(nonfinite="ignore")
    d.loop_mat(emb, labels)  # structure cached
    qn = torch.nn.functional.normalize(emb, dim=1)
    g = gram_blocks(qn, qn, True)
    st = d._structure(g, labels, labels, True)
    base, neg = d.base.compute_mat(qn, qn), labels[:, None] != labels[None, :]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        winners = search_winners(g, st.table_q, st.table_r, d.geometry, st.plan)
        loop_entries(base, g, neg, winners, d._units(), d.is_inverted, d.geometry,
                     d._chunk(emb.device)).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
