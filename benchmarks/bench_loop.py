"""Speed and memory of LoOpLoss, as ratios measured in one run (not a test).

    python benchmarks/bench_loop.py            # B=128 ratios + B=1024 memory
    python benchmarks/bench_loop.py --quick    # fewer repeats

Prints: median forward+backward time of plain TripletMarginLoss, of
LoOpLoss(TripletMarginLoss), and of a naive per-quadruple reference that
materialises the four d-dimensional endpoints of every quadruple (i, p, j, q)
and calls ``loop_distance`` on them, then the ratios; and, in a fresh
subprocess per case, the peak extra resident memory of B=1024 forward+backward.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from pytorch_metric_learning import losses

from pml_loop import LoOpLoss
from pml_loop.functional import loop_distance


def batch(classes: int, per_class: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(classes * per_class, d, generator=g), torch.arange(classes).repeat_interleave(per_class)


def naive_loop_matrix(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-quadruple LoOp chord matrix on normalised embeddings (d-dim points per quadruple)."""
    x = torch.nn.functional.normalize(emb, dim=1)
    n = len(x)
    same = labels[:, None] == labels[None]
    partner = same & ~torch.eye(n, dtype=torch.bool)
    partner |= torch.eye(n, dtype=torch.bool) & ~partner.any(1, keepdim=True)
    i, p = partner.nonzero(as_tuple=True)           # every (sample, partner)
    a, b = torch.meshgrid(torch.arange(len(i)), torch.arange(len(i)), indexing="ij")
    keep = labels[i[a]] != labels[i[b]]
    a, b = a[keep], b[keep]
    d = loop_distance(x[i[a]], x[p[a]], x[i[b]], x[p[b]], sphere=True)
    out = torch.cdist(x, x)
    flat = (i[a] * n + i[b])
    loop = torch.full((n * n,), float("inf")).scatter_reduce(0, flat, d, "amin").view(n, n)
    return torch.where(~same, loop, out)


def median_times(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, calls interleaved round by round so
    that drifting machine load hits every variant alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def speed(repeats: int) -> dict:
    emb, labels = batch(32, 4, 512)
    emb.requires_grad_()
    plain = losses.TripletMarginLoss()
    wrapped = LoOpLoss(losses.TripletMarginLoss())
    compiled = LoOpLoss(losses.TripletMarginLoss(), compile=True)

    def run(loss):
        def f():
            emb.grad = None
            loss(emb, labels).backward()
        return f

    def naive():
        emb.grad = None
        m = naive_loop_matrix(emb, labels)
        m.sum().backward()

    with torch.no_grad():  # the reference computes what LoOpLoss's distance computes
        mat = wrapped.loop_distance.loop_mat(emb, labels)
        ref = naive_loop_matrix(emb, labels)
        agree = float((mat - ref).abs().max())
    compiled(emb, labels)  # compile outside the timing (once per process)
    t = median_times({"plain": run(plain), "loop": run(wrapped), "compiled": run(compiled)}, repeats)
    t_plain, t_loop, t_compiled = t["plain"], t["loop"], t["compiled"]
    t_naive = median_times({"naive": naive}, max(3, repeats // 10))["naive"]
    return dict(plain_ms=1e3 * t_plain, loop_ms=1e3 * t_loop, compiled_ms=1e3 * t_compiled,
                naive_ms=1e3 * t_naive, loop_over_plain=t_loop / t_plain,
                compiled_over_plain=t_compiled / t_plain, naive_over_loop=t_naive / t_loop,
                max_abs_diff_vs_naive=agree)


MEMORY_CASES = {
    "plain TripletMarginLoss": lambda e, l: losses.TripletMarginLoss()(e, l),
    "LoOpLoss(TripletMarginLoss)": lambda e, l: LoOpLoss(losses.TripletMarginLoss())(e, l),
    "LoOp distance matrix alone": lambda e, l: LoOpLoss(losses.ContrastiveLoss()).loop_distance.loop_mat(e, l).sum(),
}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(case: str) -> None:
    """One case per fresh process: ru_maxrss only grows, so cases must not share one."""
    torch.set_num_threads(2)
    emb, labels = batch(256, 4, 512)
    emb.requires_grad_()
    # Reset the high-water mark to the current resident size (Linux), so the
    # peak of importing torch does not hide the peak of the computation.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    t = time.perf_counter()
    MEMORY_CASES[case](emb, labels).backward()
    elapsed = time.perf_counter() - t
    peak = _status_kb("VmHWM")
    print(json.dumps(dict(seconds=elapsed, extra_peak_mb=(peak - base) / 1024,
                          finite=bool(torch.isfinite(emb.grad).all()))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child)
    torch.set_num_threads(args.threads)
    s = speed(repeats=10 if args.quick else 50)
    print(f"B=128 (32 classes x 4), d=512, {args.threads} threads, forward+backward, median:")
    print(f"  TripletMarginLoss            {s['plain_ms']:8.2f} ms")
    print(f"  LoOpLoss(TripletMarginLoss)  {s['loop_ms']:8.2f} ms   ratio to plain {s['loop_over_plain']:.2f}x")
    print(f"  same, compile=True           {s['compiled_ms']:8.2f} ms   ratio to plain {s['compiled_over_plain']:.2f}x")
    print(f"  naive per-quadruple LoOp     {s['naive_ms']:8.2f} ms   LoOp (eager) is {s['naive_over_loop']:.1f}x faster")
    print(f"  max |LoOp matrix - naive| = {s['max_abs_diff_vs_naive']:.2e}")
    print("B=1024 (256 classes x 4), d=512, forward+backward, peak resident memory above the inputs:")
    for case in MEMORY_CASES:
        out = subprocess.run([sys.executable, __file__, "--memory-child", case],
                             capture_output=True, text=True, check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {case:30s} {m['seconds']:6.2f} s  {m['extra_peak_mb']:6.0f} MB  finite gradients: {m['finite']}")


if __name__ == "__main__":
    main()
