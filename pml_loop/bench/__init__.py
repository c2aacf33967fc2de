"""The benchmark runner: powerful-benchmarker-style YAML configs -> PML training
-> PML tester -> record-keeper logs, checkpoints and comparisons.

Entry points: ``python -m pml_loop.bench`` (one experiment, `__main__.main`)
and ``python -m pml_loop.bench.compare`` (plain vs LoOp losses). Modules:
`config` / `cli` / `registry` (configs to objects), `runner` (training),
`evaluation` (Recall@K accuracy calculator), `checkpoint` (exact resume),
`compare` and `plots`; `search_space` / `search` (the
hyperparameter search, ``--bayes_opt_iters``; needs optuna). Submodules are not imported here, so importing the
package stays cheap and a CLI error never waits on torch.
"""

from .._extras import RUNNER_MODULES, require_bench_extra

# Fail here, with the pip command, rather than halfway into a run.
require_bench_extra("the benchmark runner (pml_loop.bench)", RUNNER_MODULES)
