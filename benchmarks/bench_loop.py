"""Speed, memory and kernel-launch counts of LoOpLoss against the plain losses.

    python benchmarks/bench_loop.py            # every table (about a minute on 2 cores)
    python benchmarks/bench_loop.py --quick    # fewer repeats, smaller sweep
    python benchmarks/bench_loop.py --only speed memory first aten train parts kernels profile
    python benchmarks/bench_loop.py --only speed train --against /tmp/before   # two builds

Nothing here is a test: it prints ratios measured in one run, the variants
interleaved round by round so that machine load hits each alike.
``--against`` takes another checkout (e.g. ``git worktree add /tmp/before
<commit>``) and times its LoOpLoss in the same process, interleaved with this
one's, in the speed and train tables (on each backend, so that each is
compared with its own earlier build), for the search and gradient passes
of the parts table and for the numba kernels: on a machine whose speed drifts, two builds compare reliably only
that way.

Run it on a quiet machine (on 2 cores another busy process distorts everything).

The speed, aten, first, memory and train tables time LoOp on every backend
installed (``backend="torch"`` and, with numba, ``backend="numba"``) side by
side; parts and profile take the torch backend's passes apart.

Tables:
- speed: forward + backward, d = 512, LoOp / plain for TripletMarginLoss,
  MultiSimilarityLoss and ContrastiveLoss, for B = 128 .. 1024 (m = 4) and
  m = 2, 4, 8 (B = 128), plus a one-class batch and two classes of 64;
- aten: ATen calls of one forward + backward, all of them and those that run
  a kernel (on a GPU, each one a launch), plain MultiSimilarityLoss and
  TripletMarginLoss against LoOp, eager and ``compile=True``;
- first: a fresh process's import and first two LoOp steps on each backend
  (numba with an empty and with a filled disk cache);
- memory: peak resident memory above the inputs, forward + backward of
  MultiSimilarityLoss plain and LoOp-wrapped, B = 1024 and 4096, one fresh
  process per case, after a small first step (which loads what a first call
  loads once);
- train: one training step of the glyph CNN (batch 128, m = 4), plain and
  LoOp-wrapped TripletMarginLoss and MultiSimilarityLoss;
- parts: wall-clock split of a torch-backend LoOp forward + backward (B = 128): the search
  and gradient passes inside the step and alone (interleaved with the steps,
  and back to back), the wrapper's own cost, the search pass alone for
  B = 128, 512, 1024 and the gradient pass alone for the same and m = 2, 8
  (with ``--against``, both builds'), the distinct winning combinations per
  negative entry (m = 2, 4, 8), what finding their optima again costs,
  which candidate realises them (random and clustered embeddings), the
  triplets TripletMarginLoss's reducer
  keeps, plain and with LoOp, and the fixed cost per call (B = 16);
- kernels: the numba backend's search and gradient kernels alone, arcs and
  segments, B = 128 and 1024 (with ``--against``, both builds'), the
  fastest of interleaved calls;
- profile: the same under ``torch.profiler``, by ATen operation (B = 128).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import importlib
import inspect
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from pytorch_metric_learning import losses

from pml_loop import LoOpLoss
from pml_loop.backend import numba_available

LOSSES = {
    "Triplet": losses.TripletMarginLoss,
    "MultiSimilarity": losses.MultiSimilarityLoss,
    "Contrastive": losses.ContrastiveLoss,
}


#: LoOpLoss of the build given with ``--against``, or None.
AGAINST = None
#: The backends timed side by side: every one installed here.
BACKENDS = ("torch", "numba") if numba_available() else ("torch",)


def torch_path(loss_cls):
    """``loss_cls`` (this build's LoOpLoss or ``--against``'s) on the torch
    backend, whose passes the ``parts`` and ``profile`` tables take apart
    (a build from before backends has no other)."""
    if "backend" in inspect.signature(loss_cls).parameters:
        return functools.partial(loss_cls, backend="torch")
    return loss_cls


TORCH_LOOP = torch_path(LoOpLoss)


def against_backends() -> dict:
    """The ``--against`` build's LoOpLoss on each backend timed here that it
    has (a build from before backends: its one path, under "torch"), so that
    each backend is compared with its own earlier build."""
    if AGAINST is None:
        return {}
    if torch_path(AGAINST) is AGAINST:
        return {"torch": AGAINST}
    return {b: functools.partial(AGAINST, backend=b) for b in BACKENDS}


def load_against(checkout: str):
    """LoOpLoss of another build: its package copied beside this one as
    ``pml_loop_against`` (the package imports itself relatively)."""
    src = Path(checkout) / "pml_loop"
    if not (src / "__init__.py").is_file():
        raise SystemExit(f"--against: {checkout} has no pml_loop package")
    root = Path(tempfile.mkdtemp(prefix="bench_against_"))
    atexit.register(shutil.rmtree, root, True)
    shutil.copytree(src, root / "pml_loop_against", ignore=shutil.ignore_patterns("__pycache__", "*.npz"))
    sys.path.insert(0, str(root))
    return importlib.import_module("pml_loop_against").LoOpLoss


def batch(classes: int, per_class: int, d: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(classes * per_class, d, generator=g, requires_grad=True)
    return emb, torch.arange(classes).repeat_interleave(per_class)


def step(loss, emb, labels):
    def run():
        emb.grad = None
        loss(emb, labels).backward()
    return run


def median_times(fns: dict, repeats: int, reduce=statistics.median) -> dict:
    """Median seconds (or ``reduce`` of the times) of each function, called
    round by round (interleaved), in a new order each round: a call's time
    depends on which call ran just before it, and in a fixed order that
    decided a comparison of two builds."""
    for fn in fns.values():
        fn()  # warm-up (and the structure cache)
    times = {name: [] for name in fns}
    order, shuffle = list(fns), random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {name: reduce(v) for name, v in times.items()}


def min_time(fn, calls: int) -> float:
    """Fastest of ``calls`` calls, in seconds (for a part timed alone, where
    the fastest call is the one least disturbed by the machine)."""
    fn()
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def ratio_row(label: str, emb, labels, names, repeats: int) -> None:
    """One table row: a cell per loss of ``LOSSES``, blank for those not in
    ``names``; with ``--against``, that build's LoOp time and ratio first."""
    fns = {}
    for name in names:
        fns[name] = step(LOSSES[name](), emb, labels)
        for b in BACKENDS:
            fns[f"LoOp {b} {name}"] = step(LoOpLoss(LOSSES[name](), backend=b), emb, labels)
        for b, other in against_backends().items():
            fns[f"against {b} {name}"] = step(other(LOSSES[name]()), emb, labels)
    t = median_times(fns, repeats)

    def cell(n):
        loop = [t[f"LoOp {b} {n}"] for b in BACKENDS]
        text = (f"{1e3 * t[n]:.2f} / " + " / ".join(f"{1e3 * v:.2f}" for v in loop) + " ms = "
                + " / ".join(f"{v / t[n]:.2f}x" for v in loop))
        if AGAINST is None:
            return text
        theirs = " / ".join(f"{t[f'against {b} {n}'] / t[n]:.2f}x" for b in against_backends())
        return f"--against {theirs}; {text}"
    cells = [cell(n) if n in names else "" for n in LOSSES]
    print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def speed(quick: bool) -> None:
    names = list(LOSSES)
    against = f"; first the --against build's ratios ({' / '.join(against_backends())})" if AGAINST else ""
    print("\n## speed: forward + backward, d = 512, median times plain / LoOp with backend="
          + " / ".join(BACKENDS) + ", and the ratios" + against)
    print("| batch | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    reps = 10 if quick else 30
    for b in ((128, 256) if quick else (128, 256, 512, 1024)):
        emb, labels = batch(b // 4, 4)
        use = [n for n in names if not (n == "Triplet" and b > 512)]  # plain triplet: seconds at 1024
        ratio_row(f"B = {b}, m = 4", emb, labels, use, max(5, reps * 128 // b))
    for m in (2, 8):
        emb, labels = batch(128 // m, m)
        ratio_row(f"B = 128, m = {m}", emb, labels, names, reps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "a single class", on purpose
        emb, labels = batch(1, 128)
        ratio_row("B = 128, one class", emb, labels, ["MultiSimilarity"], reps)
    emb, labels = batch(2, 64)
    ratio_row("B = 128, two classes of 64", emb, labels, ["MultiSimilarity"], max(3, reps // 5))


#: ATen calls that only make a view or allocate: no kernel runs for them.
_NO_KERNEL = {"as_strided", "select", "slice", "view", "unsqueeze", "squeeze", "numpy_T", "permute",
              "transpose", "t", "unbind", "reshape", "_unsafe_view", "expand", "narrow", "detach", "alias",
              "diagonal", "empty", "empty_like", "empty_strided", "resize_", "lift_fresh"}


def aten_calls(fn) -> tuple[int, int]:
    """All ATen calls of ``fn``, and those that run a kernel: the outermost
    calls, less views and allocations (on a GPU, each one a launch)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    outer = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(events), sum(e.name[6:] not in _NO_KERNEL for e in outer)


def aten(quick: bool) -> None:
    emb, labels = batch(32, 4)
    print("\n## ATen calls of one forward + backward, B = 128 (32 x 4), d = 512")
    for name in ("MultiSimilarity", "Triplet"):
        cases = {"plain": step(LOSSES[name](), emb, labels)}
        for b in BACKENDS:
            cases["LoOp eager" if b == "torch" else f"LoOp {b}"] = step(LoOpLoss(LOSSES[name](), backend=b), emb, labels)
        if not quick:
            cases["LoOp compile=True"] = step(TORCH_LOOP(LOSSES[name](), compile=True), emb, labels)
        cells = [f"{case} {total} ({kernels} kernels)" for case, (total, kernels) in
                 ((case, aten_calls(fn)) for case, fn in cases.items())]
        print(f"{name}: " + ", ".join(cells), flush=True)


MEMORY_CASES = {
    "plain MultiSimilarityLoss": lambda: losses.MultiSimilarityLoss(),
    **{f"LoOpLoss(MultiSimilarityLoss), backend={b}": functools.partial(
        lambda b: LoOpLoss(losses.MultiSimilarityLoss(), backend=b), b) for b in BACKENDS},
}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(case: str, b: int, threads: int) -> None:
    """One case per fresh process: the high-water mark only grows."""
    torch.set_num_threads(threads)
    loss = MEMORY_CASES[case]()
    # One small step first: what the first call loads once (numba's compiled
    # kernels, about 40 MB) is no part of the computation's peak.
    small, small_labels = batch(4, 4)
    loss(small, small_labels).backward()
    emb, labels = batch(b // 4, 4)
    # Reset the high-water mark to the current resident size (Linux), so that
    # the peak of importing torch does not hide the computation's.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    t = time.perf_counter()
    loss(emb, labels).backward()
    elapsed = time.perf_counter() - t
    print(json.dumps(dict(seconds=elapsed, extra_peak_mb=(_status_kb("VmHWM") - base) / 1024,
                          finite=bool(torch.isfinite(emb.grad).all()))))


def memory(quick: bool, threads: int) -> None:
    print("\n## memory: peak resident memory above the inputs, forward + backward, d = 512, m = 4")
    for b in ((1024,) if quick else (1024, 4096)):
        row = {}
        for case in MEMORY_CASES:
            out = subprocess.run([sys.executable, __file__, "--memory-child", case, str(b), str(threads)],
                                 capture_output=True, text=True, check=True)
            row[case] = json.loads(out.stdout.strip().splitlines()[-1])
        plain, *loops = (row[c] for c in MEMORY_CASES)
        print(f"B = {b}: plain {plain['extra_peak_mb']:.0f} MB ({plain['seconds']:.2f} s)" + "".join(
              f", LoOp {backend} {loop['extra_peak_mb']:.0f} MB ({loop['seconds']:.2f} s, "
              f"{loop['extra_peak_mb'] / plain['extra_peak_mb']:.2f}x, finite gradients: {loop['finite']})"
              for backend, loop in zip(BACKENDS, loops)), flush=True)


_FIRST_CALL = """
import json, time
t = time.perf_counter()
import torch
from pytorch_metric_learning import losses
from pml_loop import LoOpLoss
imported = time.perf_counter() - t
torch.set_num_threads({threads})
emb, labels = torch.randn(128, 512, requires_grad=True), torch.arange(32).repeat_interleave(4)
loss = LoOpLoss(losses.MultiSimilarityLoss(), backend="{backend}")
t = time.perf_counter()
loss(emb, labels).backward()
first = time.perf_counter() - t
t = time.perf_counter()
loss(emb, labels).backward()
print(json.dumps(dict(imported=imported, first=first, second=time.perf_counter() - t)))
"""


def first_call(quick: bool, threads: int) -> None:
    """What the first LoOp step of a process costs on each backend: numba
    compiles its kernels at the first use on a machine (cold: an empty disk
    cache) and loads them from its cache afterwards (warm)."""
    print("\n## first call: a fresh process, import + first and second LoOpLoss(MultiSimilarityLoss) step, B = 128")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = [("torch", "")] + [("numba", "cold cache"), ("numba", "warm cache")] * ("numba" in BACKENDS)
        for backend, label in runs:
            out = subprocess.run([sys.executable, "-c", _FIRST_CALL.format(threads=threads, backend=backend)],
                                 capture_output=True, text=True, check=True, env=env)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"backend={backend}{', ' + label if label else ''}: import {r['imported']:.2f} s, first step "
                  f"{r['first']:.2f} s, second {1e3 * r['second']:.1f} ms", flush=True)


def train(quick: bool) -> None:
    """One optimiser step of the runner's default model on glyph batches."""
    from pml_loop.data.kanji import downsample, load_glyph_arrays
    from pml_loop.models import MLP, GlyphCNN
    images = load_glyph_arrays()["images"][:, :32]  # (faces, classes, 32, 32)
    g = torch.Generator().manual_seed(0)
    faces = torch.randint(0, images.shape[0], (32, 4), generator=g)
    picked = images[faces.numpy(), torch.arange(32)[:, None].numpy()].reshape(128, 32, 32)
    x = torch.from_numpy(downsample(picked, 16)).float().unsqueeze(1) / 255
    labels = torch.arange(32).repeat_interleave(4)
    torch.manual_seed(0)
    trunk = GlyphCNN()
    model = torch.nn.Sequential(trunk, MLP([trunk.output_size, 128]))
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def run(loss):
        def f():
            opt.zero_grad()
            loss(model(x), labels).backward()
            opt.step()
        return f

    print("\n## train: one step of the glyph CNN (16 x 16, batch 128 = 32 x 4, 128-d), median")
    for name in ("Triplet", "MultiSimilarity"):
        fns = {"plain": run(LOSSES[name]())}
        for b in BACKENDS:
            fns[b] = run(LoOpLoss(LOSSES[name](), backend=b))
        for b, other in against_backends().items():
            fns["against " + b] = run(other(LOSSES[name]()))
        t = median_times(fns, 10 if quick else 40)
        against = "".join(f", --against build {b} {t['against ' + b] / t['plain']:.3f}x" for b in against_backends())
        print(f"{name}: plain {1e3 * t['plain']:.1f} ms" + "".join(
              f", LoOp {b} {1e3 * t[b]:.1f} ms ({t[b] / t['plain']:.3f}x)" for b in BACKENDS) + against, flush=True)


def kernel_calls(package: str, b: int, geometry: str):
    """The numba search and gradient of ``package`` (this build's ``pml_loop``
    or ``pml_loop_against``) on a batch of ``b`` (m = 4; arcs: unit
    embeddings, segments: raw ones), as two calls without arguments."""
    mod = importlib.import_module(package)
    kernels_of = importlib.import_module(package + ".backend")
    kernels_of._announced = True  # the compile, if any, is the warm-up call's
    gram_blocks = importlib.import_module(package + ".batch_loop").gram_blocks
    from pytorch_metric_learning.distances import LpDistance

    emb, labels = batch(b // 4, 4)
    x = emb.detach()
    if geometry == "arc":
        x = torch.nn.functional.normalize(x, dim=1)
    dist = mod.LoOpDistance(LpDistance(normalize_embeddings=geometry == "arc"), backend="numba")
    blocks = gram_blocks(x, x, True)
    st = dist._structure(blocks, labels, labels, True)
    gram, chunk = blocks.qr, dist._chunk(x.device)
    _, combo = kernels_of.search(gram, gram, gram, st.layout, geometry, st.plan.combos, chunk)
    grad = torch.rand(b, b, generator=torch.Generator().manual_seed(1)) * (labels[:, None] != labels[None, :])
    return (lambda: kernels_of.search(gram, gram, gram, st.layout, geometry, st.plan.combos, chunk),
            lambda: kernels_of.gradient(gram, gram, gram, st.layout, geometry, combo, grad, chunk))


def kernels(quick: bool) -> None:
    """The numba backend's two kernels alone, with ``--against`` that
    build's too, interleaved; the fastest call (the least disturbed)."""
    print("\n## kernels: the numba search and gradient alone (one set, m = 4, d = 512, dense gradient), "
          "fastest of interleaved calls, ms")
    if "numba" not in BACKENDS:
        print("skipped: numba is not installed")
        return
    builds = {"this build": "pml_loop"}
    if AGAINST is not None:
        try:
            kernel_calls("pml_loop_against", 64, "arc")
            builds["--against build"] = "pml_loop_against"
        except Exception as exc:  # a build from before the numba backend
            print(f"--against build left out: {type(exc).__name__}: {exc}")
    for b in ((128, 512) if quick else (128, 1024)):
        for geometry in ("arc", "segment"):
            fns = {}
            for label, package in builds.items():
                fns[f"{label} search"], fns[f"{label} gradient"] = kernel_calls(package, b, geometry)
            t = median_times(fns, 10 if quick else 25, reduce=min)
            print(f"B = {b}, {geometry}s: " + "; ".join(
                f"{label} search {1e3 * t[label + ' search']:.2f}, gradient {1e3 * t[label + ' gradient']:.2f}"
                for label in builds), flush=True)


def parts(quick: bool) -> None:
    """Where a LoOp step's time goes, in wall-clock time (the profiler inflates
    operations of a few microseconds): the step with the search and gradient
    passes replaced by their results from an earlier call is what the wrapper
    and the plain loss cost; the rest is those two passes inside a step. The
    passes are also timed alone, on the same inputs, called back to back."""
    import pml_loop.batch_loop as bl
    import pml_loop.distance as dist_mod
    reps = 20 if quick else 60
    originals = (dist_mod.search_winners, bl._winners_grad)
    captured = {}

    def cached(name, fn):
        def call(*a, **k):
            if name not in captured:
                captured[name] = (a, k, fn(*a, **k))
            return captured[name][2]
        return call

    def without_passes(fn):
        def run():
            with _replaced(dist_mod, "search_winners", cached("search", originals[0])), \
                    _replaced(bl, "_winners_grad", cached("gradient", originals[1])):
                fn()
        return run

    print("\n## parts: wall-clock split of one forward + backward, backend=\"torch\", d = 512, median")
    for name in ("MultiSimilarity", "Triplet"):
        emb, labels = batch(32, 4)
        loop = step(TORCH_LOOP(LOSSES[name]()), emb, labels)
        without = without_passes(loop)
        without()
        calls = {}
        for part, fn in (("search", originals[0]), ("gradient", originals[1])):
            a, k, _ = captured[part]
            a = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in a)
            calls[part] = functools.partial(fn, *a, **k)
        alone = {part: min_time(call, 400) for part, call in calls.items()}
        t = median_times({"plain": step(LOSSES[name](), emb, labels), "LoOp": loop, "LoOp, passes cached": without,
                          "passes alone": lambda: [call() for call in calls.values()]}, reps)
        passes = t["LoOp"] - t["LoOp, passes cached"]
        print(f"{name}, B = 128: plain {1e3 * t['plain']:.2f} ms, LoOp {1e3 * t['LoOp']:.2f} ms = "
              f"wrapper {1e3 * (t['LoOp, passes cached'] - t['plain']):.2f} + search and gradient passes "
              f"{1e3 * passes:.2f} ms; the passes alone, on the same inputs: {1e3 * t['passes alone']:.2f} ms "
              f"interleaved with the steps (median), search {1e3 * alone['search']:.2f} + gradient "
              f"{1e3 * alone['gradient']:.2f} ms called back to back (fastest of 400)", flush=True)
    for name, part, sizes in (("search", "search_winners", ((128, 4), (512, 4), (1024, 4))),
                              ("gradient", "_winners_grad", ((128, 4), (512, 4), (1024, 4), (128, 2), (128, 8)))):
        print(f"{name} pass alone, MultiSimilarity (median):", flush=True)
        for b, m in sizes:
            emb, labels = batch(b // m, m)
            fns = {"this build": captured_pass(TORCH_LOOP, part, emb, labels)}
            if AGAINST is not None:
                fns["--against build"] = captured_pass(torch_path(AGAINST), part, emb, labels)
            t = median_times(fns, max(5, reps * 128 // b))
            print(f"  B = {b}, m = {m}: " + ", ".join(f"{name} {1e3 * v:.2f} ms" for name, v in t.items()), flush=True)
    print("winning combinations visited by the gradient pass per negative entry of the upper triangle "
          "(MultiSimilarity, B = 128): " + ", ".join(f"m = {m}: {shared_winners(m):.2f}" for m in (2, 4, 8)), flush=True)
    t = rederivation_times(reps)
    print(f"finding the winners' optima again (arc_entry_optimum), MultiSimilarity, B = 128: gradient pass "
          f"{1e3 * t['pass']:.2f} ms, {1e3 * t['pass, optima cached']:.2f} ms with them cached; step "
          f"{1e3 * t['step']:.2f} ms, {1e3 * t['step, optima cached']:.2f} ms (plain {1e3 * t['plain']:.2f} ms)",
          flush=True)
    for noise, label in ((None, "random embeddings"), (0.5, "class centres + 0.5 x noise"),
                         (0.1, "class centres + 0.1 x noise")):
        kinds = winner_kinds(noise)
        print(f"winning combinations realised by a corner / an edge / the interior, B = 128, {label}: "
              + " / ".join(f"{kinds[k]:.3f}" for k in ("corner", "edge", "interior")), flush=True)
    print("triplets kept by TripletMarginLoss's reducer (a positive loss), B = 128: "
          + ", ".join(f"{k} {v:,}" for k, v in triplets_kept().items()), flush=True)
    emb, labels = batch(4, 4)
    t = median_times({"plain": step(losses.MultiSimilarityLoss(), emb, labels),
                      "LoOp": step(TORCH_LOOP(losses.MultiSimilarityLoss()), emb, labels)}, 5 * reps)
    print(f"fixed cost per call, MultiSimilarity, B = 16 (4 x 4): plain {1e3 * t['plain']:.2f} ms, "
          f"LoOp {1e3 * t['LoOp']:.2f} ms", flush=True)


def triplets_kept() -> dict:
    """How many of a B = 128 batch's triplets the triplet loss's reducer
    (``AvgNonZeroReducer``: a positive loss) keeps, plain and with LoOp: the
    loss's own gathers and backward handle that many."""
    emb, labels = batch(32, 4)
    kept = {}
    for name, wrap in (("plain", False), ("LoOp", True)):
        inner = losses.TripletMarginLoss()
        inner.reducer.collect_stats = True
        (TORCH_LOOP(inner) if wrap else inner)(emb, labels)
        kept[name] = inner.reducer.num_past_filter
    return kept


def rederivation_times(reps: int) -> dict:
    """Median times of the B = 128 multi-similarity gradient pass and LoOp
    step, as they are and with the gradient pass's ``arc_entry_optimum``
    replaced by its result from an earlier call (what finding each winner's
    optimum again costs), and of the plain step."""
    import pml_loop.batch_loop as bl
    emb, labels = batch(32, 4)
    original, cache = bl.arc_entry_optimum, {}

    def cached(fields):
        if fields.shape not in cache:
            cache[fields.shape] = original(fields)
        return cache[fields.shape]

    def optima_cached(fn):
        def run():
            with _replaced(bl, "arc_entry_optimum", cached):
                fn()
        return run

    gradient = captured_pass(TORCH_LOOP, "_winners_grad", emb, labels)
    loop = step(TORCH_LOOP(losses.MultiSimilarityLoss()), emb, labels)
    return median_times({"pass": gradient, "pass, optima cached": optima_cached(gradient), "step": loop,
                         "step, optima cached": optima_cached(loop),
                         "plain": step(losses.MultiSimilarityLoss(), emb, labels)}, reps)


def winner_kinds(noise: float | None) -> dict:
    """Which candidate realises the winning combinations the gradient pass
    visits (``LoOpLoss(MultiSimilarityLoss)``, B = 128, 32 x 4), as fractions:
    a corner (an end of each arc), an edge (an end against a point inside the
    other arc) or the interior. Random embeddings (``noise=None``), or class
    centres plus ``noise`` times a Gaussian, as trained embeddings cluster."""
    import pml_loop.batch_loop as bl
    from pml_loop.functional.grid import arc_entry_optimum
    emb, labels = batch(32, 4)
    if noise is not None:
        centres = torch.randn(32, emb.shape[1], generator=torch.Generator().manual_seed(1))
        emb = (centres[labels] + noise * emb.detach()).requires_grad_(True)
    seen, original = [], bl._arc_partials

    def spy(fields, grad):
        seen.append(fields)
        return original(fields, grad)

    with _replaced(bl, "_arc_partials", spy):
        step(TORCH_LOOP(losses.MultiSimilarityLoss()), emb, labels)()
    weights = arc_entry_optimum(torch.cat(seen, 1))[1]  # (2, 2, N): [[b1, a1], [b2, a2]]
    at_end = (weights == 0).any(0)  # (2, N): the point of each arc is one of its ends
    corner, end = at_end.all(0).float().mean().item(), at_end.any(0).float().mean().item()
    return {"corner": corner, "edge": end - corner, "interior": 1 - end}


def shared_winners(m: int) -> float:
    """Distinct winning combinations per negative entry (i < j) of a step's
    search, B = 128: what the CPU's gradient pass visits, per entry."""
    emb, labels = batch(128 // m, m)
    search, ((a, k),) = _calls(TORCH_LOOP, "search_winners", emb, labels)
    winners = search(*a, **k)
    negative = torch.triu(labels[:, None] != labels[None, :], diagonal=1)
    return len(torch.unique(winners.combo[negative])) / int(negative.sum())


@contextlib.contextmanager
def _replaced(module, name: str, value):
    """``module.name`` set to ``value`` for the duration of the block."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield original
    finally:
        setattr(module, name, original)


def _calls(loss_cls, part: str, emb, labels) -> tuple:
    """The search (``part="search_winners"``) or gradient (``"_winners_grad"``)
    pass of ``loss_cls``'s build (this one or ``--against``), and the
    arguments of each of its calls in one step."""
    package = getattr(loss_cls, "func", loss_cls).__module__.rsplit(".", 1)[0]  # through a partial
    module = sys.modules[package + (".distance" if part == "search_winners" else ".batch_loop")]
    original, seen = getattr(module, part), []

    def spy(*a, **k):
        seen.append((tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in a), k))
        return original(*a, **k)

    with _replaced(module, part, spy):
        step(loss_cls(losses.MultiSimilarityLoss()), emb, labels)()
    return original, seen


def captured_pass(loss_cls, part: str, emb, labels):
    """A pass of :func:`_calls` on the inputs of one step, as a call without arguments."""
    original, ((a, k),) = _calls(loss_cls, part, emb, labels)
    return lambda: original(*a, **k)


def profile_table(quick: bool) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function
    import pml_loop.batch_loop as bl
    emb, labels = batch(32, 4)
    loss = TORCH_LOOP(losses.MultiSimilarityLoss())
    originals = {}
    for fn in ("search_winners", "loop_entries"):
        originals[fn] = getattr(bl, fn)
    import pml_loop.distance as dist_mod

    def labelled(name, fn):
        def call(*a, **k):
            with record_function(name):
                return fn(*a, **k)
        return call

    dist_mod.search_winners = labelled("loop: search", originals["search_winners"])
    dist_mod.loop_entries = labelled("loop: entries", originals["loop_entries"])
    step(loss, emb, labels)()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5 if quick else 20):
            step(loss, emb, labels)()
    dist_mod.search_winners, dist_mod.loop_entries = originals["search_winners"], originals["loop_entries"]
    print("\n## profile: LoOpLoss(MultiSimilarityLoss), B = 128, d = 512 (CPU time per call)")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*",
                    default=["speed", "aten", "memory", "first", "train", "parts", "kernels", "profile"])
    ap.add_argument("--against", metavar="CHECKOUT",
                    help="also time this checkout's LoOpLoss (speed, train, parts, kernels)")
    ap.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        case, b, threads = args.memory_child
        return memory_child(case, int(b), int(threads))
    torch.set_num_threads(args.threads)
    if args.against:
        global AGAINST
        AGAINST = load_against(args.against)
    print(f"torch {torch.__version__}, {args.threads} threads" + (f", against {args.against}" if args.against else ""))
    for part in args.only:
        if part in ("memory", "first"):
            {"memory": memory, "first": first_call}[part](args.quick, args.threads)
        else:
            {"speed": speed, "aten": aten, "train": train, "parts": parts, "kernels": kernels,
             "profile": profile_table}[part](args.quick)


if __name__ == "__main__":
    main()
