"""Hyperparameter search in powerful-benchmarker's interface, run by optuna.

    python -m pml_loop.bench --experiment_name tune_margin --bayes_opt_iters 20 \\
        --reproductions 3 --loss_funcs~APPLY~3 "{margin~BAYESIAN~: [0.01, 0.5]}"

Config keys ending in ``~BAYESIAN~``, ``~LOG_BAYESIAN~`` or ``~INT_BAYESIAN~``
are the search dimensions (`search_space`). Each trial is a normal experiment
in its own folder, scored by the mean over folds of the primary metric on the
val split; the best setting is then retrained ``--reproductions`` times with
new seeds and reported on the test split. Layout of ``<root>/<experiment>/``::

    configs/                         the search's config (search keys kept)
    <experiment><i>/                 trial i: a normal experiment folder
    <experiment>_reproduction<j>/    reproduction j of the best setting
    optuna_journal.log               the study (unless --study_storage)
    best_parameters.yaml             best trial, its parameters and value
    accuracy_report.yaml             test metrics over the reproductions: mean, 95% CI
    optimization_trace.png           objective per trial and best so far
    objective_vs_parameters.png      objective against each dimension
    bayes_opt_logs/saved_csvs/       record-keeper table of the trials (CSV + logs.db)
    search.log                       what each worker did

Resuming and workers. The study lives in persistent storage, so running the
same command again resumes, and several processes running it share the
study. The trial budget counts every trial not FAILED (finished, running or
queued), and a trial that finds ``N`` such trials numbered below it is
dropped (marked FAILED with ``over_budget``): workers together run exactly
``N`` trials. A RUNNING trial whose worker died (same host: the process is
gone; another host: no heartbeat for `STALE_AFTER_S`) is marked FAILED and
its parameters are queued again with its folder, so the retry resumes the
killed run from its last checkpoint; a complete folder is never retrained.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from .._extras import SEARCH_MODULES, require_bench_extra

require_bench_extra("the hyperparameter search (--bayes_opt_iters)", SEARCH_MODULES)

import optuna  # noqa: E402  (after the check, which names the pip command)
from optuna.exceptions import UpdateFinishedTrialError  # noqa: E402
from optuna.storages.journal import JournalFileBackend, JournalStorage  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from . import cli, config, registry, runner  # noqa: E402
from .config import ConfigError, Provenance, dump_yaml  # noqa: E402
from .search_space import (  # noqa: E402
    Dimension,
    bound_values,
    describe_space,
    midpoint_values,
    search_dimensions,
    substitute,
    substitute_provenance,
)

LOGGER = logging.getLogger(__name__)

JOURNAL_FILENAME = "optuna_journal.log"
BEST_PARAMETERS_FILE = "best_parameters.yaml"
ACCURACY_REPORT_FILE = "accuracy_report.yaml"
TRACE_PLOT_FILE = "optimization_trace.png"
PARAMETERS_PLOT_FILE = "objective_vs_parameters.png"
SEARCH_LOG_FILE = "search.log"
TRIALS_LOG_DIR = "bayes_opt_logs"
TRIALS_TABLE = "bayes_opt_trials"
LOCKS_DIR = ".locks"
OBJECTIVE_SPLIT = "val"
REPORT_SPLIT = "test"
CONFIDENCE = 0.95
# A reproduction's seed: far from the trials' seed and from each other's
# (a fold adds its index to the seed, so neighbours would share fold seeds).
REPRODUCTION_SEED_STRIDE = 1000
# Liveness of a worker on another host (on the same host its pid is checked).
HEARTBEAT_INTERVAL_S = 30.0
STALE_AFTER_S = 300.0
# Trial user attributes.
ATTR_FOLDER = "folder"
ATTR_RETRY_OF = "retry_of"
ATTR_WORKER = "worker_id"
ATTR_HOST = "worker_host"
ATTR_PID = "worker_pid"
ATTR_PID_START = "worker_pid_start"
ATTR_HEARTBEAT = "heartbeat"
ATTR_RECOVERED_BY = "recovered_by"
ATTR_OVER_BUDGET = "over_budget"
ATTR_ERROR = "error"
ATTR_VAL_METRICS = "val_metrics"
# Study user attributes.
STUDY_SPACE = "search_space"
STUDY_OBJECTIVE = "objective"

# Workers of this process that are running now: a RUNNING trial owned by
# this pid but by none of these was left by an earlier, interrupted call.
_LIVE_WORKERS: set[str] = set()
_LIVE_LOCK = threading.Lock()


# ------------------------------------------------------------------ results
@dataclass
class MetricSummary:
    """One test metric over the reproductions: mean and 95% confidence
    interval (Student t; None with fewer than two reproductions)."""

    mean: float
    ci_low: Optional[float]
    ci_high: Optional[float]
    values: list[float]

    @property
    def half_width(self) -> Optional[float]:
        return None if self.ci_high is None else self.ci_high - self.mean


@dataclass
class TrialSummary:
    number: int
    state: str
    value: Optional[float]
    params: dict[str, Any]
    folder: Optional[str]


@dataclass
class SearchResult:
    """What a search (or this worker's share of it) ended with.

    `finished` is True when `n_trials` trials are complete; only then are
    the reproductions run and `accuracy_report` filled (otherwise other
    workers still hold running trials and the last one to finish does it).
    """

    experiment_dir: str
    objective: str
    n_trials: int
    finished: bool
    best_trial: Optional[int] = None
    best_folder: Optional[str] = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_value: Optional[float] = None
    trials: list[TrialSummary] = field(default_factory=list)
    reproductions: list[dict[str, float]] = field(default_factory=list)
    accuracy_report: dict[str, MetricSummary] = field(default_factory=dict)


@dataclass
class SearchSetup:
    """A parsed and checked search: everything before anything is written."""

    namespace: argparse.Namespace
    cfg: dict[str, Any]  # merged, search keys kept
    provenance: Provenance
    dims: list[Dimension]
    experiment_dir: Path
    n_trials: int
    reproductions: int
    storage: str  # an RDB URL or a journal file path
    prune: bool = False  # stop hopeless trials early (make_pruner)

    @property
    def experiment_name(self) -> str:
        return self.experiment_dir.name

    @property
    def metric(self) -> str:
        return self.cfg["eval_primary_metric"]

    @property
    def objective(self) -> str:
        return f"{OBJECTIVE_SPLIT} {self.metric} (mean over folds)"

    def trial_folder(self, number: int) -> str:
        return f"{self.experiment_name}{number}"

    def reproduction_folder(self, index: int) -> str:
        return f"{self.experiment_name}_reproduction{index}"


# ------------------------------------------------------------ preparation
def prepare_search(argv: Optional[Sequence[str]] = None) -> SearchSetup:
    """Parse and check a search command line; raises `ConfigError` before
    anything is written: flags (``--bayes_opt_iters`` missing or < 1,
    ``--reproductions`` without a search or < 0, ``--evaluate``), the search
    dimensions' bounds, and the config itself with every dimension at its
    midpoint, its low and its high bounds (objects built as a plain run
    would, so a value a class rejects is found now)."""
    namespace, overrides = cli.parse_args(argv)
    n_trials, reproductions = namespace.bayes_opt_iters, namespace.reproductions
    if n_trials is None:
        if reproductions is not None:
            raise ConfigError(
                "--reproductions retrains the best setting of a hyperparameter search: "
                "it needs --bayes_opt_iters N and search keys (key~BAYESIAN~: [low, high])"
            )
        flag = "--prune" if namespace.prune and namespace.study_storage is None else "--study_storage"
        raise ConfigError(f"{flag} belongs to a hyperparameter search: it needs --bayes_opt_iters N")
    if n_trials < 1:
        raise ConfigError(f"--bayes_opt_iters: the number of trials must be 1 or more, got {n_trials}")
    if reproductions is not None and reproductions < 0:
        raise ConfigError(f"--reproductions: must be 0 or more, got {reproductions}")
    if namespace.evaluate:
        raise ConfigError(
            "--evaluate does not apply to a search; evaluate one trial with "
            "--root_experiment_folder <root>/<experiment> --experiment_name <experiment><i> --evaluate"
        )
    directory = cli.experiment_dir(namespace)
    configs = cli.load_configs(namespace, overrides, rerun_same=True)
    cfg, provenance = configs.merged(), configs.provenance
    dims = search_dimensions(cfg, provenance)
    if not dims:
        raise ConfigError(
            "--bayes_opt_iters: the config has no search dimension; mark one with a suffix and "
            "bounds, e.g. --loss_funcs~APPLY~3 \"{margin~BAYESIAN~: [0.01, 0.5]}\" "
            "(~BAYESIAN~ float, ~LOG_BAYESIAN~ log-scale float, ~INT_BAYESIAN~ integer)"
        )
    _check_candidates(cfg, provenance, dims)
    storage = namespace.study_storage or str(directory / JOURNAL_FILENAME)
    return SearchSetup(
        namespace, cfg, provenance, dims, directory, n_trials, reproductions or 0, storage, namespace.prune
    )


def _check_candidates(cfg: dict, provenance: Provenance, dims: Sequence[Dimension]) -> None:
    """The config with the dimensions at the midpoint, low and high bounds
    must each be a valid, buildable run config."""
    for label, values in (
        ("midpoints", midpoint_values(dims)),
        ("low bounds", bound_values(dims, "low")),
        ("high bounds", bound_values(dims, "high")),
    ):
        candidate = substitute(cfg, dims, values)
        where = substitute_provenance(provenance, dims)
        try:
            config.validate_config(candidate, where)
            registry.check_buildable(candidate, where)
            runner.check_run_config(candidate)
        except ConfigError as exc:
            shown = ", ".join(f"{name}={value:g}" for name, value in values.items())
            raise ConfigError(f"with the search dimensions at their {label} ({shown}): {exc}") from exc
    if OBJECTIVE_SPLIT not in cfg["splits_to_eval"]:
        raise ConfigError(
            f"{config.where_of(provenance, ['splits_to_eval'])}: a search scores each trial on the "
            f"'{OBJECTIVE_SPLIT}' split, which splits_to_eval ({cfg['splits_to_eval']}) lacks"
        )


def open_storage(spec: str) -> optuna.storages.BaseStorage:
    """``sqlite:///...`` or any URL with ``://``: optuna's RDB storage;
    anything else: a journal file (safe for several processes on one machine;
    its lock is reclaimed after 30 s if a process died holding it)."""
    if "://" in spec:
        try:
            return optuna.storages.RDBStorage(spec)
        except Exception as exc:  # sqlalchemy / driver errors vary by backend
            raise ConfigError(f"--study_storage {spec}: cannot open the database: {exc}") from exc
    path = Path(spec).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def open_study(setup: SearchSetup, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create or load the study named after the experiment; refuse one made
    for another search space or objective."""
    study = optuna.create_study(
        study_name=setup.experiment_name, storage=storage, direction="maximize", load_if_exists=True,
        sampler=_sampler(setup, 0),  # replaced per trial (see _sampler)
        pruner=make_pruner() if setup.prune else optuna.pruners.NopPruner(),
    )
    wanted = {STUDY_SPACE: describe_space(setup.dims), STUDY_OBJECTIVE: setup.objective}
    for key, value in wanted.items():
        have = study.user_attrs.get(key)
        if have is None:
            study.set_user_attr(key, value)
        elif have != value:
            raise ConfigError(
                f"study '{setup.experiment_name}' in {setup.storage} was made with {key} {have}, "
                f"this search has {value}; use another --experiment_name (or --study_storage)"
            )
    return study


def _sampler(setup: SearchSetup, trial_number: int) -> optuna.samplers.TPESampler:
    """TPE seeded by the config's seed and the trial number: a search is
    reproducible, and two workers asking at once (different numbers) do not
    draw the same point. constant_liar keeps them apart once TPE is past its
    random start-up trials. Few start-up trials for a small budget, or TPE
    would never be used."""
    return optuna.samplers.TPESampler(
        seed=(int(setup.cfg.get("seed", 0)) * 1_000_003 + trial_number) % 2**32,
        n_startup_trials=min(10, max(2, setup.n_trials // 5)),
        constant_liar=True,
    )


def _suggest(trial: optuna.Trial, dim: Dimension) -> Union[int, float]:
    if dim.kind == "int":
        return trial.suggest_int(dim.name, int(dim.low), int(dim.high))
    return trial.suggest_float(dim.name, dim.low, dim.high, log=dim.kind == "log")


# ---------------------------------------------------------------- workers
def _proc_stat(pid: int) -> Optional[tuple[str, str]]:
    """(state, start time) of a Linux process from /proc; None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    # a zombie is dead; another start time means the pid was reused
    return state != "Z" and (start is None or started == start)


@dataclass
class Worker:
    """This process's identity in the study."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    def attrs(self) -> dict[str, Any]:
        stat = _proc_stat(self.pid)
        return {
            ATTR_WORKER: self.id, ATTR_HOST: self.host, ATTR_PID: self.pid,
            ATTR_PID_START: stat[1] if stat else None, ATTR_HEARTBEAT: time.time(),
        }


def is_stale(trial: FrozenTrial, now: Optional[float] = None) -> bool:
    """Whether a RUNNING trial's worker is gone. Same host: its process no
    longer exists (or, in this process, its search call has ended). Other
    host, or a worker killed before it signed the trial: no heartbeat for
    STALE_AFTER_S."""
    now = time.time() if now is None else now
    attrs = trial.user_attrs
    pid = attrs.get(ATTR_PID)
    if attrs.get(ATTR_HOST) == socket.gethostname() and pid is not None:
        if pid == os.getpid():
            with _LIVE_LOCK:
                return attrs.get(ATTR_WORKER) not in _LIVE_WORKERS
        return not _process_alive(int(pid), attrs.get(ATTR_PID_START))
    last = attrs.get(ATTR_HEARTBEAT)
    if last is None and trial.datetime_start is not None:
        last = trial.datetime_start.timestamp()
    return last is None or now - float(last) > STALE_AFTER_S


def recover_stale_trials(study: optuna.Study, setup: SearchSetup, worker: Worker) -> list[int]:
    """Mark each stale RUNNING trial FAILED and queue its parameters again,
    with its folder, so the retry resumes that run. Returns the numbers of
    the trials this worker requeued.

    Several workers may find the same stale trial. Each signs it
    (`recovered_by`) and then fails it; storage applies the first FAIL and
    refuses later writes, so the signature in place when it failed is final
    and exactly one worker reads its own id there and requeues.
    """
    storage = study._storage  # optuna has no public per-trial setter for a FrozenTrial
    requeued = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(trial):
            continue
        trial_id = trial._trial_id
        for write in (
            lambda: storage.set_trial_user_attr(trial_id, ATTR_RECOVERED_BY, worker.id),
            lambda: storage.set_trial_state_values(trial_id, TrialState.FAIL),
        ):
            try:
                write()
            except UpdateFinishedTrialError:
                pass  # another worker got there first
        now = storage.get_trial(trial_id)
        if now.state != TrialState.FAIL or now.user_attrs.get(ATTR_RECOVERED_BY) != worker.id:
            continue
        folder = trial.user_attrs.get(ATTR_FOLDER) or setup.trial_folder(trial.number)
        study.enqueue_trial(
            dict(trial.params), user_attrs={ATTR_FOLDER: folder, ATTR_RETRY_OF: trial.number},
            skip_if_exists=False,
        )
        requeued.append(trial.number)
        LOGGER.info(
            "trial %d was left running by a worker that is gone (%s pid %s): marked FAILED, "
            "its parameters queued again to resume %s", trial.number,
            trial.user_attrs.get(ATTR_HOST), trial.user_attrs.get(ATTR_PID), folder,
        )
    return requeued


def make_pruner() -> optuna.pruners.BasePruner:
    """Median rule: from its second epoch on, a trial whose val score is below
    the median of the earlier trials' at the same epoch stops; the first two
    trials always run to the end (they make the median)."""
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)


def _pruning_reporter(setup: SearchSetup, cfg: Mapping[str, Any], trial: optuna.Trial) -> runner.EvaluationCallback:
    """The runner's per-evaluation callback of one trial: reports the val
    score (step = epoch, counted on across folds) and stops the run with
    optuna.TrialPruned when the pruner says so."""
    folds = list(cfg["splits"]["folds"])
    epochs = int(cfg["num_epochs_train"])

    def report(fold: int, epoch: int, accuracies: Mapping[str, Mapping[str, float]]) -> None:
        value = accuracies.get(OBJECTIVE_SPLIT, {}).get(setup.metric)
        if value is None:
            return
        step = folds.index(fold) * epochs + epoch
        trial.report(float(value), step)
        if trial.should_prune():
            raise optuna.TrialPruned(
                f"fold {fold} epoch {epoch}: {OBJECTIVE_SPLIT} {setup.metric} {value:.4f} is below the "
                "median of the earlier trials at that epoch"
            )

    return report


def _slots_used(trials: Sequence[FrozenTrial]) -> int:
    return sum(t.state != TrialState.FAIL for t in trials)


@contextlib.contextmanager
def _heartbeat(storage: optuna.storages.BaseStorage, trial_id: int) -> Iterator[None]:
    """Refresh the trial's heartbeat every HEARTBEAT_INTERVAL_S while the
    body runs (what tells workers on other hosts that it is alive)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                storage.set_trial_user_attr(trial_id, ATTR_HEARTBEAT, time.time())
            except Exception:  # a missed beat must not kill the training
                LOGGER.debug("heartbeat of trial id %d failed", trial_id, exc_info=True)

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def _file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive flock on `path` (released by the OS if the process
    dies); yields whether it was taken. Coordinates workers on one machine."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------- trials
def _run_in_folder(
    setup: SearchSetup, cfg: dict, provenance: Provenance, folder_name: str,
    on_evaluation: Optional[runner.EvaluationCallback] = None,
) -> runner.ExperimentResult:
    """Run (or resume, or read back when complete) the experiment `cfg` in
    ``<experiment>/<folder_name>``. A folder holding another config is an
    error: its run is not this trial's."""
    folder = setup.experiment_dir / folder_name
    resume = None
    if config.has_saved_config(folder):
        saved, _ = config.load_saved_config(folder)
        if saved != cfg:
            raise ConfigError(
                f"{folder}: holds a run with another config than this one; the study and the "
                "folders disagree (was the study storage replaced?). Move the folder away or "
                "use another --experiment_name"
            )
        resume = runner.ckpt.LATEST
    else:
        config.save_config(cfg, provenance, folder)
    return runner.run_experiment(
        cfg, str(folder), resume=resume, dataset_root=setup.namespace.dataset_root, on_evaluation=on_evaluation
    )


def trial_config(setup: SearchSetup, params: Mapping[str, Any]) -> tuple[dict, Provenance]:
    """The concrete config of a trial: suffixes stripped, values in."""
    return substitute(setup.cfg, setup.dims, params), substitute_provenance(setup.provenance, setup.dims)


def search_trial_config(setup: SearchSetup, params: Mapping[str, Any]) -> tuple[dict, Provenance]:
    """A trial as the search trains it: scored on val, so the test split is
    never evaluated (it would cost time and tempt no one)."""
    cfg, provenance = trial_config(setup, params)
    for key in ("splits_to_eval", "splits_to_eval_at_best"):
        if cfg.get(key):
            cfg[key] = [s for s in cfg[key] if s != REPORT_SPLIT]
    return cfg, provenance


def _objective(setup: SearchSetup, result: runner.ExperimentResult) -> float:
    try:
        return float(result.meta[OBJECTIVE_SPLIT][setup.metric]["mean"])
    except KeyError as exc:
        raise RuntimeError(
            f"{result.experiment_dir}: no {OBJECTIVE_SPLIT} {setup.metric} in the run's summary"
        ) from exc


def _run_trials(setup: SearchSetup, study: optuna.Study, worker: Worker) -> None:
    """This worker's loop: take trials until the budget is used."""
    while True:
        recover_stale_trials(study, setup, worker)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if _slots_used(trials) >= setup.n_trials and not waiting:
            return
        trial = study.ask()  # a queued retry first, else a new trial
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        if _slots_used(earlier) >= setup.n_trials:
            # another worker took the last slot between our count and ask()
            trial.set_user_attr(ATTR_OVER_BUDGET, True)
            study.tell(trial, state=TrialState.FAIL)
            continue
        for key, value in worker.attrs().items():
            trial.set_user_attr(key, value)
        study.sampler = _sampler(setup, trial.number)
        params = {dim.name: _suggest(trial, dim) for dim in setup.dims}
        folder = trial.user_attrs.get(ATTR_FOLDER) or setup.trial_folder(trial.number)
        trial.set_user_attr(ATTR_FOLDER, folder)
        retry = trial.user_attrs.get(ATTR_RETRY_OF)
        LOGGER.info(
            "trial %d%s in %s: %s", trial.number,
            f" (retry of trial {retry}, resuming its run)" if retry is not None else "",
            folder, ", ".join(f"{k}={v:g}" for k, v in params.items()),
        )
        try:
            with _heartbeat(study._storage, trial._trial_id):
                cfg, provenance = search_trial_config(setup, params)
                report = _pruning_reporter(setup, cfg, trial) if setup.prune else None
                result = _run_in_folder(setup, cfg, provenance, folder, report)
                value = _objective(setup, result)
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=TrialState.PRUNED)
            LOGGER.info("trial %d pruned: %s", trial.number, pruned)
            _write_trials_table(setup, study)
            continue
        except Exception as exc:
            # a genuine error (not a kill): recorded, and the search stops
            trial.set_user_attr(ATTR_ERROR, f"{type(exc).__name__}: {exc}")
            study.tell(trial, state=TrialState.FAIL)
            LOGGER.error("trial %d failed: %s", trial.number, exc)
            raise
        val = result.meta.get(OBJECTIVE_SPLIT, {})
        trial.set_user_attr(ATTR_VAL_METRICS, {m: v["mean"] for m, v in val.items()})
        study.tell(trial, value)
        LOGGER.info("trial %d: %s = %.4f", trial.number, setup.objective, value)
        _write_trials_table(setup, study)


# ---------------------------------------------------------------- reports
def _atomic_write(path: Path, text: str) -> None:
    """Readers (and other workers writing the same report) never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _summaries(study: optuna.Study) -> list[TrialSummary]:
    return [
        TrialSummary(t.number, t.state.name, t.value, dict(t.params), t.user_attrs.get(ATTR_FOLDER))
        for t in study.get_trials(deepcopy=False)
    ]


def best_trial(study: optuna.Study) -> Optional[FrozenTrial]:
    """The COMPLETE trial with the highest value (the earliest on ties)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def _write_trials_table(setup: SearchSetup, study: optuna.Study) -> None:
    """The trials as a record-keeper table (CSV + logs.db), one row per
    trial: number, state, value, folder, parameters. Rewritten whole."""
    import record_keeper as rk

    folder = setup.experiment_dir / TRIALS_LOG_DIR / "saved_csvs"
    with _file_lock(setup.experiment_dir / LOCKS_DIR / "reports.lock"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        keeper = rk.RecordKeeper(record_writer=rk.RecordWriter(folder=str(folder)))
        for trial in study.get_trials(deepcopy=False):
            row = {"trial": trial.number, "state": trial.state.name, "value": trial.value,
                   "folder": trial.user_attrs.get(ATTR_FOLDER)}
            row.update({dim.name: trial.params.get(dim.name) for dim in setup.dims})
            keeper.update_records(row, trial.number, parent_name=TRIALS_TABLE)
        keeper.save_records()


def write_best_parameters(setup: SearchSetup, study: optuna.Study) -> Optional[FrozenTrial]:
    best = best_trial(study)
    if best is None:
        return None
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    report = {
        "best_trial": best.number,
        "best_folder": best.user_attrs.get(ATTR_FOLDER),
        "objective": setup.objective,
        "best_value": float(best.value),
        "best_parameters": {k: _plain(v) for k, v in best.params.items()},
        "val_metrics": best.user_attrs.get(ATTR_VAL_METRICS, {}),
        "complete_trials": len(complete),
        "n_trials": setup.n_trials,
    }
    _atomic_write(setup.experiment_dir / BEST_PARAMETERS_FILE, dump_yaml(report))
    return best


def _plain(value: Any) -> Any:
    return int(value) if isinstance(value, int) else float(value)


def _wrap_dotted(name: str, width: int = 40) -> str:
    """A long dotted key on several lines, broken after dots."""
    lines = [""]
    for part in name.split("."):
        piece = part if not lines[-1] else "." + part
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append(part)
        else:
            lines[-1] += piece
    return "\n".join(lines)


def plot_search(setup: SearchSetup, study: optuna.Study) -> list[str]:
    """optimization_trace.png and objective_vs_parameters.png (matplotlib,
    no display). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # headless: workers run without a display
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (used as matplotlib.ticker)

    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    if not complete:
        return []
    numbers = [t.number for t in complete]
    values = [t.value for t in complete]
    best_so_far = [max(values[: i + 1]) for i in range(len(values))]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(numbers, values, "o", label="trial")
    ax.step(numbers, best_so_far, where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(setup.objective)
    ax.set_title(f"{setup.experiment_name}: optimisation trace")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = setup.experiment_dir / TRACE_PLOT_FILE
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(str(path))

    best = best_trial(study)
    fig, axes = plt.subplots(1, len(setup.dims), figsize=(4.5 * len(setup.dims), 4), squeeze=False)
    for ax, dim in zip(axes[0], setup.dims):
        xs = [t.params[dim.name] for t in complete if dim.name in t.params]
        ys = [t.value for t in complete if dim.name in t.params]
        ax.plot(xs, ys, "o", alpha=0.8)
        if best is not None and dim.name in best.params:
            ax.plot([best.params[dim.name]], [best.value], "*", markersize=14, color="C3", label="best")
            ax.legend()
        if dim.kind == "log":
            ax.set_xscale("log")
            # minor-tick labels of a range under a decade overprint each other
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        # the searched range, so where the trials fell within it shows
        margin = 0 if dim.kind == "log" else (dim.high - dim.low) * 0.03
        ax.set_xlim(dim.low - margin, dim.high + margin)
        ax.set_xlabel(_wrap_dotted(dim.name), fontsize=8)
        ax.set_ylabel(setup.objective, fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = setup.experiment_dir / PARAMETERS_PLOT_FILE
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(str(path))
    return paths


# ---------------------------------------------------------- reproductions
def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with an integer number of degrees of
    freedom, by the exact finite series (Abramowitz & Stegun 26.7.3/4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be 1 or more, got {df}")
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        term, total = c, c if df > 1 else 0.0
        for k in range(3, df - 1, 2):  # c + 2/3 c^3 + 2*4/(3*5) c^5 + ...
            term *= c * c * (k - 1) / k
            total += term
        a = 2.0 / math.pi * (theta + s * total)
    else:
        term, total = 1.0, 1.0
        for k in range(2, df - 1, 2):  # 1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...
            term *= c * c * (k - 1) / k
            total += term
        a = s * total
    return 0.5 + 0.5 * a  # a = P(-t < T < t), signed with t


def student_t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p, by bisection on `student_t_cdf` (exact to
    1e-12; neither scipy nor a table needed)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    low, high = -1.0, 1.0
    while student_t_cdf(low, df) > p:
        low *= 2
    while student_t_cdf(high, df) < p:
        high *= 2
    while high - low > 1e-12 * max(1.0, abs(high)):
        middle = (low + high) / 2
        if student_t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def summarize_metric(values: Sequence[float], confidence: float = CONFIDENCE) -> MetricSummary:
    """Mean and Student-t confidence interval of the mean."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return MetricSummary(mean, None, None, values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = student_t_quantile(0.5 + confidence / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return MetricSummary(mean, mean - half, mean + half, values)


def reproduction_config(setup: SearchSetup, best: FrozenTrial, index: int) -> tuple[dict, Provenance]:
    """The best trial's config with a new seed, evaluated on the test split."""
    cfg, provenance = trial_config(setup, best.params)
    cfg["seed"] = int(cfg["seed"]) + REPRODUCTION_SEED_STRIDE * (index + 1)
    if REPORT_SPLIT not in runner.eval_splits(cfg):
        # once, with the best epoch's models, as the shipped eval config does
        cfg["splits_to_eval_at_best"] = list(cfg.get("splits_to_eval_at_best") or ()) + [REPORT_SPLIT]
    return cfg, provenance


def _set_aside(folder: Path) -> Path:
    for k in range(1, 10_000):
        target = folder.with_name(f"{folder.name}_old{k}")
        if not target.exists():
            folder.rename(target)
            return target
    raise RuntimeError(f"{folder}: too many old copies beside it")


def run_reproductions(setup: SearchSetup, best: FrozenTrial) -> list[dict[str, float]]:
    """Train the best setting `setup.reproductions` times; returns each
    reproduction's test metrics (mean over folds, at the best val epoch).

    Each reproduction folder is taken under a file lock, so workers that
    finish together share the work: a first pass takes the free ones, a
    second waits for the others and reads them back. A folder reproducing an
    older best setting (the search was extended since) is renamed
    ``*_old<k>`` and trained again.
    """
    results: dict[int, dict[str, float]] = {}
    pending = list(range(setup.reproductions))
    for blocking in (False, True):
        for index in list(pending):
            name = setup.reproduction_folder(index)
            with _file_lock(setup.experiment_dir / LOCKS_DIR / f"{name}.lock", blocking) as taken:
                if not taken:
                    continue
                cfg, provenance = reproduction_config(setup, best, index)
                folder = setup.experiment_dir / name
                if config.has_saved_config(folder) and config.load_saved_config(folder)[0] != cfg:
                    moved = _set_aside(folder)
                    LOGGER.info("%s reproduced another setting; moved to %s", folder, moved.name)
                LOGGER.info("reproduction %d of trial %d (seed %d) in %s", index, best.number, cfg["seed"], name)
                result = _run_in_folder(setup, cfg, provenance, name)
                results[index] = {m: v["mean"] for m, v in result.meta.get(REPORT_SPLIT, {}).items()}
                pending.remove(index)
    return [results[i] for i in range(setup.reproductions)]


def write_accuracy_report(
    setup: SearchSetup, best: FrozenTrial, reproductions: Sequence[Mapping[str, float]]
) -> dict[str, MetricSummary]:
    metrics = sorted(set().union(*reproductions)) if reproductions else []
    summary = {m: summarize_metric([r[m] for r in reproductions if m in r]) for m in metrics}
    report = {
        "split": REPORT_SPLIT,
        "best_trial": best.number,
        "best_parameters": {k: _plain(v) for k, v in best.params.items()},
        "reproductions": len(reproductions),
        "confidence": CONFIDENCE,
        "metrics": {
            m: {"mean": s.mean, "ci_low": s.ci_low, "ci_high": s.ci_high,
                "half_width": s.half_width, "values": s.values}
            for m, s in summary.items()
        },
    }
    _atomic_write(setup.experiment_dir / ACCURACY_REPORT_FILE, dump_yaml(report))
    return summary


# ------------------------------------------------------------------ main
def _save_search_config(setup: SearchSetup) -> None:
    """configs/ of the search (search keys kept), written whole by one
    directory rename so a worker starting at the same moment never reads a
    half-written folder."""
    if config.has_saved_config(setup.experiment_dir):
        return
    staging = setup.experiment_dir / f".configs.{os.getpid()}.{uuid.uuid4().hex}"
    config.save_config(setup.cfg, setup.provenance, staging)
    try:
        os.rename(config.saved_configs_dir(staging), config.saved_configs_dir(setup.experiment_dir))
    except OSError:
        pass  # another worker's identical copy is already in place
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _log_to_file(path: Path) -> Iterator[None]:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(f"%(asctime)s pid {os.getpid()} %(levelname)s %(message)s"))
    previous = LOGGER.level
    LOGGER.addHandler(handler)
    if LOGGER.getEffectiveLevel() > logging.INFO:
        LOGGER.setLevel(logging.INFO)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(previous)
        handler.close()


def run_search(argv_or_setup: Union[Sequence[str], SearchSetup, None] = None) -> SearchResult:
    """Run (or resume, or join as one more worker) the search a bench
    command line describes, e.g. ``["--experiment_name", "tune",
    "--bayes_opt_iters", "20", "--reproductions", "3", ...]``.

    Raises `ConfigError` before anything is written when the command line or
    config is wrong. Returns the state of the whole study when this worker
    stops: best trial, parameters and value, every trial, and (when the
    budget is complete and ``--reproductions`` > 0) the reproductions' test
    metrics with their 95% confidence intervals.
    """
    setup = argv_or_setup if isinstance(argv_or_setup, SearchSetup) else prepare_search(argv_or_setup)
    setup.experiment_dir.mkdir(parents=True, exist_ok=True)
    _save_search_config(setup)
    worker = Worker()
    with _log_to_file(setup.experiment_dir / SEARCH_LOG_FILE):
        storage = open_storage(setup.storage)
        study = open_study(setup, storage)
        LOGGER.info(
            "search %s: %d trials, objective %s, storage %s; dimensions: %s",
            setup.experiment_name, setup.n_trials, setup.objective, setup.storage,
            ", ".join(f"{d.name} ({d.kind} [{d.low:g}, {d.high:g}])" for d in setup.dims),
        )
        with _LIVE_LOCK:
            _LIVE_WORKERS.add(worker.id)
        try:
            _run_trials(setup, study, worker)
        finally:
            with _LIVE_LOCK:
                _LIVE_WORKERS.discard(worker.id)
            _write_trials_table(setup, study)
        return _finish(setup, study)


def _finish(setup: SearchSetup, study: optuna.Study) -> SearchResult:
    trials = study.get_trials(deepcopy=False)  # one snapshot: counts that agree
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    running = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    result = SearchResult(
        experiment_dir=str(setup.experiment_dir), objective=setup.objective,
        n_trials=setup.n_trials, finished=len(done) >= setup.n_trials, trials=_summaries(study),
    )
    best = write_best_parameters(setup, study)
    plot_search(setup, study)
    if best is not None:
        result.best_trial, result.best_value = best.number, float(best.value)
        result.best_params = {k: _plain(v) for k, v in best.params.items()}
        result.best_folder = best.user_attrs.get(ATTR_FOLDER)
    if not result.finished:
        LOGGER.info(
            "%d of %d trials done (%d pruned), %d running in other workers; the worker finishing "
            "the last one writes the final reports%s", len(done), setup.n_trials, len(done) - len(complete),
            running, " and runs the reproductions" if setup.reproductions else "",
        )
        return result
    if best is None:
        LOGGER.info("search complete: every trial was pruned, nothing to reproduce")
        return result
    LOGGER.info("search complete: best trial %s, %s = %.4f", best.number, setup.objective, best.value)
    if setup.reproductions:
        result.reproductions = run_reproductions(setup, best)
        result.accuracy_report = write_accuracy_report(setup, best, result.reproductions)
    return result


def format_result(result: SearchResult) -> str:
    """The summary `python -m pml_loop.bench --bayes_opt_iters` prints."""
    complete = sum(t.state == TrialState.COMPLETE.name for t in result.trials)
    lines = [f"search: {result.experiment_dir}", f"trials complete: {complete} of {result.n_trials}"]
    if result.best_trial is not None:
        lines.append(
            f"best trial {result.best_trial} ({result.best_folder}): {result.objective} = {result.best_value:.4f}"
        )
        lines += [f"  {name} = {value:g}" for name, value in result.best_params.items()]
    if result.accuracy_report:
        lines.append(f"{REPORT_SPLIT} over {len(result.reproductions)} reproductions (mean, {CONFIDENCE:.0%} CI):")
        for metric, s in result.accuracy_report.items():
            ci = f" ± {s.half_width:.4f}" if s.half_width is not None else ""
            lines.append(f"  {metric} = {s.mean:.4f}{ci}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m pml_loop.bench --bayes_opt_iters N ...`; 2 on a config error."""
    import sys

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = run_search(argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(format_result(result))
    return 0


__all__ = [
    "MetricSummary",
    "SearchResult",
    "SearchSetup",
    "TrialSummary",
    "format_result",
    "is_stale",
    "main",
    "open_storage",
    "prepare_search",
    "recover_stale_trials",
    "run_search",
    "student_t_cdf",
    "student_t_quantile",
    "summarize_metric",
    "trial_config",
]
