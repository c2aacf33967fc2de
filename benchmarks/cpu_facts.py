"""The CPU facts behind the core's layout choices, measured on this machine.

    python benchmarks/cpu_facts.py

Prints (2 torch threads, fastest of many calls unless said otherwise):
- an elementwise operation with a transposed operand against contiguous ones;
- rows gathered from the inner dimension of a (3, s, C) table against the
  same rows gathered from its (3 s, C) view;
- the gradient pass's flat positions computed in int32 and in int64, and a
  float index cast to each (as ``first_max`` returns it);
- what a Python number in a tensor operation costs (ATen calls and time,
  against a 0-dim tensor), and the ATen calls of unpacking a tensor and of
  ``reshape`` against ``view``;
- the batch's partition key (computed at every LoOp call) by sorting, as on
  the CPU, against the n x n comparison a GPU uses, for B = 128 - 4096;
- page faults and time of the LoOp search inside a multi-similarity step, in
  a fresh process (small allocations only) and in one that has freed a 16 MB
  block first, as a training step with larger activations does (each case in
  its own process: glibc's thresholds only move one way).

Nothing here is a test; run it on a quiet machine.
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from bench_loop import min_time  # this folder


def fastest(fn, calls: int = 500) -> float:
    """Fastest call in microseconds."""
    return 1e6 * min_time(fn, calls)


def layouts() -> None:
    a, b = torch.randn(192, 192), torch.randn(192, 192)
    print(f"maximum of two 192 x 192 arrays: contiguous {fastest(lambda: torch.maximum(a, b)):.1f} us, "
          f"one transposed {fastest(lambda: torch.maximum(a, a.T)):.1f} us")
    n, count = 128, 8128
    for dtype in (torch.int64, torch.int32):
        i, p = (torch.randint(0, n, (count,), dtype=dtype) for _ in range(2))
        t = fastest(lambda: torch.stack((i, i, p, p, i, p)).mul_(n).add_(torch.stack((p, i, i, p, p, i))))
        print(f"six flat positions of {count} entries in {str(dtype)[6:]}: {t:.1f} us")
    for samples, width in ((128, 192), (340, 510)):  # the search's per-sample tables at B = 128 and in a block at 1024
        table, rows = torch.rand(3, samples, width), torch.randint(0, samples, (2 * width,))
        flat = (rows + samples * torch.arange(3)[:, None]).view(-1)
        inner = fastest(lambda: table.index_select(1, rows), 200)
        leading = fastest(lambda: table.view(-1, width).index_select(0, flat), 200)
        print(f"rows {2 * width} of a (3, {samples}, {width}) table: index_select along dim 1 {inner:.1f} us, "
              f"along dim 0 of its (3 x {samples}, {width}) view {leading:.1f} us")
    ranks = torch.randint(0, 3, (n, n)).float()
    for dtype in (torch.int64, torch.int32):
        print(f"a {n} x {n} float index cast to {str(dtype)[6:]}: {fastest(lambda: ranks.to(dtype)):.1f} us")


def aten_calls(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name.startswith("aten::") for e in prof.events())


def dispatch() -> None:
    x, half = torch.rand(8128), torch.tensor(0.5)
    for label, fn in (("x.mul_(0.5)", lambda: x.mul_(0.5)), ("x.mul_(0-dim tensor)", lambda: x.mul_(half))):
        print(f"{label} on 8,128 values: {aten_calls(fn)} ATen calls, {fastest(fn, 5000):.2f} us")
    t = torch.rand(2, 8128)

    def unpack():
        a, b = t
        return a, b

    print(f"a, b = t: {aten_calls(unpack)} ATen calls; t[0], t[1]: {aten_calls(lambda: (t[0], t[1]))}; "
          f"t.reshape(-1): {aten_calls(lambda: t.reshape(-1))}; t.view(-1): {aten_calls(lambda: t.view(-1))}")


def search_child(warm: bool) -> None:
    from pytorch_metric_learning import losses

    import pml_loop.distance as dist_mod
    from pml_loop import LoOpLoss
    torch.set_num_threads(2)
    if warm:
        torch.empty(2**22).fill_(1)  # 16 MB, freed at once
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(128, 512, generator=g, requires_grad=True)
    labels = torch.arange(32).repeat_interleave(4)
    loss = LoOpLoss(losses.MultiSimilarityLoss(), backend="torch")  # the torch search's temporaries
    search, seen = dist_mod.search_winners, []

    def counted(*a, **k):
        f0, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        out = search(*a, **k)
        seen.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0, time.perf_counter() - t))
        return out

    dist_mod.search_winners = counted
    for _ in range(40):
        emb.grad = None
        loss(emb, labels).backward()
    faults, seconds = zip(*seen[5:])
    print(json.dumps(dict(faults=statistics.median(faults), ms=1e3 * statistics.median(seconds))))


def page_faults() -> None:
    for warm, label in ((False, "fresh process"), (True, "after freeing 16 MB")):
        out = subprocess.run([sys.executable, __file__, "--search-child", str(int(warm))],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"LoOp search in a multi-similarity step, B = 128, {label}: {r['faults']:.0f} page faults, "
              f"{r['ms']:.2f} ms (median of 35 steps)")


def partition_keys() -> None:
    from pml_loop.pairs import partition_key

    def compared(labels):  # the GPU form, no host sync
        return (labels[None, :] == labels[:, None]).to(torch.uint8).argmax(1)

    for b in (128, 1024, 4096):
        labels = torch.arange(b // 4).repeat_interleave(4)[torch.randperm(b, generator=torch.Generator().manual_seed(0))]
        assert torch.equal(partition_key(labels), compared(labels))
        calls = 50 if b > 1000 else 500
        print(f"partition key, B = {b}: sorted {fastest(lambda: partition_key(labels), calls):.1f} us, "
              f"n x n comparison {fastest(lambda: compared(labels), calls):.1f} us")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--search-child":
        return search_child(bool(int(sys.argv[2])))
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, 2 threads")
    layouts()
    dispatch()
    partition_keys()
    page_faults()


if __name__ == "__main__":
    main()
