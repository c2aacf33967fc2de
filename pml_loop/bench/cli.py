"""powerful-benchmarker's command line: fixed flags plus ``--any_key <yaml>``.

    python -m pml_loop.bench --experiment_name triplet_vs_loop \\
        --config_loss_and_miners default loop_triplet \\
        --num_epochs_train 3 --trainer~APPLY~2 {batch_size: 64}

`parse_args` separates the known flags from the overrides (every other
``--key value``, the value parsed as YAML); `make_config` turns both into
the merged config the runner uses, honouring ``--resume_training``,
``--evaluate`` and ``--reproduce_results``. ``--bayes_opt_iters``,
``--reproductions`` and ``--study_storage`` belong to the hyperparameter
search (`search.py`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import (
    CONFIG_FOLDERS,
    ConfigError,
    FolderConfigs,
    Provenance,
    has_saved_config,
    load_config_folders,
    load_saved_folders,
    parse_yaml,
    saved_configs_dir,
    validate_config,
)
from .search_space import search_dimensions

DEFAULT_ROOT_EXPERIMENT_FOLDER = "experiments"
DEFAULT_DIST_TIMEOUT_S = 600.0  # = distributed.DEFAULT_TIMEOUT_S (not imported: cli stays torch-free)
# Flags taking a list of values; any other flag takes one value or none.
_LIST_FLAGS = set(CONFIG_FOLDERS) | {"splits_to_eval"}
# Flags that are also config keys: given on the command line, they override.
_FLAGS_ALSO_OVERRIDES = ("splits_to_eval",)


def build_parser() -> argparse.ArgumentParser:
    """The fixed flags (the overrides are not declared: any key is allowed)."""
    parser = argparse.ArgumentParser(
        prog="python -m pml_loop.bench",
        description=(
            "Train and evaluate metric-learning models from powerful-benchmarker-style "
            "config folders. Any other --key <yaml> merges into that top-level config key "
            "(merge keys such as --trainer~APPLY~2 {batch_size: 64} allowed)."
        ),
        allow_abbrev=False,  # an abbreviation would swallow a config override
    )
    parser.add_argument("--experiment_name", default=None, help="folder name of this experiment")
    parser.add_argument("--root_experiment_folder", default=DEFAULT_ROOT_EXPERIMENT_FOLDER)
    parser.add_argument("--dataset_root", default=None, help="where the datasets live")
    parser.add_argument(
        "--root_config_folder",
        default=None,
        help="folder with config_* subfolders whose files add to or shadow the shipped ones",
    )
    for folder in CONFIG_FOLDERS:
        parser.add_argument(
            f"--{folder}",
            nargs="+",
            default=None,
            metavar="NAME",
            help=f"files of {folder} merged in order (default: default); a name may be a path to a .yaml",
        )
    parser.add_argument("--resume_training", choices=("latest", "best"), default=None)
    parser.add_argument("--evaluate", action="store_true", help="only evaluate a trained experiment")
    parser.add_argument(
        "--reproduce_results", default=None, metavar="PATH", help="replay the saved config folder of PATH"
    )
    parser.add_argument("--splits_to_eval", nargs="+", default=None, metavar="SPLIT")
    parser.add_argument(
        "--dist_timeout",
        type=float,
        default=DEFAULT_DIST_TIMEOUT_S,
        metavar="SECONDS",
        help="with several processes (torchrun): how long a process waits for the others "
        "(including rank 0's evaluation) before it stops with an error instead of hanging",
    )
    search = parser.add_argument_group(
        "hyperparameter search",
        "config keys ending in ~BAYESIAN~, ~LOG_BAYESIAN~ or ~INT_BAYESIAN~ with a [low, high] "
        "value are searched; each trial is an experiment in <experiment>/<experiment><i>/",
    )
    search.add_argument("--bayes_opt_iters", type=int, default=None, metavar="N",
                        help="number of trials (all workers sharing the study together)")
    search.add_argument("--reproductions", type=int, default=None, metavar="R",
                        help="retrain the best setting R times with new seeds and report test metrics")
    search.add_argument("--study_storage", default=None, metavar="URL_OR_PATH",
                        help="optuna storage shared by workers: sqlite:///file.db, another RDB URL, or "
                        "a journal file path (default: <experiment>/optuna_journal.log)")
    search.add_argument("--prune", action="store_true",
                        help="stop a trial early when its val score after an epoch is below the median "
                        "of earlier trials' at that epoch (optuna's MedianPruner)")
    return parser


def _flag_names(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def _segments(argv: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``--flag v1 v2 --other v`` -> [("--flag", [v1, v2]), ("--other", [v])].

    ``--flag=value`` is split too. A token starting with ``--`` always opens
    a new flag, which is how powerful-benchmarker reads its command line.
    """
    segments: list[tuple[str, list[str]]] = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            flag, equals, value = token.partition("=")
            segments.append((flag, [value] if equals else []))
        elif not segments:
            raise ConfigError(f"command line: {token!r}: expected --flag or --config_key before it")
        else:
            segments[-1][1].append(token)
    return segments


def _yaml_list(values: list[str], flag: str) -> list[Any]:
    """Accept both ``--flag a b`` and ``--flag [a, b]``."""
    joined = " ".join(values)
    if joined.lstrip().startswith("["):
        parsed = parse_yaml(joined, f"command line {flag}")
        if not isinstance(parsed, list):
            raise ConfigError(f"command line {flag}: expected a list, got {joined!r}")
        return [str(v) for v in parsed]
    return [v.rstrip(",") for v in values]


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Split the command line into the known flags and the config overrides.

    Returns ``(namespace, overrides)``; `overrides` maps each other
    ``--key`` (merge suffixes kept, e.g. ``"trainer~APPLY~2"``) to its
    YAML-parsed value, in command-line order. ``--splits_to_eval`` is both
    a flag and an override of the `splits_to_eval` config key.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    known = _flag_names(parser)
    known_argv: list[str] = []
    overrides: dict[str, Any] = {}
    for flag, values in _segments(argv):
        name = flag[2:]
        if flag in known:
            known_argv.append(flag)
            known_argv.extend(_yaml_list(values, flag) if name in _LIST_FLAGS and values else values)
            continue
        if name in overrides:
            raise ConfigError(f"command line {flag}: given twice")
        overrides[name] = _override_value(flag, values)
    namespace = parser.parse_args(known_argv)
    for name in _FLAGS_ALSO_OVERRIDES:
        if getattr(namespace, name) is not None:
            overrides[name] = getattr(namespace, name)
    return namespace, overrides


def _override_value(flag: str, values: list[str]) -> Any:
    if not values:
        if flag.endswith("~DELETE~"):
            return None
        raise ConfigError(f"command line {flag}: needs a value (a YAML value such as 3 or {{lr: 0.1}})")
    return parse_yaml(" ".join(values), f"command line {flag}")


def experiment_dir(namespace: argparse.Namespace) -> Path:
    """``<root_experiment_folder>/<experiment_name>``."""
    if not namespace.experiment_name:
        raise ConfigError("command line: --experiment_name is required")
    return Path(namespace.root_experiment_folder).expanduser() / namespace.experiment_name


def load_configs(
    namespace: argparse.Namespace, overrides: dict[str, Any], *, rerun_same: bool = False
) -> FolderConfigs:
    """The per-folder configs this run uses (what the runner saves).

    - ``--reproduce_results PATH``: PATH's saved configs, then the overrides
      (e.g. a different ``--dataset_root`` is a flag, not a config change);
    - ``--resume_training`` / ``--evaluate``: the experiment's own saved
      configs, then the overrides;
    - otherwise the config folders merged fresh; refused when the experiment
      already has saved configs, so a finished run is never silently mixed
      with a different config. With ``rerun_same=True`` (a search, which is
      resumed by running the same command again) an existing experiment is
      accepted when its saved config equals the fresh merge.
    """
    if namespace.reproduce_results:
        configs = load_saved_folders(namespace.reproduce_results)
        configs.apply_overrides(overrides)
        return configs
    directory = experiment_dir(namespace)
    if namespace.resume_training or namespace.evaluate:
        flag = "--resume_training" if namespace.resume_training else "--evaluate"
        if not has_saved_config(directory):
            raise ConfigError(f"{flag}: {saved_configs_dir(directory)}: no saved config to resume from")
        configs = load_saved_folders(directory)
        configs.apply_overrides(overrides)
        return configs
    exists = has_saved_config(directory)
    if exists and not rerun_same:
        raise ConfigError(
            f"{saved_configs_dir(directory)}: experiment '{namespace.experiment_name}' already exists; "
            "pass --resume_training latest|best or --evaluate, or pick another --experiment_name"
        )
    names = {folder: getattr(namespace, folder) for folder in CONFIG_FOLDERS if getattr(namespace, folder)}
    configs = load_config_folders(names, namespace.root_config_folder, overrides)
    if exists:
        saved = load_saved_folders(directory).merged()
        fresh = configs.merged()
        if saved != fresh:
            changed = sorted(k for k in set(saved) | set(fresh) if saved.get(k) != fresh.get(k))
            raise ConfigError(
                f"{saved_configs_dir(directory)}: experiment '{namespace.experiment_name}' already exists "
                f"with a different config (top-level keys that differ: {', '.join(map(str, changed))}); "
                "run the same command to resume it, add --resume_training latest to use its saved "
                "config, or pick another --experiment_name"
            )
    return configs


def make_config(
    namespace: argparse.Namespace, overrides: dict[str, Any], *, validate: bool = True
) -> tuple[dict[str, Any], Provenance]:
    """The merged config (one dict with SCHEMA.md's keys) and its provenance.

    Checked with `validate_config` unless ``validate=False``. The runner
    saves it with ``config.save_config(cfg, provenance, experiment_dir(ns))``.
    A config holding search dimensions (``key~BAYESIAN~: [low, high]``) is
    refused here: it is not one experiment but a search (`search.py`).
    """
    configs = load_configs(namespace, overrides)
    cfg = configs.merged()
    refuse_search_keys(cfg, configs.provenance)
    if validate:
        validate_config(cfg, configs.provenance)
    return cfg, configs.provenance


def refuse_search_keys(cfg: dict[str, Any], provenance: Provenance) -> None:
    """Raise a ConfigError naming the first search key of `cfg`, if any
    (after the search's own bounds checks, so a typo there is named too)."""
    dims = search_dimensions(cfg, provenance)
    if dims:
        others = f" (and {len(dims) - 1} more)" if len(dims) > 1 else ""
        raise ConfigError(
            f"{dims[0].where}{others}: a search dimension, which needs --bayes_opt_iters N "
            "(the number of trials); to run one experiment give the key a plain value instead"
        )


__all__ = [
    "DEFAULT_ROOT_EXPERIMENT_FOLDER",
    "build_parser",
    "experiment_dir",
    "load_configs",
    "make_config",
    "parse_args",
    "refuse_search_keys",
]
