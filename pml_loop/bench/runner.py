"""Run one experiment from a merged config (see SCHEMA.md).

For each requested fold: seed, build the dataset splits, models, losses,
miners, sampler, optimizers and schedulers, train with PML's trainer, and at
every `save_interval` epochs evaluate with PML's tester, log with
record-keeper, checkpoint, and stop early on `eval_primary_metric`.

Layout, as powerful-benchmarker's::

    <experiment_dir>/configs/                      (written by config.py)
    <experiment_dir>/fold_<k>/saved_models/        checkpoint_{latest,best}.pth
    <experiment_dir>/fold_<k>/saved_csvs/          record-keeper CSVs + logs.db
    <experiment_dir>/fold_<k>/tensorboard_logs/
    <experiment_dir>/meta_logs/                    best metrics, mean over folds
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import torch
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils.logging_presets import HookContainer

from . import checkpoint as ckpt
from . import distributed as dist_mod
from . import precision, registry
from .config import ConfigError
from .progress import RunProgress, pml_bars_silenced

LOGGER = logging.getLogger(__name__)
# (fold, epoch, {split: {metric: value}}) after an evaluation; see run_experiment
EvaluationCallback = Callable[[int, int, Dict[str, Dict[str, float]]], None]
EVAL_SPLITS = {"train", "val", "test", "train+val"}

LOG_EVERY_N_ITERATIONS = 10
TIMING_TABLE = "timing"
# Tables keyed by epoch rather than by global iteration (for log trimming).
EPOCH_TABLE_PREFIXES = ("accuracies", TIMING_TABLE)
SCHEDULER_SUFFIXES = ("_scheduler_by_epoch", "_scheduler_by_iteration", "_scheduler_by_plateau")
RESUME_CHOICES = (ckpt.LATEST, ckpt.BEST)
METRIC_ABBREVIATIONS = {"mean_average_precision_at_r": "MAP@R", "precision_at_1": "P@1"}
SUMMARY_EXTRA_KEYS = ("seconds_per_iteration", "median_seconds_per_iteration", "best_epoch")


# ----------------------------------------------------------------- results
@dataclass
class FoldResult:
    fold: int
    folder: str
    state: ckpt.TrainingState
    skipped: bool = False  # already finished before this call

    def epoch_seconds_per_iteration(self) -> List[float]:
        return [h["seconds_per_iteration"] for h in self.state.history if h.get("seconds_per_iteration")]

    @property
    def seconds_per_iteration(self) -> Optional[float]:
        """Mean seconds per training iteration of the fastest epoch. On a
        shared machine other jobs only ever slow an epoch down, so the
        fastest one is the cleanest estimate of a loss's own cost (as timeit
        reports the minimum)."""
        times = self.epoch_seconds_per_iteration()
        return float(min(times)) if times else None

    @property
    def median_seconds_per_iteration(self) -> Optional[float]:
        times = self.epoch_seconds_per_iteration()
        return float(np.median(times)) if times else None


@dataclass
class ExperimentResult:
    experiment_dir: str
    folds: List[FoldResult] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------- small pieces
def fold_dir(experiment_dir: str, fold: int) -> str:
    return os.path.join(experiment_dir, f"fold_{fold}")


def fold_subdirs(folder: str) -> Dict[str, str]:
    return {
        name: os.path.join(folder, name)
        for name in ("saved_models", "saved_csvs", "tensorboard_logs")
    }


def meta_logs_dir(experiment_dir: str) -> str:
    return os.path.join(experiment_dir, "meta_logs")


def is_epoch_table(table: str) -> bool:
    return table.startswith(EPOCH_TABLE_PREFIXES)


def seed_everything(seed: int) -> None:
    """Seed every generator training draws from; PML's samplers use
    c_f.NUMPY_RANDOM, which is np.random unless replaced."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if c_f.NUMPY_RANDOM is not np.random:
        c_f.NUMPY_RANDOM.seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def spec_class(spec: Mapping[str, Any]) -> str:
    return next(iter(spec))


def spec_kwargs(spec: Mapping[str, Any]) -> dict:
    return dict(next(iter(spec.values())) or {})


def trainer_settings(cfg: Mapping[str, Any]) -> dict:
    """batch_size and iterations_per_epoch from the trainer spec, checked."""
    name = f"trainer.{spec_class(cfg['trainer'])}"
    kwargs = spec_kwargs(cfg["trainer"])
    missing = [k for k in ("batch_size", "iterations_per_epoch") if kwargs.get(k) is None]
    if missing:
        raise ConfigError(
            f"{name}: set {', '.join(missing)} (the sampler and the log layout depend on them)"
        )
    for key in ("batch_size", "iterations_per_epoch"):
        value = kwargs[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}.{key} must be a positive integer, got {value!r}")
    return kwargs


def check_sampler(cfg: Mapping[str, Any], labels: Optional[np.ndarray] = None) -> None:
    """An MPerClassSampler whose batches can hold positives and negatives:
    m divides the batch and the batch has at least two classes (one class
    per batch trains on nothing: no negative exists). With the train
    labels, also that there are enough classes to fill a batch."""
    spec = cfg.get("sampler")
    if not spec or spec_class(spec) != "MPerClassSampler":
        return
    kwargs = spec_kwargs(spec)
    batch_size = kwargs.get("batch_size", trainer_settings(cfg)["batch_size"])
    m = kwargs.get("m")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError(f"sampler.MPerClassSampler.m must be a positive integer, got {m!r}")
    if batch_size % m:
        raise ConfigError(
            f"sampler.MPerClassSampler.m = {m} does not divide the batch size {batch_size}"
        )
    classes_per_batch = batch_size // m
    if classes_per_batch < 2:
        raise ConfigError(
            f"sampler.MPerClassSampler.m = {m} with batch size {batch_size} puts one class in "
            "each batch: no negatives, nothing to learn. Use m <= batch_size / 2."
        )
    if labels is not None and len(np.unique(labels)) < classes_per_batch:
        raise ConfigError(
            f"sampler: a batch of {batch_size} with m = {m} needs {classes_per_batch} classes, "
            f"the train split has {len(np.unique(labels))}"
        )


def primary_split(cfg: Mapping[str, Any]) -> str:
    """The split whose primary metric picks the best epoch: val when evaluated."""
    splits = list(cfg["splits_to_eval"])
    return "val" if "val" in splits else splits[0]


def clean_accuracies(raw: Mapping[str, Any]) -> Dict[str, float]:
    """PML's tester keys metrics as '<metric>_level0'; keep the metric names."""
    out = {}
    for key, value in raw.items():
        if key == "epoch":
            continue
        name = key[: -len("_level0")] if key.endswith("_level0") else key
        out[name] = float(value)
    return out


# ---------------------------------------------------------------- building
def build_transforms(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    specs = cfg.get("transforms") or {}
    return {
        which: registry.build(specs[which], where=f"transforms.{which}") if specs.get(which) else None
        for which in ("train", "eval")
    }


def eval_splits(cfg: Mapping[str, Any]) -> List[str]:
    """Every split evaluated: each epoch's, then those evaluated once at the best epoch."""
    return list(cfg["splits_to_eval"]) + list(cfg.get("splits_to_eval_at_best") or ())


def build_datasets(cfg: Mapping[str, Any], fold: int, dataset_root: Optional[str]) -> Dict[str, Any]:
    """The train split of `fold` plus every evaluated split."""
    transforms = build_transforms(cfg)
    num_folds = cfg["splits"]["num_folds"]

    def make(split: str, transform: Any) -> Any:
        return registry.build(
            cfg["dataset"], where="dataset", root=dataset_root, split=split,
            fold=fold, num_folds=num_folds, transform=transform,
        )

    datasets = {"train": make("train", transforms["train"])}
    for split in eval_splits(cfg):
        # "train" is evaluated without augmentation, so built again.
        datasets[f"eval:{split}"] = make(split, transforms["eval"])
    return datasets


def dataset_labels(dataset: Any) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise ConfigError(
            f"dataset {type(dataset).__name__} has no .labels array; the sampler and "
            "the label mapping need one"
        )
    return np.asarray(labels)


def trunk_output_size(trunk: torch.nn.Module, sample: torch.Tensor, device: torch.device) -> int:
    was_training = trunk.training
    trunk.eval()
    with torch.no_grad():
        out = trunk(sample.unsqueeze(0).to(device))
    trunk.train(was_training)
    return int(out.reshape(1, -1).shape[1])


def build_models(cfg: Mapping[str, Any], sample: torch.Tensor, device: torch.device) -> Dict[str, torch.nn.Module]:
    """trunk + embedder. An MLP embedder's `layer_sizes` lists only the hidden
    and output sizes (as powerful-benchmarker): the trunk's output size is
    prepended here."""
    specs = cfg["models"]
    models = {"trunk": registry.build(specs["trunk"], where="models.trunk").to(device)}
    for name, spec in specs.items():
        if name == "trunk":
            continue
        if spec is None:
            models[name] = torch.nn.Identity()
            continue
        if spec_class(spec) == "MLP":
            kwargs = spec_kwargs(spec)
            size = trunk_output_size(models["trunk"], sample, device)
            kwargs["layer_sizes"] = [size] + list(kwargs.get("layer_sizes", []))
            spec = {"MLP": kwargs}
        models[name] = registry.build(spec, where=f"models.{name}").to(device)
    models.setdefault("embedder", torch.nn.Identity())
    return models


def build_optimizers(cfg: Mapping[str, Any], owners: Mapping[str, torch.nn.Module]) -> Dict[str, Any]:
    """One optimizer per `<owner>_optimizer` key; owners without parameters
    (an Identity embedder) are skipped."""
    optimizers = {}
    for name, spec in cfg["optimizers"].items():
        if not name.endswith("_optimizer"):
            raise ConfigError(f"optimizers.{name}: keys must be <model or loss name>_optimizer")
        owner = name[: -len("_optimizer")]
        if owner not in owners:
            raise ConfigError(
                f"optimizers.{name}: no model or loss named '{owner}' (have {sorted(owners)})"
            )
        params = [p for p in owners[owner].parameters() if p.requires_grad]
        if params:
            optimizers[name] = registry.build_optimizer(spec, params)
    return optimizers


def build_lr_schedulers(cfg: Mapping[str, Any], optimizers: Mapping[str, Any]) -> Dict[str, Any]:
    schedulers = {}
    for name, spec in (cfg.get("lr_schedulers") or {}).items():
        suffix = next((s for s in SCHEDULER_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            raise ConfigError(f"lr_schedulers.{name}: key must end with one of {SCHEDULER_SUFFIXES}")
        optimizer_name = name[: -len(suffix)] + "_optimizer"
        if optimizer_name not in optimizers:
            raise ConfigError(f"lr_schedulers.{name}: there is no optimizer '{optimizer_name}'")
        schedulers[name] = registry.build_scheduler(spec, optimizers[optimizer_name])
    return schedulers


def build_sampler(cfg: Mapping[str, Any], labels: np.ndarray) -> Any:
    """The sampler over the train labels. MPerClassSampler gets batch_size (so
    every batch holds batch_size/m classes) and a length of exactly one epoch,
    which makes an epoch one pass of the sampler: resuming at an epoch
    boundary then replays the same batches as an uninterrupted run."""
    spec = cfg.get("sampler")
    if not spec:
        return None
    settings = trainer_settings(cfg)
    extra = {"labels": labels}
    if spec_class(spec) == "MPerClassSampler":
        kwargs = spec_kwargs(spec)
        extra["batch_size"] = kwargs.get("batch_size", settings["batch_size"])
        extra["length_before_new_iter"] = kwargs.get(
            "length_before_new_iter", settings["batch_size"] * settings["iterations_per_epoch"]
        )
    return registry.build(spec, where="sampler", **extra)


def build_rank_sampler(
    cfg: Mapping[str, Any], labels: np.ndarray, context: dist_mod.DistContext
) -> Any:
    """build_sampler's global sampler, shared out over the ranks when several
    processes train (one process: the sampler itself, unchanged)."""
    sampler = build_sampler(cfg, labels)
    if not context.active or sampler is None:
        return sampler
    return dist_mod.RankShardSampler(
        sampler, trainer_settings(cfg)["batch_size"], context.rank, context.world_size,
        check_order=lambda h: context.same_on_all_ranks(h, "sampler order"),
    )


def build_tester(cfg: Mapping[str, Any], device: torch.device, end_of_testing_hook: Any) -> Any:
    calculator = build_accuracy_calculator(cfg, device)
    return registry.build(
        cfg["tester"], where="tester", accuracy_calculator=calculator,
        data_device=device, end_of_testing_hook=end_of_testing_hook,
    )


def build_accuracy_calculator(cfg: Mapping[str, Any], device: Optional[torch.device] = None) -> Any:
    extra = {"device": device} if device is not None else {}
    calculator = registry.build(cfg["accuracy_calculator"], where="accuracy_calculator", **extra)
    metric = cfg["eval_primary_metric"]
    if metric not in calculator.get_curr_metrics():
        raise ConfigError(
            f"eval_primary_metric: '{metric}' is not computed by the accuracy calculator "
            f"(it computes {sorted(calculator.get_curr_metrics())})"
        )
    return calculator


def check_run_config(cfg: Mapping[str, Any]) -> None:
    """Runner-level checks that need no data: raises ConfigError."""
    trainer_settings(cfg)
    check_sampler(cfg)
    for key in ("splits_to_eval", "splits_to_eval_at_best"):
        unknown = set(cfg.get(key) or ()) - EVAL_SPLITS
        if unknown:
            raise ConfigError(f"{key}: unknown split(s) {sorted(unknown)}")
    both = set(cfg["splits_to_eval"]) & set(cfg.get("splits_to_eval_at_best") or ())
    if both:
        raise ConfigError(f"splits_to_eval and splits_to_eval_at_best both name {sorted(both)}")
    build_accuracy_calculator(cfg, torch.device("cpu"))
    precision.from_config(cfg, resolve_device(cfg["device"]))


def check_data(cfg: Mapping[str, Any], dataset_root: Optional[str]) -> None:
    """Build the first fold's train split (image loaders only read their
    index) so a missing folder, a missing --dataset_root or too few classes
    for the sampler stop the run before its folder is written."""
    from ..data import DatasetLayoutError

    first_fold = cfg["splits"]["folds"][0]
    try:
        dataset = registry.build(
            cfg["dataset"], where="dataset", root=dataset_root, split="train",
            fold=first_fold, num_folds=cfg["splits"]["num_folds"], transform=None,
        )
    except DatasetLayoutError as exc:
        raise ConfigError(str(exc)) from exc
    check_sampler(cfg, dataset_labels(dataset))


def make_record_keeper(csv_folder: str, tensorboard_folder: str, purge_step: Optional[int]) -> Any:
    """record-keeper writing CSVs + logs.db and tensorboard. `purge_step` makes
    TensorBoard discard events a killed run logged after the resumed step."""
    import record_keeper as rk
    from torch.utils.tensorboard import SummaryWriter

    writer = rk.RecordWriter(folder=csv_folder)
    tensorboard = SummaryWriter(log_dir=tensorboard_folder, purge_step=purge_step)
    return rk.RecordKeeper(
        tensorboard_writer=tensorboard,
        record_writer=writer,
        attributes_to_search_for=c_f.list_of_recordable_attributes_list_names(),
    )


def record_module_tree(record_keeper: Any, modules: Mapping[str, torch.nn.Module], iteration: int) -> None:
    """Record the `_record_these` attributes of each module and its children.

    HookContainer recurses into every dict attribute of a module; a forward
    hook registered with_kwargs leaves an int-keyed dict there, which crashes
    record-keeper's save_records. Walking named_modules() reaches the same
    submodules (distance, reducer, wrapped loss) without touching those dicts.
    """
    for name, module in modules.items():
        if not isinstance(module, torch.nn.Module):
            record_keeper.update_records({name: module}, iteration)
            continue
        for child_path, child in module.named_modules():
            label = name if not child_path else f"{name}_{child_path.replace('.', '_')}"
            record_keeper.update_records({label: child}, iteration)


def optimizer_lr(optimizer: Any) -> dict:
    return {"lr": optimizer.param_groups[0]["lr"]}


# -------------------------------------------------------------- the training
class FoldTraining:
    """Trains one fold: owns the built objects, the hooks the PML trainer
    calls, and the TrainingState that checkpoints carry."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        folder: str,
        fold: int,
        dataset_root: Optional[str],
        dist: dist_mod.DistContext = dist_mod.SINGLE,
        on_evaluation: Optional[EvaluationCallback] = None,
    ):
        self.cfg = cfg
        self.on_evaluation = on_evaluation
        self.folder = folder
        self.fold = fold
        self.dist = dist  # rank 0 alone evaluates, logs and checkpoints
        self.dirs = fold_subdirs(folder)
        self.settings = trainer_settings(cfg)
        self.device = dist.device if dist.active else resolve_device(cfg["device"])
        self.record_keeper: Any = None
        self.primary_metric = cfg["eval_primary_metric"]
        self.primary_split = primary_split(cfg)
        self.precision = precision.from_config(cfg, self.device)  # None: float32
        self.grad_scaler = precision.make_scaler(self.precision)  # float16 only
        self.state = ckpt.TrainingState()
        self._session_start = time.perf_counter()
        self._wall_before = 0.0
        self.progress: Optional[RunProgress] = None
        seed_everything(cfg["seed"] + fold)
        self._build(dataset_root)

    def _build(self, dataset_root: Optional[str]) -> None:
        cfg = self.cfg
        datasets = build_datasets(cfg, self.fold, dataset_root)
        self.train_dataset = datasets.pop("train")
        self.eval_datasets = {k.split(":", 1)[1]: v for k, v in datasets.items()}
        labels = dataset_labels(self.train_dataset)
        self.models = build_models(cfg, self.train_dataset[0][0], self.device)
        self.loss_funcs = {
            k: v.to(self.device) for k, v in registry.build_all(cfg["loss_funcs"]).items()
        }
        precision.check_losses(self.precision, self.loss_funcs)
        self.mining_funcs = registry.build_all(cfg.get("mining_funcs") or {})
        self.optimizers = build_optimizers(cfg, {**self.models, **self.loss_funcs})
        self.lr_schedulers = build_lr_schedulers(cfg, self.optimizers)
        self.sampler = build_rank_sampler(cfg, labels, self.dist)
        self.train_labels = labels

    # -- objects a checkpoint holds
    def checkpoint_objects(self) -> dict:
        return dict(
            models=self.models, optimizers=self.optimizers, lr_schedulers=self.lr_schedulers,
            loss_funcs=self.loss_funcs, mining_funcs=self.mining_funcs, sampler=self.sampler,
            grad_scaler=self.grad_scaler,
        )

    def restore(self, which: str) -> bool:
        """Load checkpoint `which`; False when there is none."""
        saved = ckpt.load_checkpoint(self.dirs["saved_models"], which, map_location=self.device)
        if saved is None:
            return False
        self.state = ckpt.restore_checkpoint(saved, **self.checkpoint_objects())
        self._wall_before = self.state.wall_seconds
        return True

    # -- logging
    def open_logs(self, resumed: bool) -> None:
        if not self.dist.is_main:
            return
        ipe = self.settings["iterations_per_epoch"]
        last_epoch = self.state.epoch if resumed else -1
        removed = ckpt.truncate_records(self.dirs["saved_csvs"], last_epoch, ipe, is_epoch_table)
        if not resumed:
            shutil.rmtree(self.dirs["tensorboard_logs"], ignore_errors=True)
        if any(removed.values()):
            LOGGER.info("dropped records logged after epoch %d: %s", last_epoch, removed)
        purge_step = last_epoch * ipe if resumed and last_epoch > 0 else None
        self.record_keeper = make_record_keeper(
            self.dirs["saved_csvs"], self.dirs["tensorboard_logs"], purge_step
        )
        self.hook_container = HookContainer(
            self.record_keeper, primary_metric=self.primary_metric,
            validation_split_name=self.primary_split,
        )
        self.tester = build_tester(self.cfg, self.device, self.hook_container.end_of_testing_hook)

    def close_logs(self) -> None:
        if self.record_keeper is None:
            return
        self.record_keeper.save_records()
        if self.record_keeper.tensorboard_writer is not None:
            self.record_keeper.tensorboard_writer.close()

    # -- evaluation
    def evaluate(
        self, epoch: int, splits: Optional[List[str]] = None, models: Optional[Mapping[str, Any]] = None
    ) -> Dict[str, Dict[str, float]]:
        """Test `splits` (default: splits_to_eval) with `models` (default: the trained ones)."""
        start = time.perf_counter()
        models = models or self.models
        # with several processes only rank 0 evaluates: it must not move a
        # random stream the other ranks do not move
        with dist_mod.preserved_rng() if self.dist.active else contextlib.nullcontext():
            raw = self.tester.test(
                self.eval_datasets, epoch, models["trunk"], models["embedder"],
                splits_to_eval=[(s, [s]) for s in splits or self.cfg["splits_to_eval"]],
            )
        accuracies = {split: clean_accuracies(values) for split, values in raw.items()}
        self.record_keeper.update_records(
            {"eval_seconds": time.perf_counter() - start}, epoch, parent_name=TIMING_TABLE
        )
        return accuracies

    def _update_best(self, epoch: int, accuracies: Dict[str, Dict[str, float]]) -> bool:
        value = accuracies[self.primary_split][self.primary_metric]
        is_best = self.state.best_metric is None or value > self.state.best_metric
        if epoch == 0:
            # the untrained model is a reference point, never the "best" epoch
            return False
        if is_best:
            self.state.best_metric, self.state.best_epoch = value, epoch
            self.state.best_accuracies = accuracies
            self.state.evals_without_improvement = 0
        else:
            self.state.evals_without_improvement += 1
        return is_best

    def _record_history(self, epoch: int, accuracies: Optional[dict], seconds_per_iteration: Optional[float]) -> None:
        entry = {"epoch": epoch, "seconds_per_iteration": seconds_per_iteration}
        if accuracies is not None:
            entry["accuracies"] = accuracies
        self.state.history = [h for h in self.state.history if h["epoch"] != epoch] + [entry]

    def evaluate_and_checkpoint(self, epoch: int, seconds_per_iteration: Optional[float]) -> bool:
        """Evaluate, log, checkpoint. Returns whether training should go on."""
        accuracies = self.evaluate(epoch)
        is_best = self._update_best(epoch, accuracies)
        if self.progress is not None:
            name = METRIC_ABBREVIATIONS.get(self.primary_metric, self.primary_metric)
            value = accuracies[self.primary_split][self.primary_metric]
            self.progress.show(**{f"{self.primary_split} {name}": f"{value:.4f}"})
        self.state.epoch = epoch
        self._record_history(epoch, accuracies, seconds_per_iteration)
        # records first, then the checkpoint: a kill in between leaves records
        # newer than the checkpoint, which resuming trims.
        self.record_keeper.save_records()
        self._save(is_best)
        if self.on_evaluation is not None and epoch > 0:
            self.on_evaluation(self.fold, epoch, accuracies)
        patience = self.cfg.get("patience")
        if patience is not None and self.state.evals_without_improvement > patience:
            LOGGER.info("fold %d: no improvement in %d evaluations, stopping", self.fold, patience + 1)
            return False
        return True

    def _save(self, is_best: bool) -> None:
        self.state.wall_seconds = self._wall_before + time.perf_counter() - self._session_start
        ckpt.save_checkpoint(
            self.dirs["saved_models"], state=self.state, is_best=is_best, **self.checkpoint_objects()
        )

    # -- hooks for the PML trainer
    def end_of_iteration_hook(self, trainer: Any) -> None:
        self.progress.step()
        if trainer.iteration % LOG_EVERY_N_ITERATIONS != 0 or not self.dist.is_main:
            return
        it = trainer.get_global_iteration()
        rk = self.record_keeper
        rk.update_records(trainer.loss_tracker.losses, it, parent_name="loss_histories")
        rk.update_records(trainer.loss_tracker.loss_weights, it, parent_name="loss_weights")
        # our own (unwrapped) objects: the trainer's may be wrapped for
        # several processes, which would rename the logged tables
        record_module_tree(rk, self.loss_funcs, it)
        record_module_tree(rk, self.mining_funcs, it)
        rk.update_records(trainer.optimizers, it, custom_attr_func=optimizer_lr)
        scale = precision.records(self.grad_scaler)
        if scale:
            rk.update_records(scale, it, parent_name="mixed_precision")

    def end_of_epoch_hook(self, trainer: Any) -> bool:
        epoch = trainer.epoch
        seconds = time.perf_counter() - self._epoch_start
        per_iteration = seconds / self.settings["iterations_per_epoch"]
        go_on = True
        if self.dist.is_main:
            self.record_keeper.update_records(
                {"seconds_per_iteration": per_iteration, "train_seconds": seconds},
                epoch, parent_name=TIMING_TABLE,
            )
            last = epoch == self.cfg["num_epochs_train"]
            if epoch % self.cfg["save_interval"] == 0 or last:
                go_on = self.evaluate_and_checkpoint(epoch, per_iteration)
            else:
                self._record_history(epoch, None, per_iteration)
        # the other ranks wait for rank 0's evaluation and take its decision
        go_on = self.dist.broadcast(go_on, f"waiting for rank 0's evaluation of epoch {epoch}")
        self._epoch_start = time.perf_counter()
        return go_on

    def build_trainer(self) -> Any:
        models, loss_funcs, mining_funcs = self.models, self.loss_funcs, self.mining_funcs
        extra = {}
        if self.dist.active:
            # DDP models, losses/miners on the global batch, the local batch
            # size; checkpoints and logs keep using the unwrapped objects
            frozen = tuple(spec_kwargs(self.cfg["trainer"]).get("freeze_these") or ())
            models = dist_mod.wrap_models(self.models, self.dist, frozen)
            loss_funcs, mining_funcs = dist_mod.wrap_losses_and_miners(loss_funcs, mining_funcs)
            extra["batch_size"] = self.settings["batch_size"] // self.dist.world_size
        trainer = registry.build(
            self.cfg["trainer"], where="trainer",
            models=models, optimizers=self.optimizers, loss_funcs=loss_funcs,
            mining_funcs=mining_funcs, dataset=self.train_dataset, sampler=self.sampler,
            lr_schedulers=self.lr_schedulers, data_device=self.device,
            dataset_labels=self.train_labels, set_min_label_to_zero=True,
            end_of_iteration_hook=self.end_of_iteration_hook,
            end_of_epoch_hook=self.end_of_epoch_hook, **extra,
        )
        if self.precision is not None:
            precision.install(trainer, self.precision, self.grad_scaler)
        return trainer

    def train(self) -> None:
        with pml_bars_silenced():
            start_epoch = self.state.epoch + 1
            if self.state.epoch == 0 and not self.state.history and self.cfg["check_untrained_accuracy"]:
                if self.dist.is_main:
                    self.evaluate_and_checkpoint(0, None)
                self.dist.barrier("waiting for rank 0's evaluation of the untrained model")
            if not training_done(self.state, self.cfg):
                dist_mod.decorrelate_rank_rng(self.dist, self.cfg["seed"], self.fold, start_epoch)
                trainer = self.build_trainer()
                ipe = self.settings["iterations_per_epoch"]
                self.progress = RunProgress(
                    os.path.join(os.path.basename(os.path.dirname(self.folder)), os.path.basename(self.folder)),
                    total=self.cfg["num_epochs_train"] * ipe, done=self.state.epoch * ipe,
                    enabled=self.dist.is_main,
                )
                try:
                    self._epoch_start = time.perf_counter()
                    trainer.train(start_epoch=start_epoch, num_epochs=self.cfg["num_epochs_train"])
                except torch.distributed.DistError as exc:
                    raise self.dist.failure(f"training fold {self.fold}", exc) from exc
                finally:
                    self.progress.close()
            self.state.finished = True
            if self.dist.is_main:
                self._save(is_best=False)
                self.evaluate_at_best()
            self.dist.barrier(f"finishing fold {self.fold}")

    def evaluate_at_best(self) -> None:
        """Evaluate splits_to_eval_at_best once, with the best checkpoint's
        models: the test score of the epoch chosen on validation, without
        testing every epoch. Saved in the state, so a resume does not redo it."""
        splits = missing_at_best(self.state, self.cfg)
        if not splits:
            return
        saved = ckpt.load_checkpoint(self.dirs["saved_models"], ckpt.BEST, map_location=self.device)
        models = {name: copy.deepcopy(model) for name, model in self.models.items()}
        ckpt.load_state_dicts(models, saved["models"], "models")
        # a new dict: the old one is also the best epoch's history entry
        at_best = self.evaluate(self.state.best_epoch, splits, models)
        self.state.best_accuracies = {**self.state.best_accuracies, **at_best}
        self.record_keeper.save_records()
        self._save(is_best=False)


def training_done(state: ckpt.TrainingState, cfg: Mapping[str, Any]) -> bool:
    """Stopped early, or trained every epoch the config asks for."""
    patience = cfg.get("patience")
    stopped_early = patience is not None and state.evals_without_improvement > patience
    return stopped_early or state.epoch >= cfg["num_epochs_train"]


def missing_at_best(state: ckpt.TrainingState, cfg: Mapping[str, Any]) -> List[str]:
    """The splits_to_eval_at_best not yet evaluated (none before a best epoch exists)."""
    if state.best_epoch is None:
        return []
    return [s for s in cfg.get("splits_to_eval_at_best") or () if s not in state.best_accuracies]


def is_complete(state: ckpt.TrainingState, cfg: Mapping[str, Any]) -> bool:
    """A finished fold needs no more work unless the config now asks for
    more epochs than it ran (and it did not stop early), or for a split
    evaluated at the best epoch that was not."""
    return state.finished and training_done(state, cfg) and not missing_at_best(state, cfg)


def run_fold(
    cfg: Mapping[str, Any],
    experiment_dir: str,
    fold: int,
    resume: Optional[str] = None,
    dataset_root: Optional[str] = None,
    dist: dist_mod.DistContext = dist_mod.SINGLE,
    on_evaluation: Optional[EvaluationCallback] = None,
) -> FoldResult:
    """Train (or resume) one fold. With resume="latest" a complete fold is
    skipped; a finished one whose num_epochs_train was raised trains on.
    With several processes every rank calls this; only rank 0 writes."""
    folder = fold_dir(experiment_dir, fold)
    models_dir = fold_subdirs(folder)["saved_models"]
    if resume is None and ckpt.load_checkpoint(models_dir, ckpt.LATEST) is not None:
        raise ConfigError(
            f"{folder} already holds a run; use --resume_training latest|best "
            "or another --experiment_name"
        )
    if resume is not None and resume not in RESUME_CHOICES:
        raise ConfigError(f"resume_training must be one of {RESUME_CHOICES}, got {resume!r}")
    if resume == ckpt.LATEST:
        latest = ckpt.load_checkpoint(models_dir, ckpt.LATEST)
        if latest is not None and is_complete(ckpt.TrainingState.from_dict(latest["state"]), cfg):
            return FoldResult(fold, folder, ckpt.TrainingState.from_dict(latest["state"]), skipped=True)

    if cfg.get("num_threads"):
        torch.set_num_threads(cfg["num_threads"])
    run = FoldTraining(cfg, folder, fold, dataset_root, dist, on_evaluation)
    # no best checkpoint yet (only the untrained epoch was evaluated): latest
    resumed = resume is not None and (run.restore(resume) or run.restore(ckpt.LATEST))
    if resumed:
        run.state.finished = False
        LOGGER.info("fold %d: resuming after epoch %d", fold, run.state.epoch)
    # every rank has read the fold's files before rank 0 changes them
    dist.barrier(f"starting fold {fold}")
    run.open_logs(resumed)
    try:
        run.train()
    finally:
        run.close_logs()
    return FoldResult(fold, folder, run.state)


# --------------------------------------------------------------- meta logs
def summarize_folds(results: List[FoldResult]) -> Dict[str, Any]:
    """Mean and std over folds of each split's metrics at the best epoch."""
    per_split: Dict[str, Dict[str, List[float]]] = {}
    for r in results:
        for split, metrics in r.state.best_accuracies.items():
            for metric, value in metrics.items():
                per_split.setdefault(split, {}).setdefault(metric, []).append(value)
    summary: Dict[str, Any] = {
        split: {
            m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_fold": v}
            for m, v in metrics.items()
        }
        for split, metrics in per_split.items()
    }
    times = [r.seconds_per_iteration for r in results if r.seconds_per_iteration]
    medians = [r.median_seconds_per_iteration for r in results if r.median_seconds_per_iteration]
    summary["seconds_per_iteration"] = float(np.mean(times)) if times else None
    summary["median_seconds_per_iteration"] = float(np.mean(medians)) if medians else None
    summary["best_epoch"] = {str(r.fold): r.state.best_epoch for r in results}
    return summary


def summary_splits(summary: Mapping[str, Any]) -> List[str]:
    """The split names of a `summarize_folds` result (its other keys are timings)."""
    return [k for k in summary if k not in SUMMARY_EXTRA_KEYS]


def write_meta_logs(experiment_dir: str, results: List[FoldResult]) -> Dict[str, Any]:
    """meta_logs/best_accuracies.json plus a record-keeper CSV/logs.db with
    one row (the mean over folds) per split."""
    import record_keeper as rk

    summary = summarize_folds(results)
    folder = meta_logs_dir(experiment_dir)
    csv_folder = os.path.join(folder, "saved_csvs")
    shutil.rmtree(csv_folder, ignore_errors=True)  # derived data: rewritten whole
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "best_accuracies.json"), "w") as f:
        json.dump(summary, f, indent=2)
    writer = rk.RecordKeeper(record_writer=rk.RecordWriter(folder=csv_folder))
    for split in summary_splits(summary):
        means = {m: v["mean"] for m, v in summary[split].items()}
        writer.update_records(means, len(results), parent_name=f"meta_accuracies_{split.upper()}")
    writer.save_records()
    return summary


def run_experiment(
    cfg: Mapping[str, Any],
    experiment_dir: str,
    resume: Optional[str] = None,
    dataset_root: Optional[str] = None,
    dist: dist_mod.DistContext = dist_mod.SINGLE,
    on_evaluation: Optional[EvaluationCallback] = None,
) -> ExperimentResult:
    """Run every fold in cfg['splits']['folds'] and write meta_logs (rank 0
    only when several processes train; the others' result has no meta).

    `on_evaluation(fold, epoch, accuracies)` is called on rank 0 after each
    trained epoch's evaluation is logged and checkpointed; it may raise to
    stop the run (a search's pruner does), which leaves it resumable there."""
    result = ExperimentResult(experiment_dir=experiment_dir)
    for fold in cfg["splits"]["folds"]:
        result.folds.append(run_fold(cfg, experiment_dir, fold, resume, dataset_root, dist, on_evaluation))
    if dist.is_main:
        result.meta = write_meta_logs(experiment_dir, result.folds)
    return result


# -------------------------------------------------------------- evaluation
def evaluate_experiment(
    cfg: Mapping[str, Any],
    experiment_dir: str,
    which: str = ckpt.BEST,
    dataset_root: Optional[str] = None,
) -> Dict[int, Dict[str, Dict[str, float]]]:
    """Evaluate the saved models of each fold (no training, no log changes);
    writes meta_logs/evaluation_<which>.json."""
    out = {}
    for fold in cfg["splits"]["folds"]:
        run = FoldTraining(cfg, fold_dir(experiment_dir, fold), fold, dataset_root)
        if not run.restore(which):
            raise FileNotFoundError(
                f"{run.dirs['saved_models']}: no {ckpt.CHECKPOINT_NAMES[which]} to evaluate"
            )
        run.tester = build_tester(cfg, run.device, end_of_testing_hook=lambda tester: None)
        raw = run.tester.test(
            run.eval_datasets, run.state.epoch, run.models["trunk"], run.models["embedder"],
            splits_to_eval=[(s, [s]) for s in eval_splits(cfg)],
        )
        out[fold] = {split: clean_accuracies(v) for split, v in raw.items()}
    os.makedirs(meta_logs_dir(experiment_dir), exist_ok=True)
    with open(os.path.join(meta_logs_dir(experiment_dir), f"evaluation_{which}.json"), "w") as f:
        json.dump({str(k): v for k, v in out.items()}, f, indent=2)
    return out
