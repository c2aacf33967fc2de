"""Training throughput (samples per second) of the glyph CNN, plain losses
against LoOp-wrapped ones, in one process and in several (DDP, gloo).

    python benchmarks/throughput.py                    # 1 and 2 processes, 30 timed steps
    (from a checkout that is not the installed one: PYTHONPATH=. python benchmarks/throughput.py)
    python benchmarks/throughput.py --nprocs 1 2 4 --iters 50 --threads 1
    python benchmarks/throughput.py --iters 2 --warmup 1   # smoke run

One step is what the runner's MetricLossOnly trainer does: the GlyphCNN
trunk and a 128-d linear embedder on a global batch of 128 (m = 4 per class,
16x16 glyph-sized inputs), the loss, backward, Adam. With N processes each
rank computes batch/N samples and the loss runs on the gathered global batch,
through the same wrappers the runner uses (DistributedDataParallel,
`pml_loop.bench.distributed.wrap_losses_and_miners`); one process runs
without a process group, as the runner does. Every process gets `--threads`
intra-op threads (1 by default), so N processes use N cores.

Inputs are random: throughput does not depend on pixel values, and the
glyph set need not be built. Nothing here is a test; run it on a quiet
machine (other processes on the same cores distort everything) and read the
ratios. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Dict, List

import torch
import torch.multiprocessing as mp
from pytorch_metric_learning import losses

from pml_loop import LoOpLoss
from pml_loop.bench import distributed as dist_mod
from pml_loop.models import MLP, GlyphCNN

VARIANTS = {
    "TripletMarginLoss": lambda: losses.TripletMarginLoss(margin=0.1),
    "LoOp(TripletMarginLoss)": lambda: LoOpLoss(losses.TripletMarginLoss(margin=0.1)),
    "MultiSimilarityLoss": lambda: losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
    "LoOp(MultiSimilarityLoss)": lambda: LoOpLoss(losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)),
}


def global_batch(batch: int, m: int, size: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch // m).repeat_interleave(m)
    return torch.randn(batch, 1, size, size, generator=g), labels


def measure(rank: int, world_size: int, args: argparse.Namespace, rdzv: str, out: str) -> None:
    """Samples per second of each variant on this rank (rank 0 writes them)."""
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    active = world_size > 1
    if active:
        dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world_size)
    context = dist_mod.DistContext(rank, rank, world_size, torch.device("cpu"), active=active)
    local = args.batch // world_size
    results: Dict[str, float] = {}
    try:
        setups = {}
        for name, make_loss in VARIANTS.items():
            torch.manual_seed(0)
            trunk = GlyphCNN()
            models = {"trunk": trunk, "embedder": MLP([trunk.output_size, 128])}
            loss_funcs = {"metric_loss": make_loss()}
            params = [p for model in models.values() for p in model.parameters()]
            if active:
                models = dist_mod.wrap_models(models, context)
                loss_funcs, _ = dist_mod.wrap_losses_and_miners(loss_funcs, {})
            setups[name] = (models, loss_funcs, torch.optim.Adam(params, lr=1e-3))
        steps: Dict[str, List[float]] = {name: [] for name in VARIANTS}
        for step in range(args.warmup + args.iters):
            x, labels = global_batch(args.batch, args.m, args.size, seed=step)
            x, labels = x[rank * local:(rank + 1) * local], labels[rank * local:(rank + 1) * local]
            # the variants take turns step by step, so each ratio is measured
            # under the same load (and CPU clock) as its baseline
            for name, (models, loss_funcs, optimizer) in setups.items():
                if active:
                    dist.barrier()  # time the step, not the wait for a slower rank's previous one
                start = time.perf_counter()
                optimizer.zero_grad()
                emb = models["embedder"](models["trunk"](x))
                loss_funcs["metric_loss"](emb, labels).backward()
                optimizer.step()
                if active:
                    dist.barrier()
                if step >= args.warmup:
                    steps[name].append(time.perf_counter() - start)
        # the median step: robust to a stray slow step on a shared machine
        results = {name: args.batch / sorted(t)[len(t) // 2] for name, t in steps.items()}
        if rank == 0:
            torch.save(results, out)
    finally:
        if active:
            dist.destroy_process_group()


def run(world_size: int, args: argparse.Namespace) -> Dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "out.pt")
        mp.spawn(measure, args=(world_size, args, os.path.join(folder, "rdzv"), out), nprocs=world_size)
        return torch.load(out)


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--m", type=int, default=4, help="samples per class")
    parser.add_argument("--size", type=int, default=16, help="input height and width")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    args = parser.parse_args(argv)
    for n in args.nprocs:
        if args.batch % n or args.batch % args.m:
            parser.error(f"--batch {args.batch} must be divisible by --m and by every --nprocs ({n})")
    table = {n: run(n, args) for n in args.nprocs}
    print(f"samples/s, global batch {args.batch} (m={args.m}), {args.size}x{args.size} inputs, "
          f"{args.threads} thread(s) per process, median of {args.iters} steps")
    print("| loss | " + " | ".join(f"{n} process{'es' if n > 1 else ''}" for n in args.nprocs) + " |")
    print("|---|" + "---:|" * len(args.nprocs))
    for name in VARIANTS:
        print(f"| {name} | " + " | ".join(f"{table[n][name]:.0f}" for n in args.nprocs) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
