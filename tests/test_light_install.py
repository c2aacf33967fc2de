"""`pip install pml-loop` is the trio only; the runner is the `bench` extra.

Imports are checked in fresh interpreters: this test process has already
imported the runner and its dependencies, so its sys.modules says nothing.
"""

import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pml_loop._extras import BENCH_INSTALL_COMMAND, DATA_MODULES, RUNNER_MODULES

REPO = Path(__file__).resolve().parents[1]
RUNNER_ONLY_MODULES = ("faiss", "record_keeper", "tensorboard", "matplotlib", "tqdm", "yaml", "PIL", "optuna")
# Never dependencies of PML itself, so importing pml_loop must not load them at all.
NEVER_WITH_THE_TRIO = ("faiss", "record_keeper", "tensorboard", "matplotlib", "yaml", "PIL", "optuna")


def run_python(code: str) -> subprocess.CompletedProcess:
    # the package under test first on the path, whether installed or not
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


def loaded_after(imports: str) -> set:
    """Which of RUNNER_ONLY_MODULES a fresh interpreter has loaded after `imports`."""
    code = (f"import sys, json\n{imports}\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({RUNNER_ONLY_MODULES!r}))))")
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_importing_the_trio_loads_no_runner_dependency():
    loaded = loaded_after("import pml_loop, pml_loop.functional\n"
                          "from pml_loop import LoOpDistance, LoOpLoss, LoOpMiner, LoOpReducer")
    assert not loaded & set(NEVER_WITH_THE_TRIO), loaded
    # PML imports tqdm itself (it is PML's dependency, installed with the
    # trio anyway); pml_loop may load nothing beyond what PML loads
    by_pml = loaded_after("import pytorch_metric_learning.losses, pytorch_metric_learning.miners, "
                          "pytorch_metric_learning.reducers, pytorch_metric_learning.distances")
    assert loaded <= by_pml, loaded - by_pml


def hide_modules(*names: str) -> str:
    # a None entry in sys.modules makes both import and find_spec see "not installed"
    return "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in names)


@pytest.mark.parametrize("start", [
    "import runpy; runpy.run_module('pml_loop.bench', run_name='__main__')",  # pml-loop-bench
    "from pml_loop.bench.compare import main; main()",  # pml-loop-compare
])
def test_runner_without_its_extra_names_the_pip_command(start):
    done = run_python(hide_modules("yaml", "record_keeper") + start)
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert "MissingExtraError" in last_line and BENCH_INSTALL_COMMAND in last_line, done.stderr
    assert "pyyaml, record-keeper" in last_line  # every missing package at once


def test_data_without_pillow_names_the_pip_command():
    done = run_python(hide_modules("PIL") + "import pml_loop.data")
    assert done.returncode != 0 and BENCH_INSTALL_COMMAND in done.stderr and "pillow" in done.stderr


def requirement_names(block: str) -> set:
    return {line.split(">")[0].split("=")[0].split("<")[0].strip() for line in block.split("\n") if line.strip()}


def test_setup_cfg_extras():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    core = requirement_names(cfg["options"]["install_requires"])
    extras = {name: requirement_names(value) for name, value in cfg["options.extras_require"].items()}
    assert core == {"torch", "pytorch-metric-learning", "numpy"}
    assert extras["numba"] == {"numba"} and "numba" in extras["bench"]  # the runner trains on the fast path
    assert extras["gpu"] == extras["bench"] - {"faiss-cpu"} | {"faiss-gpu"}
    assert extras["test"] == extras["bench"] | {"pytest", "scipy", "fonttools", "nbclient", "nbformat", "ipykernel"}
    # what the import-time checks ask for is what the extra installs
    assert set(RUNNER_MODULES.values()) | set(DATA_MODULES.values()) <= extras["bench"]
