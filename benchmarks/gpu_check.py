"""The LoOp core on a CUDA device: same values as on the CPU, no hidden host
synchronisation, speed and memory against the plain losses (eager and
``compile=True``). Prints every figure; run it where a GPU is present:

    python benchmarks/gpu_check.py [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from pytorch_metric_learning import losses
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance

from pml_loop import LoOpDistance, LoOpLoss

LOSSES = {"Triplet": losses.TripletMarginLoss, "MultiSimilarity": losses.MultiSimilarityLoss,
          "Contrastive": losses.ContrastiveLoss}


def batch(classes, per_class, d=512, device="cuda", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(classes * per_class, d, generator=g, dtype=dtype).to(device).clone().requires_grad_()
    return emb, torch.arange(classes).repeat_interleave(per_class).to(device)


def agreement() -> None:
    print("## values and gradients, CUDA vs CPU (float64)")
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 4])
    ref_labels = torch.tensor([1, 1, 4, 4, 0, 5, 5, 5])
    emb = torch.randn(len(labels), 16, generator=g, dtype=torch.float64)
    ref = torch.randn(len(ref_labels), 16, generator=g, dtype=torch.float64)
    for base in (LpDistance(), LpDistance(normalize_embeddings=False), CosineSimilarity(),
                 DotProductSimilarity(normalize_embeddings=False)):
        worst = 0.0
        for chunk in (2**18, 7):
            for with_ref in (False, True):
                out = []
                for device in ("cpu", "cuda"):
                    e = emb.detach().to(device).clone().requires_grad_()
                    r = ref.detach().to(device).clone().requires_grad_() if with_ref else None
                    args = (e, labels.to(device)) + ((r, ref_labels.to(device)) if with_ref else ())
                    mat = LoOpDistance(base, chunk_elements=chunk).loop_mat(*args)
                    mat.pow(2).sum().backward()
                    out.append([mat.detach().cpu(), e.grad.cpu()] + ([r.grad.cpu()] if with_ref else []))
                worst = max(worst, *(float((a - b).abs().max()) for a, b in zip(*out)))
        print(f"{type(base).__name__}(normalize={base.normalize_embeddings}): max |CUDA - CPU| = {worst:.2e}")


def syncs() -> None:
    """Count the calls that make the host wait for the GPU, and say where they are."""
    import collections
    import traceback
    print("## host synchronisations in a warmed-up forward + backward, B = 128")
    emb, labels = batch(32, 4)
    cases = {"plain MultiSimilarityLoss": losses.MultiSimilarityLoss()}
    for nonfinite in ("ignore", "warn"):
        cases[f"LoOpLoss(MultiSimilarityLoss, nonfinite={nonfinite!r})"] = \
            LoOpLoss(losses.MultiSimilarityLoss(), nonfinite=nonfinite)
    for name, loss in cases.items():
        loss(emb, labels).backward()  # builds and caches the pair structure
        torch.cuda.synchronize()
        where = collections.Counter()

        def hook(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                frames = [f for f in traceback.extract_stack()[:-1]
                          if "pml_loop" in f.filename or "pytorch_metric_learning" in f.filename]
                f = frames[-1] if frames else None
                where[f"{f.filename.split('site-packages/')[-1].split('work/main/')[-1]}:{f.lineno}" if f else "?"] += 1

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = hook
            torch.cuda.set_sync_debug_mode("warn")
            loss(emb, labels).backward()
            torch.cuda.set_sync_debug_mode(0)
        print(f"{name}: {sum(where.values())} synchronising calls: {dict(where)}")


def timed(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speed(quick: bool) -> None:
    print("## speed: forward + backward, d = 512, m = 4, float32, median ms (plain / LoOp eager / LoOp compile=True)")
    for b in ((128, 1024) if quick else (128, 512, 1024, 4096)):
        emb, labels = batch(b // 4, 4)
        cells = []
        for name, make in LOSSES.items():
            if name == "Triplet" and b > 1024:
                continue
            row = []
            for loss in (make(), LoOpLoss(make()), LoOpLoss(make(), compile=True)):
                def f(loss=loss):
                    emb.grad = None
                    loss(emb, labels).backward()
                row.append(timed(f, 5 if b >= 4096 else 20))
            cells.append(f"{name} {1e3 * row[0]:.2f} / {1e3 * row[1]:.2f} / {1e3 * row[2]:.2f}"
                         f" ({row[1] / row[0]:.2f}x, {row[2] / row[0]:.2f}x)")
        print(f"B = {b}: " + "; ".join(cells), flush=True)


def memory() -> None:
    print("## peak CUDA memory above the inputs, forward + backward, MultiSimilarityLoss, d = 512, m = 4")
    for b in (1024, 4096):
        emb, labels = batch(b // 4, 4)
        peaks = []
        for loss in (losses.MultiSimilarityLoss(), LoOpLoss(losses.MultiSimilarityLoss())):
            loss(emb, labels).backward()
            emb.grad = None
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loss(emb, labels).backward()
            torch.cuda.synchronize()
            peaks.append((torch.cuda.max_memory_allocated() - start) / 2**20)
            emb.grad = None
        print(f"B = {b}: plain {peaks[0]:.0f} MiB, LoOp {peaks[1]:.0f} MiB ({peaks[1] / peaks[0]:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    if not args.quick:
        agreement()
    syncs()
    memory()
    speed(args.quick)


if __name__ == "__main__":
    main()
