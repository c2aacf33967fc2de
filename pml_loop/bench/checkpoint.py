"""Checkpoints that let a run resume exactly, and trimming of logs on resume.

A checkpoint is written at each evaluation and holds everything the next
epoch depends on: model/optimizer/scheduler/loss/miner state, a float16
run's GradScaler, the sampler's label order (MPerClassSampler shuffles its
own list in place), every RNG (torch, CUDA, numpy - which PML's samplers use
through `c_f.NUMPY_RANDOM` - and python's `random`), and the training state
(epoch, best metric, patience counter, wall time). Files are written to a temporary name and renamed, so a kill during
the write leaves the previous checkpoint intact.

Record-keeper appends to CSVs and sqlite; anything it wrote after the
checkpoint's epoch would be written again by the resumed run, so
`truncate_records` drops it first.
"""

from __future__ import annotations

import csv
import os
import random
import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch
from pytorch_metric_learning.utils import common_functions as c_f

LATEST = "latest"
BEST = "best"
CHECKPOINT_NAMES = {LATEST: "checkpoint_latest.pth", BEST: "checkpoint_best.pth"}
ITERATION_COLUMN = "~iteration~"  # record-keeper's key column in every table


@dataclass
class TrainingState:
    """What the training loop needs besides the objects' own state."""

    epoch: int = 0  # last completed (and evaluated) epoch; 0 = untrained
    best_epoch: Optional[int] = None
    best_metric: Optional[float] = None
    evals_without_improvement: int = 0
    finished: bool = False
    # metrics of every evaluated split at best_epoch: {split: {metric: value}}
    best_accuracies: Dict[str, Dict[str, float]] = field(default_factory=dict)
    # per evaluated epoch: {"epoch", "seconds_per_iteration", split metrics...}
    history: list = field(default_factory=list)
    # seconds this fold has spent building, training and evaluating, summed
    # over every session (a resume adds to it, a skipped rerun does not)
    wall_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainingState":
        return cls(**dict(d))


# ----------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """Every random stream a training epoch can draw from."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        # PML's samplers draw from c_f.NUMPY_RANDOM; it is np.random unless a
        # user replaced it with a RandomState, so save it separately.
        "pml_numpy": c_f.NUMPY_RANDOM.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    # torch takes generator states only as CPU byte tensors; a checkpoint
    # loaded with map_location="cuda" has moved them to the GPU.
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    c_f.NUMPY_RANDOM.set_state(state["pml_numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# -------------------------------------------------------------- object state
def state_dicts(objects: Mapping[str, Any]) -> dict:
    """state_dict() of every object that has one (models, optimizers, ...)."""
    return {k: v.state_dict() for k, v in objects.items() if hasattr(v, "state_dict")}


def load_state_dicts(objects: Mapping[str, Any], saved: Mapping[str, Any], what: str) -> None:
    missing = set(saved) ^ {k for k, v in objects.items() if hasattr(v, "state_dict")}
    if missing:
        raise ValueError(
            f"checkpoint {what} do not match the config: differing keys {sorted(missing)}"
        )
    for k, v in saved.items():
        objects[k].load_state_dict(v)


def sampler_state(sampler: Any) -> Optional[dict]:
    """The mutable part of a sampler. MPerClassSampler shuffles `labels` in
    place, so its order is state; other samplers may define state_dict().

    A multi-process run's `RankShardSampler` saves the state of the sampler
    it wraps (the same format as a one-process run) plus its own copy of the
    numpy stream the order is drawn from (`numpy_random`); that is what lets a
    run resume with another number of processes (see `restore_sampling_stream`).
    """
    if sampler is None:
        return None
    inner = getattr(sampler, "inner_sampler", None)
    if inner is not None:
        state = sampler_state(inner) or {}
        return dict(state, numpy_random=sampler.numpy_state)
    if hasattr(sampler, "state_dict"):
        return {"state_dict": sampler.state_dict()}
    if isinstance(getattr(sampler, "labels", None), list):
        return {"labels": list(sampler.labels)}
    return None


def load_sampler_state(sampler: Any, state: Optional[Mapping[str, Any]]) -> None:
    if sampler is None or state is None:
        return
    sampler = getattr(sampler, "inner_sampler", sampler)
    if "state_dict" in state:
        sampler.load_state_dict(state["state_dict"])
    elif "labels" in state:
        sampler.labels[:] = state["labels"]


def restore_sampling_stream(sampler: Any, state: Optional[Mapping[str, Any]], rng: Mapping[str, Any]) -> None:
    """Continue the random stream the sampler's order is drawn from, whatever
    number of processes wrote the checkpoint.

    One process draws the order from c_f.NUMPY_RANDOM (saved in rng["pml_numpy"]);
    several draw it from the RankShardSampler's own copy (saved as the
    sampler state's numpy_random). Called after the RNGs are restored: the
    saved stream goes where this run draws from, so the next global batches
    are the ones the interrupted run would have drawn.
    """
    if sampler is None or state is None:
        return
    saved_stream = state.get("numpy_random")
    if hasattr(sampler, "inner_sampler"):
        sampler.numpy_state = saved_stream if saved_stream is not None else rng["pml_numpy"]
    elif saved_stream is not None:
        c_f.NUMPY_RANDOM.set_state(saved_stream)


# --------------------------------------------------------------- file level
def checkpoint_path(model_folder: str, which: str = LATEST) -> str:
    if which not in CHECKPOINT_NAMES:
        raise ValueError(f"checkpoint must be one of {sorted(CHECKPOINT_NAMES)}, got {which!r}")
    return os.path.join(model_folder, CHECKPOINT_NAMES[which])


def save_checkpoint(
    model_folder: str,
    *,
    state: TrainingState,
    models: Mapping[str, Any],
    optimizers: Mapping[str, Any],
    lr_schedulers: Mapping[str, Any],
    loss_funcs: Mapping[str, Any],
    mining_funcs: Mapping[str, Any],
    sampler: Any = None,
    grad_scaler: Any = None,
    is_best: bool = False,
) -> str:
    """Write checkpoint_latest.pth (and checkpoint_best.pth when `is_best`).
    `grad_scaler`: a float16 run's torch.amp.GradScaler (its scale and growth
    tracker decide which of the next steps are skipped)."""
    os.makedirs(model_folder, exist_ok=True)
    payload = {
        "state": state.to_dict(),
        "models": state_dicts(models),
        "optimizers": state_dicts(optimizers),
        "lr_schedulers": state_dicts(lr_schedulers),
        "loss_funcs": state_dicts(loss_funcs),
        "mining_funcs": state_dicts(mining_funcs),
        "sampler": sampler_state(sampler),
        "rng": capture_rng_state(),
    }
    if grad_scaler is not None:
        payload["grad_scaler"] = grad_scaler.state_dict()
    path = checkpoint_path(model_folder, LATEST)
    _atomic_save(payload, path)
    if is_best:
        _atomic_save(payload, checkpoint_path(model_folder, BEST))
    return path


def _atomic_save(payload: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(model_folder: str, which: str = LATEST, map_location: Any = "cpu") -> Optional[dict]:
    """The checkpoint dict, or None when there is none yet."""
    path = checkpoint_path(model_folder, which)
    if not os.path.isfile(path):
        return None
    # weights_only=False: the payload holds numpy RNG state and python tuples.
    return torch.load(path, map_location=map_location, weights_only=False)


def restore_checkpoint(
    checkpoint: Mapping[str, Any],
    *,
    models: Mapping[str, Any],
    optimizers: Mapping[str, Any],
    lr_schedulers: Mapping[str, Any],
    loss_funcs: Mapping[str, Any],
    mining_funcs: Mapping[str, Any],
    sampler: Any = None,
    grad_scaler: Any = None,
    restore_rng: bool = True,
) -> TrainingState:
    """Load every object's state from `checkpoint`; returns the TrainingState.
    A `grad_scaler` keeps its fresh state when the checkpoint has none (a
    float32 or bfloat16 run resumed in float16)."""
    load_state_dicts(models, checkpoint["models"], "models")
    load_state_dicts(optimizers, checkpoint["optimizers"], "optimizers")
    load_state_dicts(lr_schedulers, checkpoint["lr_schedulers"], "lr_schedulers")
    load_state_dicts(loss_funcs, checkpoint["loss_funcs"], "loss_funcs")
    load_state_dicts(mining_funcs, checkpoint["mining_funcs"], "mining_funcs")
    load_sampler_state(sampler, checkpoint.get("sampler"))
    if grad_scaler is not None and checkpoint.get("grad_scaler"):
        grad_scaler.load_state_dict(checkpoint["grad_scaler"])
    if restore_rng:
        restore_rng_state(checkpoint["rng"])
        restore_sampling_stream(sampler, checkpoint.get("sampler"), checkpoint["rng"])
    return TrainingState.from_dict(checkpoint["state"])


# ------------------------------------------------------------ log trimming
def truncate_records(
    csv_folder: str,
    last_epoch: int,
    iterations_per_epoch: int,
    is_epoch_table: Callable[[str], bool],
) -> Dict[str, int]:
    """Drop records logged after `last_epoch` from logs.db and every CSV.

    Tables keyed by epoch (accuracies, timings) keep rows with key <= last_epoch;
    tables keyed by global iteration keep rows with key < last_epoch *
    iterations_per_epoch (PML numbers iterations from 0). `last_epoch=-1`
    empties everything. Returns {table: rows removed} for the sqlite tables.
    """
    if not os.path.isdir(csv_folder):
        return {}
    removed = {}
    db_path = os.path.join(csv_folder, "logs.db")
    if os.path.isfile(db_path):
        removed = _truncate_sqlite(db_path, last_epoch, iterations_per_epoch, is_epoch_table)
    for name in sorted(os.listdir(csv_folder)):
        if name.endswith(".csv"):
            table = name[: -len(".csv")]
            keep_below = _cutoff(table, last_epoch, iterations_per_epoch, is_epoch_table)
            _truncate_csv(os.path.join(csv_folder, name), keep_below)
    return removed


def _cutoff(table: str, last_epoch: int, ipe: int, is_epoch_table) -> float:
    """Rows with key < cutoff survive."""
    if last_epoch < 0:
        return float("-inf")
    return last_epoch + 1 if is_epoch_table(table) else last_epoch * ipe


def _truncate_sqlite(db_path: str, last_epoch: int, ipe: int, is_epoch_table) -> Dict[str, int]:
    removed = {}
    conn = sqlite3.connect(db_path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info([{table}])")]
            if ITERATION_COLUMN not in columns:
                continue
            cutoff = _cutoff(table, last_epoch, ipe, is_epoch_table)
            cur = conn.execute(
                f"DELETE FROM [{table}] WHERE [{ITERATION_COLUMN}] >= ?", (cutoff,)
            ) if cutoff != float("-inf") else conn.execute(f"DELETE FROM [{table}]")
            removed[table] = cur.rowcount
        conn.commit()
    finally:
        conn.close()
    return removed


def _truncate_csv(path: str, keep_below: float) -> None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = []
    for row in rows:
        if not row:
            continue
        if row[0] == ITERATION_COLUMN:
            # record-keeper re-writes the header only when the columns change;
            # drop a header whose block lost all its rows.
            if kept and kept[-1][0] == ITERATION_COLUMN:
                kept.pop()
            kept.append(row)
        elif float(row[0]) < keep_below:
            kept.append(row)
    if kept and kept[-1][0] == ITERATION_COLUMN and len(kept) > 1:
        # a trailing empty header block can only mislead the next append
        kept.pop()
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(kept)

