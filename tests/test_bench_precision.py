"""Mixed precision in the benchmark runner: config, autocast trainer step,
GradScaler skipping an overflowing float16 step, scaler state in checkpoints."""
import math
import sqlite3
import warnings

import pytest
import torch
from pytorch_metric_learning import losses, trainers

from pml_loop import LoOpLoss
from pml_loop.bench import checkpoint as ckpt
from pml_loop.bench import precision, registry, runner
from pml_loop.bench.config import ConfigError, validate_config
from test_bench_run import DIM, TinyBlobs, tiny_config


class DtypeSpyLoss(losses.TripletMarginLoss):
    """Records the dtype of the embeddings the trainer hands the loss."""

    seen: list = []

    def forward(self, embeddings, labels, *args, **kwargs):
        DtypeSpyLoss.seen.append((embeddings.dtype, torch.is_autocast_enabled(embeddings.device.type)))
        return super().forward(embeddings, labels, *args, **kwargs)


registry.register(DtypeSpyLoss)


def loss_history(fold_folder):
    with sqlite3.connect(f"{fold_folder}/saved_csvs/logs.db") as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        table = next(n for n in names if n.startswith("loss_histories"))
        return [r[0] for r in conn.execute(f"SELECT total_loss FROM [{table}]")]


def test_bfloat16_run_on_cpu_trains_and_logs_finite_losses(tmp_path):
    DtypeSpyLoss.seen.clear()
    cfg = tiny_config(num_epochs_train=2, check_untrained_accuracy=False,
                      mixed_precision={"dtype": "bfloat16"},
                      loss_funcs={"metric_loss": {"LoOpLoss": {"loss": {"DtypeSpyLoss": {"margin": 0.1}}}}})
    validate_config(cfg)
    result = runner.run_experiment(cfg, str(tmp_path / "exp"))
    state = result.folds[0].state
    assert state.finished and state.epoch == 2
    # the models ran under autocast: the loss got bfloat16 embeddings
    assert DtypeSpyLoss.seen and set(DtypeSpyLoss.seen) == {(torch.bfloat16, True)}
    history = loss_history(result.folds[0].folder)
    assert len(history) >= 2 and all(math.isfinite(v) and v > 0 for v in history)
    assert all(math.isfinite(v) for s in state.best_accuracies.values() for v in s.values())
    # bfloat16 needs no scaler: nothing of it in the checkpoint
    saved = ckpt.load_checkpoint(f"{result.folds[0].folder}/saved_models")
    assert "grad_scaler" not in saved


@pytest.mark.parametrize("value, message", [
    ({"dtype": "float32"}, r"dtype: expected one of bfloat16, float16, got 'float32'"),
    ({"dtype": "int8"}, "expected one of bfloat16, float16"),
    ("bfloat16", r"expected null or \{dtype: bfloat16 \| float16\}"),
    ({"dtype": "bfloat16", "scaler": True}, r"expected null or \{dtype"),
])
def test_config_rejects_other_values(value, message):
    cfg = tiny_config(mixed_precision=value)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)
    with pytest.raises(ConfigError, match=message):
        runner.check_run_config(cfg)


def test_config_accepts_absent_and_null():
    validate_config(tiny_config())  # saved configs from before the key stay valid
    validate_config(tiny_config(mixed_precision=None))
    assert precision.from_config(tiny_config(mixed_precision=None), torch.device("cpu")) is None
    amp = precision.from_config(tiny_config(mixed_precision={"dtype": "bfloat16"}), torch.device("cpu"))
    assert amp == precision.MixedPrecision(torch.bfloat16, "cpu") and precision.make_scaler(amp) is None


def test_float16_on_cpu_is_a_clear_error():
    cfg = tiny_config(mixed_precision={"dtype": "float16"})
    validate_config(cfg)  # the shape is right; the device is what is wrong
    with pytest.raises(ConfigError, match="float16 needs a CUDA device.*use {dtype: bfloat16} on the CPU"):
        runner.check_run_config(cfg)
    amp = precision.from_config(cfg, torch.device("cuda"))  # decided by device, not by this machine
    assert amp.scaled and amp.device_type == "cuda"


def test_float16_refuses_losses_that_raise_on_overflow():
    amp = precision.MixedPrecision(torch.float16, "cuda")
    with pytest.raises(ConfigError, match="loss_funcs.metric_loss: nonfinite='raise'"):
        precision.check_losses(amp, {"metric_loss": LoOpLoss(losses.TripletMarginLoss(), nonfinite="raise")})
    precision.check_losses(amp, {"metric_loss": LoOpLoss(losses.TripletMarginLoss())})
    precision.check_losses(precision.MixedPrecision(torch.bfloat16, "cuda"),
                           {"metric_loss": LoOpLoss(losses.TripletMarginLoss(), nonfinite="raise")})


def _trainer(loss, gradient_clippers=None, seed=0):
    torch.manual_seed(seed)
    models = {"trunk": torch.nn.Linear(DIM, 16), "embedder": torch.nn.Linear(16, 8)}
    optimizers = {f"{k}_optimizer": torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
    dataset = TinyBlobs(split="train")
    from pytorch_metric_learning.samplers import MPerClassSampler

    sampler = MPerClassSampler(dataset.labels, m=4, batch_size=16, length_before_new_iter=64)
    trainer = trainers.MetricLossOnly(
        models=models, optimizers=optimizers, batch_size=16, loss_funcs={"metric_loss": loss},
        dataset=dataset, sampler=sampler, data_device=torch.device("cpu"), dataloader_num_workers=0,
        iterations_per_epoch=4, dataset_labels=dataset.labels, set_min_label_to_zero=True,
        gradient_clippers=gradient_clippers,
    )
    trainer.initialize_dataloader()
    trainer.epoch, trainer.iteration = 1, 0
    return trainer, models


def _params(models):
    return [p.detach().clone() for m in models.values() for p in m.parameters()]


def test_overflowing_float16_step_is_skipped_by_the_scaler():
    """float16 autocast on the CPU (torch 2.13 has it; the runner itself allows
    float16 on CUDA only) with a CPU GradScaler: an embedder that overflows
    float16 gives inf embeddings, LoOp a NaN loss and a warning, and the scaler
    skips the step and halves the scale: no exception, parameters unchanged."""
    trainer, models = _trainer(LoOpLoss(losses.MultiSimilarityLoss()))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    precision.install(trainer, precision.MixedPrecision(torch.float16, "cpu"), scaler)
    with torch.no_grad():
        models["embedder"].weight.mul_(1e6)  # outputs far beyond float16's 65504
    before = _params(models)
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        trainer.forward_and_backward()
    assert math.isnan(float(trainer.losses["total_loss"]))
    assert all(torch.equal(a, b) for a, b in zip(before, _params(models)))
    assert scaler.get_scale() == 2.0**9
    # a sane step afterwards goes through
    with torch.no_grad():
        models["embedder"].weight.div_(1e6)
    before = _params(models)
    trainer.forward_and_backward()
    assert math.isfinite(float(trainer.losses["total_loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(models)))
    assert scaler.get_scale() == 2.0**9


def test_scaled_step_matches_float32_step_and_clippers_see_unscaled_gradients():
    """On one batch, a float16-autocast step with a large loss scale moves the
    parameters like a float32 step, and a gradient clipper sees the true
    (unscaled) gradients."""
    seen = []

    def clipper():
        seen.append(float(torch.cat([p.grad.flatten() for p in models["trunk"].parameters()]).abs().max()))

    dataset = TinyBlobs(split="train")
    batch = (dataset.data[:16], torch.tensor(dataset.labels[:16]))
    steps = []
    for amp in (False, True):
        trainer, models = _trainer(losses.ContrastiveLoss(), {"trunk_grad_clipper": clipper})
        trainer.get_batch = lambda: batch
        if amp:
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
            precision.install(trainer, precision.MixedPrecision(torch.float16, "cpu"), scaler)
        start = _params(models)
        trainer.forward_and_backward()
        steps.append([a - b for a, b in zip(_params(models), start)])
    assert len(seen) == 2 and seen[1] == pytest.approx(seen[0], rel=1e-2)  # not 4096x larger
    for a, b in zip(*reversed(steps)):
        assert b.abs().max() > 0
        assert torch.allclose(a, b, atol=1e-2 * float(b.abs().max()))


def test_bfloat16_install_uses_no_scaler():
    trainer, models = _trainer(LoOpLoss(losses.TripletMarginLoss()))
    precision.install(trainer, precision.MixedPrecision(torch.bfloat16, "cpu"), None)
    before = _params(models)
    trainer.forward_and_backward()
    assert trainer.grad_scaler is None and math.isfinite(float(trainer.losses["total_loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(models)))


def test_grad_scaler_state_is_checkpointed_and_restored(tmp_path):
    model = torch.nn.Linear(2, 2)
    objects = dict(models={"trunk": model}, optimizers={}, lr_schedulers={}, loss_funcs={}, mining_funcs={})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**7, growth_interval=3)
    scaler.scale(torch.ones(()))  # the scale tensor exists from the first scaled loss
    scaler.update(2.0**5)  # as after a few skipped steps
    ckpt.save_checkpoint(str(tmp_path), state=ckpt.TrainingState(epoch=1), grad_scaler=scaler, **objects)
    saved = ckpt.load_checkpoint(str(tmp_path))
    fresh = torch.amp.GradScaler("cpu", growth_interval=3)
    ckpt.restore_checkpoint(saved, grad_scaler=fresh, restore_rng=False, **objects)
    assert fresh.get_scale() == 2.0**5 and fresh.state_dict() == scaler.state_dict()
    # a checkpoint without scaler state (float32 / bfloat16 run) leaves a fresh scaler as it is
    ckpt.save_checkpoint(str(tmp_path), state=ckpt.TrainingState(epoch=1), **objects)
    other = torch.amp.GradScaler("cpu", init_scale=2.0**3)
    ckpt.restore_checkpoint(ckpt.load_checkpoint(str(tmp_path)), grad_scaler=other, restore_rng=False, **objects)
    assert other.get_scale() == 2.0**3


@pytest.mark.cuda
def test_float16_run_on_cuda_checkpoints_the_scaler_and_resumes(tmp_path):
    cfg = tiny_config(num_epochs_train=1, check_untrained_accuracy=False, device="cuda",
                      mixed_precision={"dtype": "float16"},
                      loss_funcs={"metric_loss": {"LoOpLoss": {"loss": {"MultiSimilarityLoss": {}}}}})
    runner.check_run_config(cfg)
    result = runner.run_experiment(cfg, str(tmp_path / "exp"))
    saved = ckpt.load_checkpoint(f"{result.folds[0].folder}/saved_models")
    assert saved["grad_scaler"]["scale"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        longer = runner.run_experiment(dict(cfg, num_epochs_train=2), str(tmp_path / "exp"), resume="latest")
    assert longer.folds[0].state.epoch == 2
    assert all(math.isfinite(v) for v in loss_history(longer.folds[0].folder))
