"""A run that dies and is resumed ends with the same logs as one that did not:
every epoch / iteration logged exactly once, with the same values."""

import sqlite3

import pytest
import torch
from pytorch_metric_learning.trainers import MetricLossOnly

from pml_loop.bench import checkpoint as ckpt
from pml_loop.bench import runner
from test_bench_run import tiny_config


class Crash(RuntimeError):
    pass


def read_logs(fold_folder):
    """{table: [row tuples ordered by key]} of logs.db, id column dropped."""
    out = {}
    with sqlite3.connect(f"{fold_folder}/saved_csvs/logs.db") as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for name in names:
            if name == "sqlite_sequence":
                continue
            cols = [c[1] for c in conn.execute(f"PRAGMA table_info([{name}])") if c[1] != "id"]
            col_list = ", ".join(f"[{c}]" for c in cols)
            out[name] = conn.execute(f"SELECT {col_list} FROM [{name}] ORDER BY [~iteration~]").fetchall()
    return out


def csv_keys(path):
    with open(path) as f:
        return [line.split(",")[0] for line in f.read().splitlines() if line and not line.startswith("~")]


def comparable(logs):
    """Drop the wall-clock timing table: it is the only legitimately different one."""
    return {k: v for k, v in logs.items() if k != runner.TIMING_TABLE}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = runner.run_experiment(tiny_config(), str(folder / "exp"))
    return read_logs(folder / "exp" / "fold_0"), result.folds[0].state


def crash_in_training(monkeypatch):
    """Die in the middle of epoch 2 (after epoch 1's checkpoint)."""
    original = MetricLossOnly.calculate_loss

    def calculate_loss(self, batch):
        if self.epoch == 2 and self.iteration == 5:
            raise Crash("killed mid-epoch")
        return original(self, batch)

    monkeypatch.setattr(MetricLossOnly, "calculate_loss", calculate_loss)


def crash_while_checkpointing(monkeypatch):
    """Die after epoch 2's records were saved but before its checkpoint: the
    logs then run ahead of the checkpoint and must be trimmed on resume."""
    original = ckpt.save_checkpoint

    def save_checkpoint(folder, *, state, **kwargs):
        if state.epoch == 2:
            raise Crash("killed while writing the checkpoint")
        return original(folder, state=state, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_checkpoint)


@pytest.mark.parametrize("crash", [crash_in_training, crash_while_checkpointing])
def test_resume_latest_matches_uninterrupted(tmp_path, monkeypatch, uninterrupted, crash):
    expected_logs, expected_state = uninterrupted
    exp = str(tmp_path / "exp")
    with monkeypatch.context() as patch:
        crash(patch)
        with pytest.raises(Crash):
            runner.run_experiment(tiny_config(), exp)
    saved = ckpt.load_checkpoint(f"{exp}/fold_0/saved_models")
    assert saved["state"]["epoch"] == 1 and not saved["state"]["finished"]

    state = runner.run_experiment(tiny_config(), exp, resume="latest").folds[0].state
    logs = read_logs(f"{exp}/fold_0")

    # every table: each key exactly once, and the same values as uninterrupted
    assert comparable(logs) == comparable(expected_logs)
    for table, rows in logs.items():
        keys = [r[0] for r in rows]
        assert len(keys) == len(set(keys)), table
    accuracy_tables = [t for t in logs if t.startswith("accuracies")]
    assert accuracy_tables and all([r[0] for r in logs[t]] == [0, 1, 2, 3] for t in accuracy_tables)
    assert [r[0] for r in logs[runner.TIMING_TABLE]] == [0, 1, 2, 3]
    # the CSVs agree with the database
    loss_keys = [r[0] for r in logs["loss_histories"]]
    assert [int(k) for k in csv_keys(f"{exp}/fold_0/saved_csvs/loss_histories.csv")] == loss_keys
    ipe = 12  # tiny_config's iterations_per_epoch
    assert loss_keys == [e * ipe + i for e in range(3) for i in range(0, ipe, runner.LOG_EVERY_N_ITERATIONS)]

    assert state.best_epoch == expected_state.best_epoch
    assert state.best_accuracies == expected_state.best_accuracies
    assert [h["epoch"] for h in state.history] == [0, 1, 2, 3]


def test_resume_best_continues_from_best_epoch(tmp_path):
    exp = str(tmp_path / "exp")
    runner.run_experiment(tiny_config(num_epochs_train=2), exp)
    best = ckpt.load_checkpoint(f"{exp}/fold_0/saved_models", "best")["state"]["epoch"]
    state = runner.run_experiment(tiny_config(num_epochs_train=3), exp, resume="best").folds[0].state
    assert state.finished and state.epoch == 3
    logs = read_logs(f"{exp}/fold_0")
    for table in (t for t in logs if t.startswith("accuracies")):
        assert [r[0] for r in logs[table]] == [0, 1, 2, 3], (table, best)


def test_truncate_records_keeps_only_rows_up_to_the_epoch(tmp_path):
    import record_keeper as rk

    keeper = rk.RecordKeeper(record_writer=rk.RecordWriter(folder=str(tmp_path)))
    for it in range(0, 30, 5):  # 10 iterations per epoch
        keeper.update_records({"loss": float(it)}, it, parent_name="loss_histories")
    for epoch in range(4):
        keeper.update_records({"map": epoch / 10}, epoch, parent_name="accuracies_TEST")
    keeper.save_records()
    removed = ckpt.truncate_records(str(tmp_path), 1, 10, runner.is_epoch_table)
    assert removed == {"loss_histories": 4, "accuracies_TEST": 2}
    assert csv_keys(tmp_path / "loss_histories.csv") == ["0", "5"]
    assert csv_keys(tmp_path / "accuracies_TEST.csv") == ["0", "1"]
    # appending after trimming keeps one header and continues the series
    keeper.update_records({"loss": 10.0}, 10, parent_name="loss_histories")
    keeper.save_records()
    lines = (tmp_path / "loss_histories.csv").read_text().splitlines()
    assert lines == ["~iteration~,loss", "0,0.0", "5,5.0", "10,10.0"]
    ckpt.truncate_records(str(tmp_path), -1, 10, runner.is_epoch_table)
    assert csv_keys(tmp_path / "accuracies_TEST.csv") == []


def test_checkpoint_restores_rng_and_sampler(tmp_path):
    from pytorch_metric_learning.samplers import MPerClassSampler

    sampler = MPerClassSampler([0, 0, 1, 1, 2, 2, 3, 3], m=2, batch_size=4, length_before_new_iter=8)
    model = torch.nn.Linear(2, 2)
    objects = dict(models={"trunk": model}, optimizers={}, lr_schedulers={}, loss_funcs={}, mining_funcs={})
    list(iter(sampler))  # shuffles sampler.labels in place
    ckpt.save_checkpoint(str(tmp_path), state=ckpt.TrainingState(epoch=4), sampler=sampler, **objects)
    expected_batches, expected_draw = list(iter(sampler)), torch.rand(3)
    list(iter(sampler)), torch.rand(5)  # move everything on
    state = ckpt.restore_checkpoint(ckpt.load_checkpoint(str(tmp_path)), sampler=sampler, **objects)
    assert state.epoch == 4
    assert list(iter(sampler)) == expected_batches
    assert torch.equal(torch.rand(3), expected_draw)
