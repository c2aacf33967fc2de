"""Several processes (torchrun, gloo on CPU) train like one process on the
concatenated batch: same loss, same gradients, same logs, exact resume with
another number of processes. The GPU path (nccl, cuda:LOCAL_RANK,
SyncBatchNorm) cannot run here; these tests cover everything else."""

import copy
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils import common_functions as c_f

from pml_loop import LoOpLoss
from pml_loop.bench import __main__ as bench_main
from pml_loop.bench import checkpoint as ckpt
from pml_loop.bench import distributed as dist_mod
from pml_loop.bench import runner
from pml_loop.bench.config import ConfigError, Provenance, save_config
from test_bench_resume import csv_keys, read_logs
from test_bench_run import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
TOL = 1e-5


# ------------------------------------------------- (a) loss and gradients
def _model(seed):
    torch.manual_seed(seed)
    return {"trunk": torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU()),
            "embedder": torch.nn.Linear(12, 8)}


def _global_batch(seed=3, classes=6, per_class=4):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return torch.randn(len(labels), 6, generator=g), labels


LOSS_CASES = {
    "loop_triplet": lambda: ({"metric_loss": LoOpLoss(losses.TripletMarginLoss(margin=0.2))}, {}),
    "loop_multi_similarity": lambda: ({"metric_loss": LoOpLoss(losses.MultiSimilarityLoss())}, {}),
    # a tuple miner: its indices must point into the global batch
    "loop_triplet_mined": lambda: ({"metric_loss": LoOpLoss(losses.TripletMarginLoss(margin=0.2))},
                                   {"tuple_miner": miners.MultiSimilarityMiner(epsilon=0.5)}),
}


def _step(models, loss_funcs, mining_funcs, x, labels):
    """One MetricLossOnly-style step: embeddings, optional tuple miner, loss, backward."""
    emb = models["embedder"](models["trunk"](x))
    indices = mining_funcs["tuple_miner"](emb, labels) if "tuple_miner" in mining_funcs else None
    loss = loss_funcs["metric_loss"](emb, labels, indices)
    loss.backward()
    # names without DDP's "module." prefix, to compare with the plain models
    return float(loss.detach()), {f"{n}.{k.removeprefix('module.')}": p.grad.clone()
                                  for n, m in models.items() for k, p in m.named_parameters()}


def _one_process_reference(case):
    models = _model(0)
    loss_funcs, mining_funcs = LOSS_CASES[case]()
    x, labels = _global_batch()
    return _step(models, loss_funcs, mining_funcs, x, labels)


def _gradient_worker(rank, world_size, rdzv, out):
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    context = dist_mod.DistContext(rank, rank, world_size, torch.device("cpu"), active=True, timeout_s=60)
    try:
        results = {}
        x, labels = _global_batch()
        local = len(labels) // world_size
        mine = slice(rank * local, (rank + 1) * local)
        for case in LOSS_CASES:
            models = _model(rank)  # different init per rank: DDP must broadcast rank 0's
            loss_funcs, mining_funcs = LOSS_CASES[case]()
            # the runner's wrapping: DDP models, losses/miners on the global batch
            ddp_models = dist_mod.wrap_models(models, context)
            loss_funcs, mining_funcs = dist_mod.wrap_losses_and_miners(loss_funcs, mining_funcs)
            results[case] = _step(ddp_models, loss_funcs, mining_funcs, x[mine], labels[mine])
        # a rank that stops answering: the barrier ends with an error, not a hang
        short = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2))
        quick = dist_mod.DistContext(rank, rank, world_size, torch.device("cpu"), short, 2, active=True)
        if rank == 0:
            start = time.perf_counter()
            try:
                quick.barrier("waiting for rank 1")
                results["stuck_rank"] = "no error"
            except dist_mod.DistributedError as exc:
                results["stuck_rank"] = (str(exc), time.perf_counter() - start)
        else:
            time.sleep(4)
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_gradients(tmp_path_factory):
    import torch.multiprocessing as mp
    folder = tmp_path_factory.mktemp("grads")
    mp.spawn(_gradient_worker, args=(2, str(folder / "rdzv"), str(folder / "out")), nprocs=2, join=True)
    return [torch.load(folder / f"out.{r}") for r in range(2)]


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_two_processes_give_the_one_process_loss_and_gradient(two_rank_gradients, case):
    expected_loss, expected_grads = _one_process_reference(case)
    assert expected_loss > 0
    for rank, results in enumerate(two_rank_gradients):
        loss, grads = results[case]
        # the value is the one-process loss (not world_size times it) on every rank
        assert loss == pytest.approx(expected_loss, abs=TOL, rel=TOL), rank
        for name, grad in expected_grads.items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(grads[name], grad, atol=TOL, rtol=TOL, msg=f"rank {rank} {name}")


def test_a_stuck_rank_ends_in_an_error_naming_the_timeout(two_rank_gradients):
    message, seconds = two_rank_gradients[0]["stuck_rank"]
    assert "rank 0/2: waiting for rank 1 failed" in message and "--dist_timeout 2 s" in message
    assert seconds < 30


# ------------------------------------------------------------ (c) sampler
LABELS = np.repeat(np.arange(10), 5)


def _mper(batch=16, iterations=3):
    return MPerClassSampler(LABELS, m=4, batch_size=batch, length_before_new_iter=batch * iterations)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_shards_make_up_the_one_process_batches(world_size):
    batch = 16
    np.random.seed(5)
    start = c_f.NUMPY_RANDOM.get_state()
    shards = [dist_mod.RankShardSampler(_mper(), batch, r, world_size, numpy_state=start)
              for r in range(world_size)]
    for epoch in range(2):
        # what one process draws from c_f.NUMPY_RANDOM with the same state
        plain = _mper()
        plain.labels[:] = shards[0].inner_sampler.labels  # same class order so far
        c_f.NUMPY_RANDOM.set_state(shards[0].numpy_state)
        expected = [int(i) for i in plain]
        outside = c_f.NUMPY_RANDOM.get_state()
        local = [list(s) for s in shards]
        # drawing the shards leaves c_f.NUMPY_RANDOM alone
        assert c_f.NUMPY_RANDOM.get_state()[1].tolist() == outside[1].tolist()
        lb = batch // world_size
        assert all(len(part) == len(expected) // world_size == len(s) for part, s in zip(local, shards))
        for step in range(len(expected) // batch):
            union = [i for part in local for i in part[step * lb:(step + 1) * lb]]
            assert union == expected[step * batch:(step + 1) * batch], (epoch, step)
            # m per class in the global batch, cut into disjoint consecutive slices
            _, counts = np.unique(LABELS[union], return_counts=True)
            assert set(counts) == {4} and len(counts) == batch // 4


def test_sampler_state_resumes_across_world_sizes():
    """A checkpoint's sampler state continues the same global batches whether
    it was written by one or several processes and read by one or several."""
    batch = 16
    np.random.seed(7)

    def fresh(world_size, rank=0):
        return dist_mod.RankShardSampler(_mper(), batch, rank, world_size) if world_size else _mper()

    def draw(sampler, world_size):
        """Global order of the next epoch as rank 0..W-1 see it, joined per step."""
        if not world_size:
            return [int(i) for i in sampler]
        return sampler.global_order()

    for written_by, read_by in [(2, 1), (2, 0), (0, 2), (2, 4)]:
        writer = fresh(written_by)
        draw(writer, written_by)  # one epoch trained
        saved = {"sampler": ckpt.sampler_state(writer), "rng": ckpt.capture_rng_state()}
        expected = draw(writer, written_by)  # what the run would do next
        np.random.seed(99)  # the resumed process starts elsewhere
        reader = fresh(read_by)
        ckpt.restore_rng_state(saved["rng"])
        ckpt.load_sampler_state(reader, saved["sampler"])
        ckpt.restore_sampling_stream(reader, saved["sampler"], saved["rng"])
        assert draw(reader, read_by) == expected, (written_by, read_by)


# --------------------------------------------------------------- (d) errors
def test_world_size_not_dividing_the_batch_stops_before_writing(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    save_config(tiny_config(dataset={"test_bench_run.TinyBlobs": {}}), Provenance(), src)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "3"}.items():
        monkeypatch.setenv(key, value)
    argv = ["--reproduce_results", str(src), "--experiment_name", "exp", "--root_experiment_folder", str(tmp_path)]
    assert bench_main.main(argv) == bench_main.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert "batch_size: 16 is the global batch" in err and "divisible by the number of processes, 3" in err
    assert "--nproc_per_node 2" in err
    assert not (tmp_path / "exp").exists()


def test_launch_environment_and_device_errors():
    assert dist_mod.launch_from_env({}) is None
    assert dist_mod.launch_from_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}) == dist_mod.Launch(1, 1, 2)
    with pytest.raises(ConfigError, match="WORLD_SIZE not"):
        dist_mod.launch_from_env({"RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="inconsistent"):
        dist_mod.launch_from_env({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="cuda:LOCAL_RANK"):
        dist_mod.resolve_dist_device("cuda:1", 0)
    assert dist_mod.resolve_dist_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(ConfigError, match="need a sampler"):
        dist_mod.check_world_size(tiny_config(sampler=None), 2)
    assert dist_mod.check_world_size(tiny_config(), 4) == 4  # local batch 4 = one class: allowed


# ------------------------------------------- (b), (e) runs of the runner
def _cfg(**changes):
    # the dataset by import path, so the torchrun processes can build it too
    return tiny_config(**{"num_epochs_train": 2, "dataset": {"test_bench_run.TinyBlobs": {}}, **changes})


def _bench(args, tmp_path, nproc=None):
    """python -m pml_loop.bench (under torchrun with `nproc` processes)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([TESTS, REPO]))
    for key in dist_mod.LAUNCH_VARIABLES:
        env.pop(key, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = launcher + ["-m", "pml_loop.bench"] + args
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _args(src, root, name, *extra):
    return ["--reproduce_results", str(src), "--experiment_name", name, "--root_experiment_folder", str(root),
            *extra]


def _assert_logs_match(logs, expected, last_epoch, ipe=12):
    """Same tables; every row of `expected` up to `last_epoch` once, values within TOL."""
    assert sorted(logs) == sorted(expected)
    for table, rows in logs.items():
        keys = [r[0] for r in rows]
        assert len(keys) == len(set(keys)), f"duplicate rows in {table}"
        if table == runner.TIMING_TABLE:
            continue
        limit = last_epoch if runner.is_epoch_table(table) else last_epoch * ipe - 1
        wanted = [r for r in expected[table] if r[0] <= limit]
        assert len(rows) == len(wanted), table
        for got, want in zip(rows, wanted):
            assert got[0] == want[0], table
            np.testing.assert_allclose(np.array(got[1:], dtype=float), np.array(want[1:], dtype=float),
                                       rtol=TOL, atol=TOL, err_msg=table)


def _final_weights(exp):
    return ckpt.load_checkpoint(f"{exp}/fold_0/saved_models")["models"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one plain process, 2 epochs of the global batch."""
    folder = tmp_path_factory.mktemp("one")
    src = folder / "src"
    save_config(_cfg(), Provenance(), src)
    assert bench_main.main(_args(src, folder, "exp")) == 0
    return src, read_logs(folder / "exp" / "fold_0"), _final_weights(folder / "exp")


@pytest.fixture(scope="module")
def two_processes_one_epoch(tmp_path_factory, one_process):
    src = one_process[0]
    folder = tmp_path_factory.mktemp("two")
    out = _bench(_args(src, folder, "exp", "--num_epochs_train", "1"), folder, nproc=2)
    return folder / "exp", out


def test_two_processes_log_what_one_process_logs(one_process, two_processes_one_epoch):
    _, expected, _ = one_process
    exp, out = two_processes_one_epoch
    assert out.count("experiment:") == 1  # the summary comes from rank 0 alone
    logs = read_logs(exp / "fold_0")
    _assert_logs_match(logs, expected, last_epoch=1)
    # one TensorBoard event file, written by rank 0
    assert len([f for f in os.listdir(exp / "fold_0" / "tensorboard_logs") if f.startswith("events")]) == 1
    # the CSVs hold each row once too
    assert [int(k) for k in csv_keys(exp / "fold_0" / "saved_csvs" / "loss_histories.csv")] == [0, 10]
    saved = ckpt.load_checkpoint(str(exp / "fold_0" / "saved_models"))
    assert saved["state"]["epoch"] == 1
    # unwrapped state dicts (no DDP "module." prefix): loadable without torchrun
    assert not any(k.startswith("module.") for m in saved["models"].values() for k in m)
    assert saved["sampler"]["numpy_random"] is not None


def test_resume_with_one_process_continues_a_two_process_run(tmp_path, one_process, two_processes_one_epoch):
    src, expected, expected_weights = one_process
    exp = tmp_path / "exp"
    shutil.copytree(two_processes_one_epoch[0], exp)
    argv = _args(src, tmp_path, "exp")[2:] + ["--resume_training", "latest", "--num_epochs_train", "2"]
    assert bench_main.main(argv) == 0
    _assert_logs_match(read_logs(exp / "fold_0"), expected, last_epoch=2)
    for name, weights in _final_weights(exp).items():
        for key, value in weights.items():
            torch.testing.assert_close(value, expected_weights[name][key], atol=TOL, rtol=TOL)
    # --evaluate needs no torchrun either
    assert bench_main.main(argv[:4] + ["--evaluate"]) == 0


def test_resume_with_two_processes_continues_a_one_process_run(tmp_path, one_process):
    src, expected, expected_weights = one_process
    assert bench_main.main(_args(src, tmp_path, "exp", "--num_epochs_train", "1")) == 0
    _bench(_args(src, tmp_path, "exp", "--resume_training", "latest", "--num_epochs_train", "2")[2:],
           tmp_path, nproc=2)
    _assert_logs_match(read_logs(tmp_path / "exp" / "fold_0"), expected, last_epoch=2)
    for name, weights in _final_weights(tmp_path / "exp").items():
        for key, value in weights.items():
            torch.testing.assert_close(value, expected_weights[name][key], atol=TOL, rtol=TOL)


def test_single_process_run_is_unchanged_by_the_distributed_code(tmp_path):
    """Without torchrun's variables nothing distributed is built."""
    cfg = copy.deepcopy(_cfg(num_epochs_train=1))
    run = runner.FoldTraining(cfg, str(tmp_path / "fold_0"), 0, None)
    assert type(run.sampler) is MPerClassSampler and not run.dist.active
    trainer = run.build_trainer()
    assert trainer.models["trunk"] is run.models["trunk"] and trainer.batch_size == 16
