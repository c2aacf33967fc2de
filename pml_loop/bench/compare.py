"""Plain vs LoOp-wrapped losses on the embedded glyphs: the project's main job.

    python -m pml_loop.bench.compare                      # ~11 min on 2 CPU cores (3 seeds)
    python -m pml_loop.bench.compare --tune --workers 2   # the tuned comparison, ~35 min
    python -m pml_loop.bench.compare --losses triplet loop_triplet --seeds 0 1 2
    python -m pml_loop.bench.compare --num_epochs_train 2  # any config override

Each (loss, seed) is a normal experiment folder ``<root>/<loss>_seed<seed>``
built from ``--config_loss_and_miners default <loss>``; a rerun resumes
unfinished runs and skips finished ones. Writes ``compare_results.md``,
``compare_results.csv`` and ``compare_map_at_r.png`` into the root folder
and prints the table: test metrics at the epoch with the best validation
MAP@R, and seconds per training iteration.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from . import cli, config, registry, runner, tune
from .config import ConfigError
from .plots import plot_curves

DEFAULT_LOSSES = ("triplet", "loop_triplet", "multi_similarity", "loop_multi_similarity")
# Three seeds: the table shows its own spread (one seed's MAP@R moves more
# between epochs than LoOp's effect).
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_ROOT = os.path.join("experiments", "compare")
TABLE_METRICS = (
    ("R@1", "recall_at_1"),
    ("MAP@R", "mean_average_precision_at_r"),
    ("NMI", "NMI"),
)
CURVE_METRIC = "mean_average_precision_at_r"
RESULT_FILES = {"markdown": "compare_results.md", "csv": "compare_results.csv", "plot": "compare_map_at_r.png"}


@dataclass
class RunSummary:
    """One (loss, seed) experiment, reduced to what the comparison shows."""

    loss: str
    seed: int
    experiment_dir: str
    test: Dict[str, float]
    val: Dict[str, float]
    best_epoch: Optional[int]
    seconds_per_iteration: Optional[float]
    curve_split: str = "test"
    curve: List[tuple] = field(default_factory=list)  # [(epoch, value)]
    skipped: bool = False
    wall_seconds: float = 0.0  # training and evaluation, over every session


# ----------------------------------------------------------------- running
def parse_args(argv: Optional[Sequence[str]] = None) -> tuple:
    """Compare's own flags, and the rest passed through to every run."""
    parser = argparse.ArgumentParser(
        prog="python -m pml_loop.bench.compare",
        description="Compare plain and LoOp-wrapped losses; other --key value pairs are "
        "config overrides passed to every run (e.g. --num_epochs_train 2).",
        allow_abbrev=False,
    )
    parser.add_argument("--losses", nargs="+", default=None,
                        help="config_loss_and_miners files layered on default (with --tune: "
                        "tune_<loss>.yaml holds each one's search space)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    parser.add_argument("--root_experiment_folder", default=None)
    parser.add_argument("--dataset_root", default=None)
    parser.add_argument("--root_config_folder", default=None)
    tuned = parser.add_argument_group(
        "tuned comparison",
        "--tune searches each loss's margin and the learning rates with the same budget "
        "for plain and LoOp, then retrains the best settings (pml_loop/bench/tune.py)",
    )
    tuned.add_argument("--tune", action="store_true")
    tuned.add_argument("--trials", type=int, default=tune.DEFAULT_TRIALS, help="trials per loss")
    tuned.add_argument("--reproductions", type=int, default=tune.DEFAULT_REPRODUCTIONS,
                       help="retrainings of each loss's best setting")
    tuned.add_argument("--workers", type=int, default=1,
                       help="processes sharing the searches (each gets cores / workers threads)")
    namespace, passthrough = parser.parse_known_args(argv)
    if namespace.losses is None:
        namespace.losses = list(tune.TUNE_LOSSES if namespace.tune else DEFAULT_LOSSES)
    if namespace.root_experiment_folder is None:
        namespace.root_experiment_folder = tune.DEFAULT_ROOT if namespace.tune else DEFAULT_ROOT
    if namespace.workers < 1:
        parser.error(f"--workers must be 1 or more, got {namespace.workers}")
    if namespace.workers > 1 and not namespace.tune:
        parser.error("--workers applies to --tune (the plain comparison runs its runs in turn)")
    return namespace, passthrough


def run_argv(loss: str, seed: int, options: argparse.Namespace, passthrough: Sequence[str], resume: bool) -> List[str]:
    """The bench command line of one (loss, seed) run."""
    argv = [
        "--experiment_name", experiment_name(loss, seed),
        "--root_experiment_folder", options.root_experiment_folder,
        "--config_loss_and_miners", "default", loss,
        "--seed", str(seed),
    ]
    if options.dataset_root:
        argv += ["--dataset_root", options.dataset_root]
    if options.root_config_folder:
        argv += ["--root_config_folder", options.root_config_folder]
    if resume:
        argv += ["--resume_training", "latest"]
    return argv + list(passthrough)


def experiment_name(loss: str, seed: int) -> str:
    return f"{loss}_seed{seed}"


def run_one(loss: str, seed: int, options: argparse.Namespace, passthrough: Sequence[str]) -> RunSummary:
    """Train (or resume, or skip when finished) one experiment."""
    directory = os.path.join(options.root_experiment_folder, experiment_name(loss, seed))
    resume = config.has_saved_config(directory)
    namespace, overrides = cli.parse_args(run_argv(loss, seed, options, passthrough, resume))
    cfg, provenance = cli.make_config(namespace, overrides)
    registry.check_buildable(cfg, provenance)
    runner.check_run_config(cfg)
    runner.check_data(cfg, options.dataset_root)
    config.save_config(cfg, provenance, directory)
    result = runner.run_experiment(
        cfg, directory, resume="latest" if resume else None, dataset_root=options.dataset_root
    )
    return summarize_run(loss, seed, result)


def summarize_run(loss: str, seed: int, result: runner.ExperimentResult) -> RunSummary:
    """The first fold's best-epoch metrics and its learning curve."""
    fold = result.folds[0]
    best = fold.state.best_accuracies
    evaluated = [s for h in fold.state.history for s in h.get("accuracies", {})]
    curve_split = "test" if "test" in evaluated else next(iter(evaluated), "test")
    curve = [
        (h["epoch"], h["accuracies"][curve_split][CURVE_METRIC])
        for h in fold.state.history
        if "accuracies" in h and curve_split in h["accuracies"]
    ]
    return RunSummary(
        loss=loss, seed=seed, experiment_dir=result.experiment_dir,
        test=best.get("test", {}), val=best.get("val", {}),
        best_epoch=fold.state.best_epoch, seconds_per_iteration=fold.seconds_per_iteration,
        curve_split=curve_split, curve=curve, skipped=fold.skipped,
        wall_seconds=sum(f.state.wall_seconds for f in result.folds),
    )


# ----------------------------------------------------------------- tables
def mean_std(values: Sequence[Optional[float]]) -> tuple:
    """Mean and sample standard deviation (None with fewer than two values)."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    std = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return float(np.mean(present)), std


def aggregate(runs: Sequence[RunSummary], losses: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per loss: mean and std over seeds of each table metric."""
    rows = []
    for loss in losses:
        mine = [r for r in runs if r.loss == loss]
        if not mine:
            continue
        row: Dict[str, Any] = {"loss": loss, "loop": loss.startswith("loop_"), "seeds": len(mine)}
        for label, metric in TABLE_METRICS:
            row[label] = mean_std([r.test.get(metric) for r in mine])
        row["val MAP@R"] = mean_std([r.val.get(CURVE_METRIC) for r in mine])
        row["s/it"] = mean_std([r.seconds_per_iteration for r in mine])
        rows.append(row)
    return rows


def difference(loop: tuple, plain: tuple, n_loop: int, n_plain: int) -> tuple:
    """(mean difference, its standard error) of two (mean, std) cells; the
    error is None without a spread on both sides."""
    (a, sa), (b, sb) = loop, plain
    if a is None or b is None:
        return None, None
    if sa is None or sb is None:
        return a - b, None
    return a - b, float(np.sqrt(sa**2 / n_loop + sb**2 / n_plain))


def loop_gains(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """For each `x` with a `loop_x` row: LoOp minus plain, per metric, with
    the standard error of the difference over seeds."""
    by_loss = {r["loss"]: r for r in rows}
    gains = []
    for loss, row in by_loss.items():
        plain = by_loss.get(loss[len("loop_"):]) if row["loop"] else None
        if plain is None:
            continue
        gain = {"loss": plain["loss"]}
        for label, _ in TABLE_METRICS:
            gain[label] = difference(row[label], plain[label], row["seeds"], plain["seeds"])
        a, b = row["s/it"][0], plain["s/it"][0]
        gain["s/it ratio"] = None if not a or not b else a / b
        gains.append(gain)
    return gains


COLUMNS = ("loss", "LoOp") + tuple(label for label, _ in TABLE_METRICS) + ("val MAP@R", "s/it", "seeds")


def _cell(value: Any, digits: int = 4) -> str:
    if isinstance(value, tuple):
        mean, std = value
        if mean is None:
            return "-"
        return f"{mean:.{digits}f}" if not std else f"{mean:.{digits}f} ± {std:.{digits}f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:+.{digits}f}"
    return "-" if value is None else str(value)


def table_cells(rows: Sequence[Dict[str, Any]]) -> List[List[str]]:
    out = []
    for row in rows:
        cells = [row["loss"], _cell(row["loop"])]
        cells += [_cell(row[label]) for label, _ in TABLE_METRICS]
        cells += [_cell(row["val MAP@R"]), _cell(row["s/it"], 5), str(row["seeds"])]
        out.append(cells)
    return out


def format_text_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *cells)]
    line = lambda values: "  ".join(str(v).ljust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(c) for c in cells])


def format_markdown_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


def _gain_cell(value: tuple, digits: int = 4) -> str:
    mean, error = value
    if mean is None:
        return "-"
    return f"{mean:+.{digits}f}" if error is None else f"{mean:+.{digits}f} ± {error:.{digits}f}"


def gain_cells(gains: Sequence[Dict[str, Any]]) -> tuple:
    header = ["LoOp - plain (± s.e.)"] + [label for label, _ in TABLE_METRICS] + ["s/it ratio"]
    cells = [
        [g["loss"]] + [_gain_cell(g[label]) for label, _ in TABLE_METRICS]
        + ["-" if g["s/it ratio"] is None else f"{g['s/it ratio']:.2f}x"]
        for g in gains
    ]
    return header, cells


def write_results(runs: Sequence[RunSummary], losses: Sequence[str], folder: str, note: str = "") -> Dict[str, str]:
    """The markdown table, the CSV (one line per run) and the MAP@R plot."""
    os.makedirs(folder, exist_ok=True)
    rows = aggregate(runs, losses)
    gains = loop_gains(rows)
    paths = {k: os.path.join(folder, v) for k, v in RESULT_FILES.items()}
    markdown = ["# Plain vs LoOp", "", note, "", format_markdown_table(COLUMNS, table_cells(rows))]
    if gains:
        markdown += ["", format_markdown_table(*gain_cells(gains))]
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(markdown) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        metrics = [m for _, m in TABLE_METRICS]
        writer.writerow(["loss", "loop", "seed", "best_epoch", "seconds_per_iteration", "wall_seconds"]
                        + [f"test_{m}" for m in metrics] + [f"val_{CURVE_METRIC}", "experiment_dir"])
        for r in runs:
            writer.writerow([r.loss, r.loss.startswith("loop_"), r.seed, r.best_epoch, r.seconds_per_iteration,
                             round(r.wall_seconds, 3)]
                            + [r.test.get(m) for m in metrics] + [r.val.get(CURVE_METRIC), r.experiment_dir])
    curves = {loss: [tuple(zip(*r.curve)) for r in runs if r.loss == loss and r.curve] for loss in losses}
    split = runs[0].curve_split if runs else "test"
    plot_curves({k: v for k, v in curves.items() if v}, paths["plot"],
                ylabel=f"{split} MAP@R", title=f"{split} MAP@R per epoch (epoch 0 = untrained)")
    return paths


def format_report(runs: Sequence[RunSummary], losses: Sequence[str]) -> str:
    rows = aggregate(runs, losses)
    text = format_text_table(COLUMNS, table_cells(rows))
    gains = loop_gains(rows)
    if gains:
        text += "\n\n" + format_text_table(*gain_cells(gains))
    return text


# ------------------------------------------------------------------- main
def compare(options: argparse.Namespace, passthrough: Sequence[str]) -> List[RunSummary]:
    runs = []
    total = len(options.losses) * len(options.seeds)
    for seed in options.seeds:
        for loss in options.losses:
            print(f"[{len(runs) + 1}/{total}] {experiment_name(loss, seed)}", flush=True)
            runs.append(run_one(loss, seed, options, passthrough))
    return runs


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options, passthrough = parse_args(argv)
    if options.tune:
        return tune.main(options, passthrough, argv)
    start = time.perf_counter()
    try:
        runs = compare(options, passthrough)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    wall = sum(r.wall_seconds for r in runs)
    note = (
        f"Test metrics at the epoch with the best val MAP@R, mean ± standard deviation over "
        f"seeds {options.seeds}; s/it = mean seconds per training iteration of the fastest epoch "
        f"(other jobs only slow epochs down). Overrides: {' '.join(passthrough) or 'none'}. "
        f"Wall time of the runs: {wall:.0f} s (this call: {elapsed:.0f} s)."
    )
    paths = write_results(runs, options.losses, options.root_experiment_folder, note)
    print()
    print(format_report(runs, options.losses))
    print()
    print(note)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
