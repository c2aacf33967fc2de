"""The LoOp core on a CUDA device: same values as on the CPU, no hidden host
synchronisation, speed and memory against the plain losses (eager and
``compile=True``), autocast (float16 / bfloat16) timings, and a 1-epoch
benchmark run with mixed precision and faiss-gpu evaluation. Prints every
figure; ``benchmarks/gpu_check.sh`` runs it after the CUDA-marked tests:

    python benchmarks/gpu_check.py [--quick] [--tiny] [--skip SECTION ...]

``--tiny`` (or GPU_CHECK_TINY=1): small sizes, for checking on a CPU that the
script runs; without CUDA every section runs on the CPU with tiny sizes and
the CUDA-only ones (host syncs, CUDA memory) say they are skipped.
On an H200 it took 2 minutes, compilation included (with the CUDA tests, gpu_check.sh: 2.5).
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch
from pytorch_metric_learning import losses
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # the checkout's pml_loop
from pml_loop import LoOpDistance, LoOpLoss  # noqa: E402

LOSSES = {"Triplet": losses.TripletMarginLoss, "MultiSimilarity": losses.MultiSimilarityLoss,
          "Contrastive": losses.ContrastiveLoss}
SECTIONS = ("agreement", "syncs", "memory", "speed", "autocast", "runner")
# TripletMarginLoss builds all B * m * B triplets: above this it is PML's own
# memory, not LoOp's, that a GPU runs out of.
TRIPLET_MAX_BATCH = 1024


class Settings:
    def __init__(self, device: str, tiny: bool, quick: bool):
        self.device, self.tiny, self.quick = device, tiny, quick
        self.cuda = device == "cuda"
        if tiny:
            self.batches, self.d, self.repeats, self.memory_batches = (32, 64), 32, 2, (64,)
        elif quick:
            self.batches, self.d, self.repeats, self.memory_batches = (128, 1024), 512, 10, (1024,)
        else:
            self.batches, self.d, self.repeats, self.memory_batches = (128, 256, 512, 1024, 4096), 512, 20, (1024, 4096)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def batch(classes, per_class, d=512, device="cuda", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(classes * per_class, d, generator=g, dtype=dtype).to(device).clone().requires_grad_()
    return emb, torch.arange(classes).repeat_interleave(per_class).to(device)


def agreement(s: Settings) -> None:
    print(f"## values and gradients, {s.device} vs CPU (float64)")
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
                for device in ("cpu", s.device):
                    e = emb.detach().to(device).clone().requires_grad_()
                    r = ref.detach().to(device).clone().requires_grad_() if with_ref else None
                    args = (e, labels.to(device)) + ((r, ref_labels.to(device)) if with_ref else ())
                    mat = LoOpDistance(base, chunk_elements=chunk).loop_mat(*args)
                    mat.pow(2).sum().backward()
                    out.append([mat.detach().cpu(), e.grad.cpu()] + ([r.grad.cpu()] if with_ref else []))
                worst = max(worst, *(float((a - b).abs().max()) for a, b in zip(*out)))
        print(f"{type(base).__name__}(normalize={base.normalize_embeddings}): max |{s.device} - CPU| = {worst:.2e}")


def count_syncs(step) -> collections.Counter:
    """Calls that make the host wait for the GPU during ``step``, by the
    innermost pml_loop / PML source line on the stack."""
    where = collections.Counter()

    def hook(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "pml_loop" in f.filename or "pytorch_metric_learning" in f.filename]
            f = frames[-1] if frames else None
            where[f"{f.filename.split('site-packages/')[-1].split('pml_loop/')[-1]}:{f.lineno} ({f.name})"
                  if f else "?"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return where


def syncs(s: Settings) -> None:
    print("## host synchronisations in a warmed-up forward + backward, B = 128 "
          "(documented for LoOp: _same_key, and _finite unless nonfinite='ignore'; the rest is PML's)")
    if not s.cuda:
        print("skipped: needs CUDA (torch.cuda.set_sync_debug_mode)")
        return
    emb, labels = batch(32, 4, s.d)
    for name, make in LOSSES.items():
        cases = {f"plain {name}": make()}
        for nonfinite in ("ignore", "warn"):
            cases[f"LoOpLoss({name}, nonfinite={nonfinite!r})"] = LoOpLoss(make(), nonfinite=nonfinite)
        for label, loss in cases.items():
            loss(emb, labels).backward()  # builds and caches the pair structure
            torch.cuda.synchronize()
            where = count_syncs(lambda: loss(emb, labels).backward())
            print(f"{label}: {sum(where.values())} synchronising calls: {dict(where)}", flush=True)


def timed(fn, repeats, device):
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _step(loss, emb, labels):
    def f():
        emb.grad = None
        loss(emb, labels).backward()
    return f


def speed(s: Settings) -> None:
    print(f"## speed: forward + backward, d = {s.d}, m = 4, float32, median ms "
          "(plain / LoOp eager / LoOp compile=True)")
    for b in s.batches:
        emb, labels = batch(b // 4, 4, s.d, s.device)
        cells = []
        for name, make in LOSSES.items():
            if name == "Triplet" and b > TRIPLET_MAX_BATCH:
                cells.append(f"{name} skipped (B > {TRIPLET_MAX_BATCH}: PML's all-triplets memory)")
                continue
            row = [timed(_step(loss, emb, labels), max(2, s.repeats // 4) if b >= 4096 else s.repeats, s.device)
                   for loss in (make(), LoOpLoss(make()), LoOpLoss(make(), compile=True))]
            cells.append(f"{name} {1e3 * row[0]:.2f} / {1e3 * row[1]:.2f} / {1e3 * row[2]:.2f}"
                         f" ({row[1] / row[0]:.2f}x, {row[2] / row[0]:.2f}x)")
        print(f"B = {b}: " + "; ".join(cells), flush=True)


def memory(s: Settings) -> None:
    print(f"## peak CUDA memory above the inputs, forward + backward, d = {s.d}, m = 4 (plain / LoOp)")
    if not s.cuda:
        print("skipped: needs CUDA (torch.cuda.max_memory_allocated)")
        return
    for b in s.memory_batches:
        emb, labels = batch(b // 4, 4, s.d)
        cells = []
        for name, make in LOSSES.items():
            if name == "Triplet" and b > TRIPLET_MAX_BATCH:
                continue
            peaks = []
            for loss in (make(), LoOpLoss(make())):
                loss(emb, labels).backward()
                emb.grad = None
                torch.cuda.synchronize()
                start = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                loss(emb, labels).backward()
                torch.cuda.synchronize()
                peaks.append((torch.cuda.max_memory_allocated() - start) / 2**20)
                emb.grad = None
            cells.append(f"{name} {peaks[0]:.0f} / {peaks[1]:.0f} MiB ({peaks[1] / max(peaks[0], 1e-9):.2f}x)")
        print(f"B = {b}: " + "; ".join(cells), flush=True)


def autocast(s: Settings) -> None:
    dtypes = (torch.float16, torch.bfloat16) if s.cuda else (torch.bfloat16,)
    print(f"## autocast: forward + backward, d = {s.d}, m = 4, median ms (plain / LoOp eager), "
          "and |LoOp loss - float32 LoOp loss| / |float32 loss|")
    for dtype in dtypes:
        for b in s.batches[-3:]:
            emb, labels = batch(b // 4, 4, s.d, s.device)
            cells = []
            for name, make in LOSSES.items():
                if name == "Triplet" and b > TRIPLET_MAX_BATCH:
                    continue
                ref = LoOpLoss(make())(emb, labels).item()
                row = []
                for loss in (make(), LoOpLoss(make())):
                    def f(loss=loss):
                        emb.grad = None
                        with torch.autocast(s.device, dtype=dtype):
                            value = loss(emb, labels)
                        value.backward()
                        return value
                    row.append(timed(f, max(2, s.repeats // 4) if b >= 4096 else s.repeats, s.device))
                with torch.autocast(s.device, dtype=dtype):
                    value = LoOpLoss(make())(emb, labels)
                rel = abs(value.item() - ref) / max(abs(ref), 1e-12)
                cells.append(f"{name} {1e3 * row[0]:.2f} / {1e3 * row[1]:.2f} ({row[1] / row[0]:.2f}x, "
                             f"rel. err {rel:.1e}, {value.dtype})")
            print(f"{str(dtype).replace('torch.', '')} B = {b}: " + "; ".join(cells), flush=True)


def runner_run(s: Settings) -> None:
    """One epoch of the glyph benchmark with LoOp triplet, mixed precision and
    the evaluation backend the install provides (faiss-gpu with the [gpu] extra)."""
    from pml_loop.bench import cli, evaluation, registry, runner

    dtype = "float16" if s.cuda else "bfloat16"
    device = torch.device(s.device)
    print(f"## 1-epoch runner run: LoOp(TripletMarginLoss), mixed_precision {dtype}, device {s.device}, "
          f"evaluation with {evaluation.describe_backend('auto', device)} "
          f"(faiss GPUs: {evaluation.faiss_num_gpus()})")
    with tempfile.TemporaryDirectory() as root:
        argv = ["--experiment_name", "gpu_check", "--root_experiment_folder", root,
                "--config_loss_and_miners", "default", "loop_triplet",
                "--num_epochs_train", "1", "--device", s.device,
                "--mixed_precision", f"{{dtype: {dtype}}}", "--patience", "null",
                "--check_untrained_accuracy", "false"]
        if s.tiny:
            argv += ["--trainer~APPLY~2", "{batch_size: 32, iterations_per_epoch: 5}", "--splits_to_eval", "[val]"]
        namespace, overrides = cli.parse_args(argv)
        cfg, provenance = cli.make_config(namespace, overrides)
        registry.check_buildable(cfg, provenance)
        runner.check_run_config(cfg)
        start = time.perf_counter()
        result = runner.run_experiment(cfg, os.path.join(root, "gpu_check"))
        fold = result.folds[0]
        print(f"wall {time.perf_counter() - start:.1f} s, {1e3 * fold.seconds_per_iteration:.1f} ms per iteration "
              f"(batch {runner.trainer_settings(cfg)['batch_size']})")
        for split, metrics in fold.state.history[-1]["accuracies"].items():
            print(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        saved = runner.ckpt.load_checkpoint(os.path.join(fold.folder, "saved_models"))
        if "grad_scaler" in saved:
            print(f"GradScaler scale after the epoch: {saved['grad_scaler']['scale']:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument("--tiny", action="store_true", default=os.environ.get("GPU_CHECK_TINY") == "1",
                    help="tiny sizes (a CPU check that the script runs); also GPU_CHECK_TINY=1")
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    else:
        print(f"no CUDA device: running on the CPU with tiny sizes, CUDA-only sections skipped "
              f"(torch {torch.__version__})", flush=True)
    s = Settings(device, args.tiny or not cuda, args.quick)
    sections = {"agreement": agreement, "syncs": syncs, "memory": memory, "speed": speed,
                "autocast": autocast, "runner": runner_run}
    if args.quick:
        args.skip = list(args.skip) + ["agreement"]
    failed = []
    for name, fn in sections.items():
        if name in args.skip:
            continue
        start = time.perf_counter()
        try:
            fn(s)
        except Exception:  # one broken section must not hide the other figures
            traceback.print_exc()
            failed.append(name)
        print(f"[{name}: {time.perf_counter() - start:.1f} s]", flush=True)
    if failed:
        raise SystemExit(f"sections that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
