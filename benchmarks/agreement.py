"""How closely this build's LoOp losses and gradients agree with another build's.

    git worktree add /tmp/before <commit>
    python benchmarks/agreement.py --against /tmp/before   # this build (backend="torch") against another
    python benchmarks/agreement.py --against /tmp/before --backend numba   # both builds' numba backends
    python benchmarks/agreement.py --backends               # this build's numba backend against its torch one

Runs the same cases through both in one process: four losses
(multi-similarity, triplet, contrastive, NT-Xent), three distances (cosine:
arcs; unnormalised Euclidean: segments; dot product), B = 36 - 400 with
m = 2 - 8 per class, labels in class order and shuffled, and a reference set;
in float32 and, on a subset, in float64. Prints how many cases are bitwise
equal and the largest difference relative to the largest gradient entry.
Nothing here is a test: a refactoring that sums in another order may differ
in rounding and still be right (the tests check against brute force).
"""
from __future__ import annotations

import argparse
import functools
import warnings

import torch
from bench_loop import load_against  # this folder
from pytorch_metric_learning import distances, losses

from pml_loop import LoOpLoss

SIZES = ((96, 2), (128, 4), (200, 8), (400, 4), (36, 3))


def make_loss(loop_cls, name: str, geometry: str):
    distance = {"arc": lambda: distances.CosineSimilarity(),
                "segment": lambda: distances.LpDistance(normalize_embeddings=False),
                "dot": lambda: distances.DotProductSimilarity(normalize_embeddings=False)}[geometry]()
    base = {"ms": lambda: losses.MultiSimilarityLoss(distance=distance),
            "triplet": lambda: losses.TripletMarginLoss(margin=0.3, distance=distance),
            "contrastive": lambda: losses.ContrastiveLoss(distance=distance),
            "ntxent": lambda: losses.NTXentLoss(distance=distance)}[name]()
    # contrastive also with a small chunk: a search in many blocks
    return loop_cls(base, chunk_elements=2**14 if name == "contrastive" else None)


def run_case(loop_cls, case: tuple, dtype: torch.dtype) -> list[torch.Tensor]:
    seed, name, geometry, size, m, shuffle, with_ref = case
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(size // m + 1, 32, generator=g, dtype=dtype).repeat_interleave(m, 0)[:size]
    emb = (torch.randn(size, 32, generator=g, dtype=dtype) * 0.3 + centres).requires_grad_()
    labels = torch.arange(size) // m
    if shuffle:
        labels = labels[torch.randperm(size, generator=g)]
    loss = make_loss(loop_cls, name, geometry)
    if with_ref:
        ref = torch.randn(64, 32, generator=g, dtype=dtype).requires_grad_()
        value = loss(emb, labels, ref_emb=ref, ref_labels=torch.arange(64) // 4)
        value.backward()
        return [value.detach(), emb.grad, ref.grad]
    value = loss(emb, labels)
    value.backward()
    return [value.detach(), emb.grad]


def cases() -> list[tuple]:
    out = []
    for name in ("ms", "triplet", "contrastive", "ntxent"):
        for geometry in ("arc", "segment", "dot"):
            for size, m in SIZES:
                for shuffle in (False, True):
                    out.append((len(out), name, geometry, size, m, shuffle, False))
            out.append((len(out), name, geometry, 128, 4, True, True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--against", help="a checkout of the other build")
    which.add_argument("--backends", action="store_true", help="backend='numba' against backend='torch'")
    ap.add_argument("--backend", choices=("torch", "numba"), default="torch",
                    help="with --against: the backend of both builds (default torch)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")  # e.g. "a batch with a single class" where the sizes make one
    if args.backends:
        mine_cls, other = (functools.partial(LoOpLoss, backend=b) for b in ("numba", "torch"))
    else:
        from bench_loop import torch_path
        theirs = load_against(args.against)
        if args.backend == "torch":
            mine_cls, other = torch_path(LoOpLoss), torch_path(theirs)
        else:
            mine_cls, other = (functools.partial(cls, backend="numba") for cls in (LoOpLoss, theirs))
    for dtype, selected in ((torch.float32, cases()), (torch.float64, cases()[::6])):
        equal, worst = 0, (0.0, None)
        for case in selected:
            mine, theirs = run_case(mine_cls, case, dtype), run_case(other, case, dtype)
            equal += all(torch.equal(a, b) for a, b in zip(mine, theirs))
            for a, b in zip(mine, theirs):
                rel = float((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(dtype).tiny))
                worst = max(worst, (rel, case[1:]), key=lambda w: w[0])
        where = "" if worst[1] is None else (
            " (loss {}, {}, B = {}, m = {}, shuffled {}, reference set {})".format(*worst[1]))
        print(f"{str(dtype)[6:]}: {equal} of {len(selected)} cases bitwise equal; largest difference "
              f"{worst[0]:.1e} of the largest entry{where}", flush=True)


if __name__ == "__main__":
    main()
