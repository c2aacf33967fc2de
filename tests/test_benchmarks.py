"""The benchmark script's comparison of two builds in one process."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from pytorch_metric_learning.losses import MultiSimilarityLoss

from pml_loop import LoOpLoss

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_loop", ROOT / "benchmarks" / "bench_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_against_loads_another_build_beside_this_one(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    other = _bench().load_against(str(ROOT))
    assert other is not LoOpLoss and other.__module__ == "pml_loop_against.loss"
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(24, 8, generator=g), torch.arange(6).repeat_interleave(4)
    assert torch.equal(other(MultiSimilarityLoss())(emb, labels), LoOpLoss(MultiSimilarityLoss())(emb, labels))


def test_against_names_a_checkout_without_the_package(tmp_path):
    with pytest.raises(SystemExit, match="has no pml_loop package"):
        _bench().load_against(str(tmp_path))


def test_passes_are_captured_from_either_build(monkeypatch):
    """The parts table times each build's search and gradient pass on the
    inputs of one of its steps; the call must not leave the spy in place."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    bench = _bench()
    other = bench.load_against(str(ROOT))
    emb, labels = bench.batch(6, 4, d=8)
    import pml_loop.batch_loop as bl
    original = bl._winners_grad
    for loss_cls in (bench.TORCH_LOOP, bench.torch_path(other)):
        winners = bench.captured_pass(loss_cls, "search_winners", emb, labels)()
        gradient = bench.captured_pass(loss_cls, "_winners_grad", emb, labels)()
        assert winners.value.shape == gradient.qr.shape == (24, 24)
        assert gradient.qr.abs().sum() > 0
    assert bl._winners_grad is original
    assert 0 < bench.shared_winners(2) <= 0.25 + 1e-9  # at 2 per class a combination serves four entries


def test_triplets_kept_by_the_reducer_never_fewer_with_loop():
    """LoOp's negative distances never exceed the plain ones, so no triplet
    that violates the margin plainly stops violating it with LoOp."""
    kept = _bench().triplets_kept()
    assert 0 < kept["plain"] <= kept["LoOp"] <= 128 * 3 * 124  # all triplets of 32 x 4


def test_winner_kinds_are_fractions_of_every_visited_combination():
    """Corner, edge and interior split the gradient pass's combinations; tight
    classes far apart meet at their ends (the arcs' closest points are corners)."""
    bench = _bench()
    random, tight = (bench.winner_kinds(noise) for noise in (None, 0.1))
    for kinds in (random, tight):
        assert all(0 <= v <= 1 for v in kinds.values()) and abs(sum(kinds.values()) - 1) < 1e-6
    assert tight["corner"] > 0.5 > random["corner"]


def test_rederivation_times_restore_the_optimum_finder():
    import pml_loop.batch_loop as bl
    original = bl.arc_entry_optimum
    times = _bench().rederivation_times(1)
    assert set(times) == {"pass", "pass, optima cached", "step", "step, optima cached", "plain"}
    assert all(t > 0 for t in times.values()) and bl.arc_entry_optimum is original
