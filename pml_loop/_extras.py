"""Clear errors where an optional part of pml-loop is used without its extra.

`pip install pml-loop` brings only what the trio (LoOpLoss, LoOpMiner,
LoOpReducer, LoOpDistance) needs. The benchmark runner and the datasets need
the ``bench`` extra; without it they should say how to get it instead of
failing on a bare "No module named 'yaml'" from deep inside an import.

Only the standard library is used here, and nothing is imported by the
checks themselves (`find_spec` only looks the modules up), so a check costs
nothing where the extra is installed.
"""

from __future__ import annotations

import importlib.util
from typing import List, Mapping

BENCH_INSTALL_COMMAND = 'pip install "pml-loop[bench]"'

# import name -> distribution name (what the user would type), for each
# package of the `bench` extra that the part cannot start without. faiss is
# left out: the runner falls back to PyTorch kNN and k-means without it.
RUNNER_MODULES = {
    "yaml": "pyyaml",
    "record_keeper": "record-keeper",
    "tensorboard": "tensorboard",
    "matplotlib": "matplotlib",
    "PIL": "pillow",
}
DATA_MODULES = {"PIL": "pillow"}
# The hyperparameter search (--bayes_opt_iters) adds optuna.
SEARCH_MODULES = {**RUNNER_MODULES, "optuna": "optuna"}


class MissingExtraError(ImportError):
    """A package of the `bench` extra is not installed."""


def missing_distributions(modules: Mapping[str, str]) -> List[str]:
    """Distribution names of the `modules` that cannot be imported."""
    return [dist for name, dist in modules.items() if importlib.util.find_spec(name) is None]


def require_bench_extra(part: str, modules: Mapping[str, str]) -> None:
    """Raise MissingExtraError naming every missing package of `part` at
    once (not one per attempt) and the command that installs them."""
    missing = missing_distributions(modules)
    if missing:
        raise MissingExtraError(
            f"{part} needs {', '.join(missing)}, which `pip install pml-loop` does not install "
            f"(it brings only the LoOp loss, miner, reducer and distance). "
            f"Install the benchmark extra: {BENCH_INSTALL_COMMAND}"
        )
