"""The hyperparameter search (``--bayes_opt_iters``): search keys in configs,
errors before anything is written, trials, reproductions, reports, resume
after a kill, and several workers on one study.

Trials are the tiny TinyBlobs runs of test_bench_run (about a second each);
the kill and worker tests start real processes, which is what they are about.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from pml_loop.bench import __main__ as bench_main
from pml_loop.bench import config, runner, search
from pml_loop.bench.config import ConfigError, merge
from pml_loop.bench.search_space import search_dimensions, substitute, substitute_provenance
from test_bench_run import write_tiny_config_folders

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MARGIN = ["--loss_funcs~APPLY~3", "{margin~BAYESIAN~: [0.01, 0.5]}"]
FAST = ["--num_epochs_train", "1", "--check_untrained_accuracy", "false"]


def search_argv(tmp_path, *extra, name="s"):
    configs = tmp_path / "configs"
    if not configs.exists():
        write_tiny_config_folders(configs)
    return ["--experiment_name", name, "--root_experiment_folder", str(tmp_path / "runs"),
            "--root_config_folder", str(configs), *extra]


def load_study(experiment_dir, name="s"):
    storage = search.open_storage(str(experiment_dir / search.JOURNAL_FILENAME))
    return optuna.load_study(study_name=name, storage=storage)


class Count:
    """Counts calls of a wrapped runner method (how much training happened)."""

    def __init__(self, monkeypatch, owner, name):
        self.calls = []
        original = getattr(owner, name)

        def wrapped(obj, *args, **kwargs):
            self.calls.append(obj)
            return original(obj, *args, **kwargs)

        monkeypatch.setattr(owner, name, wrapped)


# ------------------------------------------------------------ search keys
LOOP_CONFIG = """
loss_funcs:
  metric_loss:
    LoOpLoss:
      loss:
        TripletMarginLoss:
          margin~BAYESIAN~: [0.01, 0.5]
      reducer:
        LoOpReducer: {}
optimizers:
  trunk_optimizer:
    Adam:
      lr~LOG_BAYESIAN~: [1.0e-5, 1.0e-2]
num_epochs_train~INT_BAYESIAN~: [2, 6]
transforms:
  train:
    Compose:
      transforms:
        - RandomShift:
            max_shift~INT_BAYESIAN~: [0, 3]
"""


def test_search_keys_at_any_depth_are_found_and_stripped():
    provenance = config.Provenance()
    base = {"num_epochs_train": 15, "optimizers": {"trunk_optimizer": {"Adam": {"lr": 0.001, "eps": 1e-8}}}}
    cfg = merge(base, yaml.safe_load(LOOP_CONFIG), source="loop.yaml", provenance=provenance)
    # the search key replaced the plain one: one setting, two spellings
    assert "num_epochs_train" not in cfg and "lr" not in cfg["optimizers"]["trunk_optimizer"]["Adam"]
    dims = search_dimensions(cfg, provenance)
    assert sorted((d.name, d.kind, d.low, d.high) for d in dims) == [
        ("loss_funcs.metric_loss.LoOpLoss.loss.TripletMarginLoss.margin", "float", 0.01, 0.5),
        ("num_epochs_train", "int", 2, 6),
        ("optimizers.trunk_optimizer.Adam.lr", "log", 1e-5, 1e-2),
        ("transforms.train.Compose.transforms.0.RandomShift.max_shift", "int", 0, 3),
    ]
    dims = sorted(dims, key=lambda d: d.name)
    assert dims[0].where.startswith("loop.yaml: loss_funcs.metric_loss.LoOpLoss.loss.TripletMarginLoss.margin~BAYESIAN~")
    values = {dims[0].name: 0.2, dims[1].name: 4.0, dims[2].name: 1e-3, dims[3].name: 2}
    out = substitute(cfg, dims, values)
    assert out["loss_funcs"]["metric_loss"]["LoOpLoss"]["loss"] == {"TripletMarginLoss": {"margin": 0.2}}
    assert list(out["optimizers"]["trunk_optimizer"]["Adam"].items()) == [("eps", 1e-8), ("lr", 1e-3)]
    assert out["num_epochs_train"] == 4 and isinstance(out["num_epochs_train"], int)
    assert out["transforms"]["train"]["Compose"]["transforms"][0] == {"RandomShift": {"max_shift": 2}}
    assert search_dimensions(out) == [] and "margin~BAYESIAN~" in str(cfg)  # the input is left alone
    assert substitute_provenance(provenance, dims).origin(
        ["loss_funcs", "metric_loss", "LoOpLoss", "loss", "TripletMarginLoss", "margin"]) == "loop.yaml"


def test_merge_keys_and_search_keys_work_together():
    base = {"loss_funcs": {"metric_loss": {"TripletMarginLoss": {"margin": 0.1}},
                           "other": {"ContrastiveLoss": {"pos_margin": 0.0}}}}
    applied = merge(base, {"loss_funcs~APPLY~3": {"margin~BAYESIAN~": [0.0, 1.0]}})
    assert applied["loss_funcs"]["metric_loss"]["TripletMarginLoss"] == {"margin~BAYESIAN~": [0.0, 1.0]}
    assert applied["loss_funcs"]["other"]["ContrastiveLoss"] == {"pos_margin": 0.0, "margin~BAYESIAN~": [0.0, 1.0]}
    # a later plain value, or another suffix, replaces the dimension
    later = merge(applied, {"loss_funcs": {"metric_loss": {"TripletMarginLoss": {"margin": 0.3}}}})
    assert later["loss_funcs"]["metric_loss"]["TripletMarginLoss"] == {"margin": 0.3}
    relog = merge(applied, {"loss_funcs": {"metric_loss": {"TripletMarginLoss": {"margin~LOG_BAYESIAN~": [0.01, 1]}}}})
    assert relog["loss_funcs"]["metric_loss"]["TripletMarginLoss"] == {"margin~LOG_BAYESIAN~": [0.01, 1]}
    # ~DELETE~ of the plain name removes the dimension; ~OVERRIDE~ of a search key works
    deleted = merge(applied, {"loss_funcs": {"metric_loss": {"TripletMarginLoss": {"margin~DELETE~": None}}}})
    assert deleted["loss_funcs"]["metric_loss"]["TripletMarginLoss"] == {}
    overridden = merge(applied, {"loss_funcs": {"other": {"ContrastiveLoss": {"margin~BAYESIAN~~OVERRIDE~": [0, 2]}}}})
    assert overridden["loss_funcs"]["other"]["ContrastiveLoss"]["margin~BAYESIAN~"] == [0, 2]
    with pytest.raises(ConfigError, match="set the same key in one mapping"):
        merge({}, {"margin": 0.1, "margin~BAYESIAN~": [0, 1]}, source="x.yaml")
    with pytest.raises(ConfigError, match="margin~BAYSIAN~: unknown merge key.*~BAYESIAN~"):
        merge({}, {"margin~BAYSIAN~": [0, 1]})


def test_a_top_level_search_key_stays_in_its_folder(tmp_path):
    argv = search_argv(tmp_path, "--bayes_opt_iters", "1", "--num_epochs_train~INT_BAYESIAN~", "[1, 2]")
    setup = search.prepare_search(argv)
    assert [d.name for d in setup.dims] == ["num_epochs_train"]
    by_folder = config.split_by_folder(setup.cfg, setup.provenance)
    assert "num_epochs_train~INT_BAYESIAN~" in by_folder["config_general"]
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("extra, message", [
    (["--loss_funcs~APPLY~3", "{margin~BAYESIAN~: [0.5, 0.1]}"], "margin~BAYESIAN~: low must be below high"),
    (["--loss_funcs~APPLY~3", "{margin~BAYESIAN~: [0.5, 0.5]}"], "low must be below high"),
    (["--optimizers~APPLY~3", "{lr~LOG_BAYESIAN~: [0, 0.1]}"], "lr~LOG_BAYESIAN~: ~LOG_BAYESIAN~ bounds must be positive"),
    (["--loss_funcs~APPLY~3", "{margin~BAYESIAN~: [0.1]}"], "needs a list of two numbers"),
    (["--loss_funcs~APPLY~3", "{margin~BAYESIAN~: abc}"], "margin~BAYESIAN~: ~BAYESIAN~ needs a list of two numbers"),
    (["--loss_funcs~APPLY~3", "{margin~BAYESIAN~: [a, 1]}"], "needs a list of two numbers"),
    (["--num_epochs_train~INT_BAYESIAN~", "[1.5, 3]"], "num_epochs_train~INT_BAYESIAN~: ~INT_BAYESIAN~ bounds must be integers"),
])
def test_bad_bounds_are_refused_before_anything_is_written(tmp_path, capsys, extra, message):
    argv = search_argv(tmp_path, "--bayes_opt_iters", "2", *extra)
    with pytest.raises(ConfigError, match="command line") as info:
        search.prepare_search(argv)
    assert message in str(info.value)
    assert bench_main.main(argv) == bench_main.EXIT_CONFIG_ERROR
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_search_key_in_a_file_is_named_with_the_file(tmp_path):
    argv = search_argv(tmp_path, "--config_loss_and_miners", "default", "tune")
    tune = tmp_path / "configs" / "config_loss_and_miners" / "tune.yaml"
    tune.parent.mkdir(exist_ok=True)
    tune.write_text("loss_funcs:\n  metric_loss:\n    TripletMarginLoss:\n      margin~BAYESIAN~: [0.3, 0.2]\n")
    with pytest.raises(ConfigError, match=f"{tune}: loss_funcs.metric_loss.TripletMarginLoss.margin~BAYESIAN~: low"):
        search.prepare_search(argv + ["--bayes_opt_iters", "2"])
    # without --bayes_opt_iters: a plain run refuses the search key, naming it (not a resolver crash)
    tune.write_text("loss_funcs:\n  metric_loss:\n    TripletMarginLoss:\n      margin~BAYESIAN~: [0.1, 0.2]\n")
    with pytest.raises(ConfigError, match=f"{tune}: .*margin~BAYESIAN~: a search dimension, which needs --bayes_opt_iters"):
        bench_main.prepare(argv)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra, message", [
    (["--bayes_opt_iters", "0"] + MARGIN, "--bayes_opt_iters: the number of trials must be 1 or more, got 0"),
    (["--bayes_opt_iters", "-3"] + MARGIN, "must be 1 or more, got -3"),
    (["--reproductions", "2"] + MARGIN, "--reproductions retrains the best setting"),
    (["--reproductions", "2"], "it needs --bayes_opt_iters"),
    (["--prune"] + MARGIN, "--prune belongs to a hyperparameter search: it needs --bayes_opt_iters N"),
    (["--bayes_opt_iters", "2", "--reproductions", "-1"] + MARGIN, "--reproductions: must be 0 or more"),
    (["--bayes_opt_iters", "2"], "the config has no search dimension"),
    (["--bayes_opt_iters", "2", "--evaluate"] + MARGIN, "--evaluate does not apply to a search"),
    (["--bayes_opt_iters", "2", "--splits_to_eval", "train"] + MARGIN, "lacks"),
    # a value the class refuses at one end of the range is found now, not in trial 7
    (["--bayes_opt_iters", "2", "--trainer~APPLY~2", "{batch_size~INT_BAYESIAN~: [0, 16]}"], "low bounds"),
])
def test_bad_search_flags_are_refused(tmp_path, capsys, extra, message):
    argv = search_argv(tmp_path, *extra)
    assert bench_main.main(argv) == bench_main.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert err.startswith("config error:") and message in err, err
    assert not (tmp_path / "runs").exists()


def test_student_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 9, 10, 29, 30):
        for p in (0.975, 0.995, 0.6, 0.025):
            assert search.student_t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9, abs=1e-9)
    summary = search.summarize_metric([0.5, 0.7, 0.6])
    assert summary.mean == pytest.approx(0.6)
    half = stats.t.ppf(0.975, 2) * stats.sem([0.5, 0.7, 0.6])
    assert (summary.ci_low, summary.ci_high) == pytest.approx((0.6 - half, 0.6 + half))
    assert search.summarize_metric([0.4]).ci_low is None


# ------------------------------------------------------------------ search
def test_search_trials_resume_reproductions_and_reports(tmp_path, monkeypatch):
    trained = Count(monkeypatch, runner.FoldTraining, "train")
    exp = tmp_path / "runs" / "s"
    first = search.run_search(search_argv(tmp_path, "--bayes_opt_iters", "2", *MARGIN, *FAST))
    assert first.finished and len(trained.calls) == 2 and first.best_trial in (0, 1)
    checkpoint = exp / "s0" / "fold_0" / "saved_models" / "checkpoint_latest.pth"
    stamp = checkpoint.stat().st_mtime_ns

    # the same command with a larger budget: one more trial, then the reproductions
    result = search.run_search(search_argv(tmp_path, "--bayes_opt_iters", "3", "--reproductions", "2", *MARGIN, *FAST))
    assert len(trained.calls) == 2 + 1 + 2
    assert checkpoint.stat().st_mtime_ns == stamp  # finished trials are not retrained
    assert result.finished and [t.number for t in result.trials] == [0, 1, 2]
    assert all(t.state == "COMPLETE" for t in result.trials)
    assert sorted(p.name for p in exp.iterdir() if p.is_dir() and p.name.startswith("s")) == [
        "s0", "s1", "s2", "s_reproduction0", "s_reproduction1"]
    name = "loss_funcs.metric_loss.TripletMarginLoss.margin"
    values = {t.number: t.value for t in result.trials}
    assert result.best_value == max(values.values()) and values[result.best_trial] == result.best_value
    assert 0.01 <= result.best_params[name] <= 0.5

    # each trial folder is a normal experiment whose config holds its value
    for trial in result.trials:
        saved, _ = config.load_saved_config(exp / trial.folder)
        assert saved["loss_funcs"]["metric_loss"]["TripletMarginLoss"] == {"margin": trial.params[name]}
    assert "margin~BAYESIAN~" in (exp / "configs" / "config_loss_and_miners.yaml").read_text()
    seeds = [config.load_saved_config(exp / f"s_reproduction{j}")[0]["seed"] for j in (0, 1)]
    assert len({0, *seeds}) == 3  # new seeds

    best = yaml.safe_load((exp / search.BEST_PARAMETERS_FILE).read_text())
    assert best["best_trial"] == result.best_trial and best["best_value"] == pytest.approx(result.best_value)
    assert best["best_parameters"] == {name: pytest.approx(result.best_params[name])}
    report = yaml.safe_load((exp / search.ACCURACY_REPORT_FILE).read_text())
    mapr = report["metrics"]["mean_average_precision_at_r"]
    assert report["reproductions"] == 2 and len(mapr["values"]) == 2
    assert mapr["ci_low"] <= mapr["mean"] <= mapr["ci_high"]
    assert mapr["mean"] == pytest.approx(result.accuracy_report["mean_average_precision_at_r"].mean)
    for plot in (search.TRACE_PLOT_FILE, search.PARAMETERS_PLOT_FILE):
        assert (exp / plot).read_bytes()[:4] == b"\x89PNG"
    table = (exp / search.TRIALS_LOG_DIR / "saved_csvs" / f"{search.TRIALS_TABLE}.csv").read_text().splitlines()
    assert table[0].split(",")[:5] == ["~iteration~", "trial", "state", "value", "folder"] and len(table) == 4
    assert "trial 2" in (exp / search.SEARCH_LOG_FILE).read_text()

    # a rerun with nothing left to do trains nothing
    search.run_search(search_argv(tmp_path, "--bayes_opt_iters", "3", "--reproductions", "2", *MARGIN, *FAST))
    assert len(trained.calls) == 5
    # a changed config is refused rather than mixed into the study
    with pytest.raises(ConfigError, match="already exists with a different config"):
        search.prepare_search(search_argv(tmp_path, "--bayes_opt_iters", "4", *MARGIN, "--num_epochs_train", "2"))


def test_sqlite_study_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    argv = search_argv(tmp_path, "--bayes_opt_iters", "1", "--study_storage", url, *MARGIN, *FAST)
    result = search.run_search(argv)
    assert result.finished and (tmp_path / "study.db").is_file()
    assert not (tmp_path / "runs" / "s" / search.JOURNAL_FILENAME).exists()
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 1


# ------------------------------------------------- kills and several workers
WORKER = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    import test_bench_run  # registers TinyBlobs
    from pml_loop.bench import __main__ as bench_main, runner
    if os.environ.get("KILL_IN_TRIAL"):
        # SIGKILL after epoch 1 of the given trial (its checkpoint is saved)
        target, runs = int(os.environ["KILL_IN_TRIAL"]), []
        run_experiment, hook = runner.run_experiment, runner.FoldTraining.end_of_epoch_hook
        def counting(*args, **kwargs):
            runs.append(1)
            return run_experiment(*args, **kwargs)
        def killing(self, trainer):
            go_on = hook(self, trainer)
            if len(runs) == target + 1 and trainer.epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return go_on
        runner.run_experiment, runner.FoldTraining.end_of_epoch_hook = counting, killing
    sys.exit(bench_main.main(sys.argv[1:]))
""").format(repo=str(REPO), tests=str(TESTS))


def start_worker(argv, **env):
    environment = dict(os.environ, OMP_NUM_THREADS="1", **env)
    return subprocess.Popen([sys.executable, "-c", WORKER, *argv], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_killed_search_resumes_without_losing_or_repeating_a_trial(tmp_path, monkeypatch):
    argv = search_argv(tmp_path, "--bayes_opt_iters", "3", *MARGIN, "--num_epochs_train", "2",
                       "--check_untrained_accuracy", "false")
    worker = start_worker(argv, KILL_IN_TRIAL="1")
    out, _ = worker.communicate(timeout=240)
    assert worker.returncode == -signal.SIGKILL, out
    exp = tmp_path / "runs" / "s"
    study = load_study(exp)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    killed_params = study.trials[1].params
    stamp = (exp / "s0" / "fold_0" / "saved_models" / "checkpoint_latest.pth").stat().st_mtime_ns

    epochs = Count(monkeypatch, runner.FoldTraining, "end_of_epoch_hook")
    result = search.run_search(argv)
    # the killed trial's run resumed at epoch 2 (1 epoch) + one new trial (2 epochs)
    assert len(epochs.calls) == 3
    assert (exp / "s0" / "fold_0" / "saved_models" / "checkpoint_latest.pth").stat().st_mtime_ns == stamp
    study = load_study(exp)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert result.finished and len(complete) == 3 and len({t.number for t in complete}) == 3
    stale = study.trials[1]
    assert stale.state == TrialState.FAIL and stale.user_attrs[search.ATTR_RECOVERED_BY]
    retry = next(t for t in complete if t.user_attrs.get(search.ATTR_RETRY_OF) == 1)
    assert retry.params == killed_params and retry.user_attrs[search.ATTR_FOLDER] == "s1"
    folders = [t.user_attrs[search.ATTR_FOLDER] for t in complete]
    assert len(set(folders)) == 3 and "s1" in folders
    state = runner.ckpt.TrainingState.from_dict(
        runner.ckpt.load_checkpoint(str(exp / "s1" / "fold_0" / "saved_models"), "latest")["state"])
    assert [h["epoch"] for h in state.history] == [1, 2] and state.finished


def test_two_workers_share_the_budget(tmp_path):
    argv = search_argv(tmp_path, "--bayes_opt_iters", "4", *MARGIN, *FAST)
    write_tiny_config_folders(tmp_path / "configs")
    workers = [start_worker(argv) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    exp = tmp_path / "runs" / "s"
    study = load_study(exp)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4 and len({t.number for t in complete}) == 4
    # any other trial is one a worker dropped unrun because the budget was taken
    assert all(t.user_attrs.get(search.ATTR_OVER_BUDGET) for t in study.trials if t.state != TrialState.COMPLETE)
    folders = {t.user_attrs[search.ATTR_FOLDER] for t in complete}
    trained = {p.name for p in exp.iterdir() if (p / "fold_0" / "saved_models").is_dir()}
    assert folders == trained and len(trained) == 4
    # each ran in one worker: two workers in one study, each trial signed by one
    owners = {t.user_attrs[search.ATTR_PID] for t in complete}
    assert owners <= {w.pid for w in workers}
    assert "trials complete: 4 of 4" in outputs[0] + outputs[1]


def test_plain_runs_do_not_need_optuna():
    # optuna is imported only by a search, and its absence names the pip command
    code = textwrap.dedent("""
        import sys
        from pml_loop.bench import __main__ as bench_main
        assert "optuna" not in sys.modules, "a plain run imported optuna"
        sys.modules["optuna"] = None  # as if not installed
        try:
            bench_main.main(["--experiment_name", "x", "--bayes_opt_iters", "2"])
        except ImportError as exc:
            print(type(exc).__name__, exc)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "MissingExtraError" in done.stdout and 'pip install "pml-loop[bench]"' in done.stdout
    assert "optuna" in done.stdout


def test_pruned_trials_stop_early_and_use_up_the_budget(tmp_path, monkeypatch):
    # a pruner that stops every trial once it may (from its second epoch):
    # the plumbing, not optuna's median rule, is under test
    monkeypatch.setattr(search, "make_pruner", lambda: optuna.pruners.ThresholdPruner(lower=2.0, n_warmup_steps=2))
    argv = search_argv(tmp_path, "--bayes_opt_iters", "2", "--reproductions", "1", "--prune",
                       "--num_epochs_train", "4", "--check_untrained_accuracy", "false", *MARGIN)
    result = search.run_search(argv)
    assert result.finished and result.best_trial is None and not result.reproductions
    assert [t.state for t in result.trials] == ["PRUNED", "PRUNED"]
    experiment = tmp_path / "runs" / "s"
    for number in (0, 1):
        saved = torch.load(experiment / f"s{number}" / "fold_0" / "saved_models" / "checkpoint_latest.pth",
                           weights_only=False)
        assert saved["state"]["epoch"] == 2  # stopped after epoch 2's evaluation, not 4
    log = (experiment / search.SEARCH_LOG_FILE).read_text()
    assert log.count("pruned: fold 0 epoch 2") == 2
    assert not (experiment / "s_reproduction0").exists()


def test_without_prune_no_trial_is_pruned(tmp_path, monkeypatch):
    monkeypatch.setattr(search, "make_pruner", lambda: optuna.pruners.ThresholdPruner(lower=2.0))
    result = search.run_search(search_argv(tmp_path, "--bayes_opt_iters", "1", *FAST, *MARGIN))
    assert [t.state for t in result.trials] == ["COMPLETE"]
