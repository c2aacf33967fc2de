"""The tuned comparison, ``pml-loop-compare --tune``.

A LoOp distance is never larger than the plain one, so margins tuned for a
plain loss make the LoOp-wrapped one train on harder negatives than meant;
comparing both at one setting says little. This follows "A Metric Learning
Reality Check" (Musgrave et al., ECCV 2020): every variant, plain or LoOp,
gets the same search space and the same number of trials, scored on val;
the best setting of each is retrained with new seeds and reported on test
with a 95% confidence interval.

Each variant ``<loss>`` is one search (`search.run_search`) with the config
files ``config_loss_and_miners/tune_<loss>.yaml`` (the loss's margin),
``config_optimizers/tune.yaml`` (the learning rates) and
``config_general/tune.yaml`` (shorter runs), in ``<root>/tune_<loss>/``.
Several ``--workers`` share every study (optuna's storage): they take the
variants in the same order and split each one's trials.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

from .config import ConfigError

TUNE_LOSSES = (
    "triplet", "loop_triplet",
    "multi_similarity", "loop_multi_similarity",
    "contrastive", "loop_contrastive",
    "hphn_triplet", "loop_hphn_triplet",
)
DEFAULT_TRIALS = 8
DEFAULT_REPRODUCTIONS = 3
DEFAULT_ROOT = os.path.join("experiments", "compare_tuned")
REPORT_METRICS = (("R@1", "recall_at_1"), ("MAP@R", "mean_average_precision_at_r"))
RESULT_FILES = {"markdown": "tune_results.md", "csv": "tune_results.csv"}
# How often a worker that has run out of trials looks whether the others
# have finished theirs (and the reproductions).
POLL_SECONDS = 5.0


@dataclass
class TunedVariant:
    """One variant's search, reduced to the comparison's row."""

    loss: str
    best_params: dict
    best_value: Optional[float]
    trials: int
    test: dict  # metric -> search.MetricSummary over the reproductions
    wall_seconds: float
    experiment_dir: str


def search_argv(loss: str, options: argparse.Namespace, passthrough: Sequence[str]) -> List[str]:
    """The bench command line of one variant's search."""
    argv = [
        "--experiment_name", f"tune_{loss}",
        "--root_experiment_folder", options.root_experiment_folder,
        "--config_general", "default", "tune",
        "--config_optimizers", "default", "tune",
        "--config_loss_and_miners", "default", f"tune_{loss}",
        "--bayes_opt_iters", str(options.trials),
        "--reproductions", str(options.reproductions),
    ]
    if options.dataset_root:
        argv += ["--dataset_root", options.dataset_root]
    if options.root_config_folder:
        argv += ["--root_config_folder", options.root_config_folder]
    return argv + list(passthrough)


def experiment_wall_seconds(folder: str) -> float:
    """Seconds every run under `folder` spent (trials and reproductions),
    from their checkpoints, so a resumed or shared search counts each once."""
    from . import checkpoint as ckpt

    total = 0.0
    for dirpath, _, filenames in os.walk(folder):
        if ckpt.CHECKPOINT_NAMES[ckpt.LATEST] in filenames:
            saved = ckpt.load_checkpoint(dirpath)
            total += float(saved["state"].get("wall_seconds", 0.0))
    return total


def prepare_all(options: argparse.Namespace, passthrough: Sequence[str]) -> list:
    """Every variant's search, checked before any trains (ConfigError)."""
    from . import search

    setups = []
    for loss in options.losses:
        try:
            setups.append(search.prepare_search(search_argv(loss, options, passthrough)))
        except ConfigError as exc:
            raise ConfigError(f"--tune, loss {loss}: {exc}") from exc
    return setups


def run_tuned(options: argparse.Namespace, setups: Sequence[Any]) -> List[TunedVariant]:
    """Search every variant in turn, then wait for the other workers'
    trials and reproductions and collect the results."""
    from . import search

    results = []
    for index, setup in enumerate(setups):
        print(f"[{index + 1}/{len(setups)}] {setup.experiment_name}", flush=True)
        results.append(search.run_search(setup))
    variants = []
    for loss, setup, result in zip(options.losses, setups, results):
        # unfinished: another worker still holds trials or reproductions
        while not result.finished:
            time.sleep(POLL_SECONDS)
            result = search.run_search(setup)
        variants.append(TunedVariant(
            loss=loss, best_params=result.best_params, best_value=result.best_value,
            trials=sum(t.state == "COMPLETE" for t in result.trials), test=result.accuracy_report,
            wall_seconds=experiment_wall_seconds(result.experiment_dir), experiment_dir=result.experiment_dir,
        ))
    return variants


def without_workers_flag(argv: Sequence[str]) -> List[str]:
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--workers="):
            skip = False
            continue
        skip = arg == "--workers"
        if not skip:
            out.append(arg)
    return out


def start_workers(argv: Sequence[str], count: int) -> List[subprocess.Popen]:
    """`count` more processes of this same command, sharing every study
    (their progress bars show on stderr; the table is printed once, here)."""
    command = [sys.executable, "-m", "pml_loop.bench.compare", *argv, "--workers", "1"]
    return [subprocess.Popen(command, stdout=subprocess.DEVNULL) for _ in range(count)]


def thread_flags(passthrough: Sequence[str], workers: int) -> List[str]:
    """The flags that split the cores between the workers (none when
    --num_threads is given or there is one worker)."""
    if workers < 2 or "--num_threads" in passthrough:
        return []
    return ["--num_threads", str(max(1, (os.cpu_count() or 1) // workers))]


def main(options: argparse.Namespace, passthrough: Sequence[str], argv: Sequence[str]) -> int:
    """compare --tune: returns the exit status (2 on a config error)."""
    added = thread_flags(passthrough, options.workers)
    passthrough = [*passthrough, *added]
    start = time.perf_counter()
    try:
        setups = prepare_all(options, passthrough)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    others = start_workers([*without_workers_flag(argv), *added], options.workers - 1)
    variants = run_tuned(options, setups)
    failed = [p.args for p in others if p.wait() != 0]
    elapsed = time.perf_counter() - start
    note = (
        f"Each variant: {options.trials} trials (optuna TPE) over the same space, scored on val MAP@R; "
        f"the best setting retrained {options.reproductions} times with new seeds, test mean and 95% "
        f"Student-t interval over those. Workers: {options.workers}. Extra options: "
        f"{' '.join(passthrough) or 'none'}. Wall time of the runs: "
        f"{sum(v.wall_seconds for v in variants):.0f} s; this call: {elapsed:.0f} s."
    )
    paths = write_results(variants, options.root_experiment_folder, note)
    from .compare import format_text_table

    print()
    print(format_text_table(*table(variants)))
    print()
    print(note)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    if failed:
        print(f"error: a worker failed: {failed}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------ report
def short_name(dotted: str) -> str:
    """optimizers.trunk_optimizer.Adam.lr -> trunk lr; ...TripletMarginLoss.margin -> margin."""
    parts = dotted.split(".")
    if parts[0] == "optimizers":
        return f"{parts[1].replace('_optimizer', '')} {parts[-1]}"
    return parts[-1]


def _interval(summary: Any) -> str:
    if summary is None:
        return "-"
    if summary.half_width is None:
        return f"{summary.mean:.4f}"
    return f"{summary.mean:.4f} ± {summary.half_width:.4f}"


def table(variants: Sequence[TunedVariant]) -> tuple:
    header = ["loss", "LoOp", "best parameters", "val MAP@R (best trial)"]
    header += [f"test {label} (95% CI)" for label, _ in REPORT_METRICS] + ["trials", "wall s"]
    cells = []
    for v in variants:
        params = ", ".join(f"{short_name(k)} {value:.3g}" for k, value in v.best_params.items())
        row = [v.loss, "yes" if v.loss.startswith("loop_") else "no", params,
               "-" if v.best_value is None else f"{v.best_value:.4f}"]
        row += [_interval(v.test.get(metric)) for _, metric in REPORT_METRICS]
        cells.append(row + [str(v.trials), f"{v.wall_seconds:.0f}"])
    return header, cells


def write_results(variants: Sequence[TunedVariant], folder: str, note: str) -> dict:
    from .compare import format_markdown_table

    os.makedirs(folder, exist_ok=True)
    paths = {k: os.path.join(folder, v) for k, v in RESULT_FILES.items()}
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(["# Plain vs LoOp, each tuned", "", note, "", format_markdown_table(*table(variants))]) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        metrics = [m for _, m in REPORT_METRICS]
        writer.writerow(["loss", "loop", "best_params", "best_val", "trials", "wall_seconds"]
                        + [f"test_{m}_{s}" for m in metrics for s in ("mean", "ci_low", "ci_high")]
                        + ["experiment_dir"])
        for v in variants:
            values = []
            for m in metrics:
                s = v.test.get(m)
                values += [None, None, None] if s is None else [s.mean, s.ci_low, s.ci_high]
            writer.writerow([v.loss, v.loss.startswith("loop_"), v.best_params, v.best_value, v.trials,
                             round(v.wall_seconds, 1)] + values + [v.experiment_dir])
    return paths
