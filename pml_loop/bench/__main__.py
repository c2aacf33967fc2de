"""`python -m pml_loop.bench` / `pml-loop-bench`: train or evaluate an experiment.

Order matters: the config is merged, validated and every object that can be
built before training is built (`registry.check_buildable`), so a typo in a
class name or keyword stops the run in seconds with the file and key to edit,
not after the first epoch. ``--bayes_opt_iters`` (and the other search
flags) hand the command line to `search.main`.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence

from . import cli, config, distributed, registry, runner
from .config import ConfigError

EXIT_CONFIG_ERROR = 2
SUMMARY_METRICS = ("precision_at_1", "recall_at_1", "mean_average_precision_at_r", "NMI")


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def format_summary(result: runner.ExperimentResult, primary_metric: str) -> str:
    """Per fold: best epoch, seconds/iteration, and each split's headline
    metrics at the best epoch; then the mean over folds."""
    lines = [f"experiment: {result.experiment_dir}"]
    metrics = [primary_metric] + [m for m in SUMMARY_METRICS if m != primary_metric]
    for fold in result.folds:
        status = "already finished" if fold.skipped else "finished"
        lines.append(
            f"fold {fold.fold} ({status}): best epoch {_fmt(fold.state.best_epoch)}, "
            f"{_fmt(fold.seconds_per_iteration)} s/iteration (fastest epoch), "
            f"{_fmt(fold.median_seconds_per_iteration)} (median)"
        )
        for split, values in fold.state.best_accuracies.items():
            shown = ", ".join(f"{m}={_fmt(values.get(m))}" for m in metrics if m in values)
            lines.append(f"  {split}: {shown}")
    if len(result.folds) > 1:
        lines.append(f"mean over {len(result.folds)} folds:")
        for split in runner.summary_splits(result.meta):
            values = result.meta[split]
            if primary_metric in values:
                shown = ", ".join(
                    f"{m}={values[m]['mean']:.4f}±{values[m]['std']:.4f}" for m in metrics if m in values
                )
                lines.append(f"  {split}: {shown}")
    return "\n".join(lines)


def format_evaluation(results: Dict[int, Dict[str, Dict[str, float]]]) -> str:
    lines = []
    for fold, splits in results.items():
        for split, values in splits.items():
            shown = ", ".join(f"{m}={v:.4f}" for m, v in sorted(values.items()))
            lines.append(f"fold {fold} {split}: {shown}")
    return "\n".join(lines)


def prepare(argv: Optional[Sequence[str]]) -> tuple:
    """Parse, merge and check: (namespace, cfg, provenance). Raises
    ConfigError before anything is trained or written."""
    namespace, overrides = cli.parse_args(argv)
    cfg, provenance = cli.make_config(namespace, overrides)
    registry.check_buildable(cfg, provenance)
    runner.check_run_config(cfg)
    runner.check_data(cfg, namespace.dataset_root)
    return namespace, cfg, provenance


def is_search(argv: Optional[Sequence[str]]) -> bool:
    """Whether the command line asks for a hyperparameter search (any of its
    flags; the search itself reports a flag given without the others)."""
    namespace, _ = cli.parse_args(argv)
    return namespace.prune or any(
        getattr(namespace, flag) is not None for flag in ("bayes_opt_iters", "reproductions", "study_storage")
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (2 on a config error).

    Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set) every process runs this:
    all of them parse and check the config, the world size is checked against
    the global batch, and only then is the process group joined; rank 0 alone
    writes the configs, logs, checkpoints and prints the summary.
    """
    context = distributed.SINGLE
    try:
        if is_search(argv):
            # imported here: a plain run needs neither optuna nor its import time
            from . import search

            return search.main(argv)
        namespace, cfg, provenance = prepare(argv)
        experiment_dir = str(cli.experiment_dir(namespace))
        launch = distributed.launch_from_env()
        if launch is not None:
            distributed.check_world_size(cfg, launch.world_size)  # before anything is written
            context = distributed.setup(launch, cfg["device"], namespace.dist_timeout)
            # every rank has read the saved configs (resume) before rank 0 writes them
            context.barrier("checking the config")
        if namespace.evaluate:
            if not context.is_main:
                return 0  # evaluation needs one process; rank 0 does it
            which = namespace.resume_training or "best"
            results = runner.evaluate_experiment(cfg, experiment_dir, which, namespace.dataset_root)
            print(format_evaluation(results))
            return 0
        if context.is_main:
            # the saved folder describes what runs, overrides of a resumed run included
            config.save_config(cfg, provenance, experiment_dir)
        result = runner.run_experiment(
            cfg, experiment_dir, resume=namespace.resume_training,
            dataset_root=namespace.dataset_root, dist=context,
        )
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except FileNotFoundError as exc:  # --evaluate before any model was saved
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except distributed.DistributedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        distributed.teardown(context)
    if context.is_main:
        print(format_summary(result, cfg["eval_primary_metric"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
