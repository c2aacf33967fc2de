"""Mixed-precision training for the runner: autocast plus, for float16, a GradScaler.

Config (config_general, optional; absent or null = float32 training)::

    mixed_precision: {dtype: bfloat16}   # CPU or CUDA; no scaler needed
    mixed_precision: {dtype: float16}    # CUDA only; with torch.amp.GradScaler

PML's trainers run their own step (``forward_and_backward`` calls
``calculate_loss``, ``backward``, ``clip_gradients``, ``step_optimizers``), so
:func:`install` replaces those four methods on the trainer *instance*: the
forward (models and losses) under ``torch.autocast``, the backward on the
scaled loss, gradients unscaled before any clipper reads them, and each
optimizer stepped through the scaler, which skips a step whose gradients
hold an inf or NaN (a float16 overflow) and lowers the scale, instead of
failing. The LoOp geometry itself always runs in float32 (see
``LoOpDistance``); a NaN embedding makes a NaN loss and a warning with
``nonfinite="warn"``, which is exactly the step the scaler skips, so a float16
run refuses ``nonfinite="raise"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from pytorch_metric_learning.utils import common_functions as c_f

from ..distance import LoOpDistance
from .config import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
CONFIG_KEY = "mixed_precision"


@dataclass(frozen=True)
class MixedPrecision:
    """Autocast settings of a run: ``dtype`` on ``device_type`` ("cpu", "cuda")."""

    dtype: torch.dtype
    device_type: str

    @property
    def scaled(self) -> bool:
        """float16 has too few exponent bits for small gradients: it needs loss
        scaling; bfloat16 has float32's range and does not."""
        return self.dtype == torch.float16

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def config_error(value: Any) -> Optional[str]:
    """Schema check of the ``mixed_precision`` value (None when valid)."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"dtype"}:
        return f"expected null or {{dtype: {' | '.join(DTYPES)}}}, got {value!r}"
    if value["dtype"] not in DTYPES:
        return (f"dtype: expected one of {', '.join(DTYPES)}, got {value['dtype']!r} "
                "(float32 training: leave mixed_precision out or set it to null)")
    return None


def from_config(cfg: Mapping[str, Any], device: torch.device) -> Optional[MixedPrecision]:
    """The run's mixed-precision settings on ``device``, or None for float32.

    Raises ConfigError for a malformed value and for float16 on the CPU:
    CPU float16 autocast exists in torch but runs in emulation (slower than
    float32 on CPUs without float16 arithmetic); bfloat16 is the CPU's half type.
    """
    value = cfg.get(CONFIG_KEY)
    problem = config_error(value)
    if problem:
        raise ConfigError(f"{CONFIG_KEY}: {problem}")
    if value is None:
        return None
    dtype = DTYPES[value["dtype"]]
    device = torch.device(device)
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError(
            f"{CONFIG_KEY}: float16 needs a CUDA device, but the run's device is {device}; "
            "use {dtype: bfloat16} on the CPU"
        )
    return MixedPrecision(dtype, device.type)


def make_scaler(precision: Optional[MixedPrecision]) -> Optional[torch.amp.GradScaler]:
    """A GradScaler for float16; None otherwise (nothing to save or restore)."""
    if precision is None or not precision.scaled:
        return None
    return torch.amp.GradScaler(precision.device_type)


def check_losses(precision: Optional[MixedPrecision], loss_funcs: Mapping[str, Any]) -> None:
    """A float16 run must survive an overflowing step: refuse losses that would
    raise on the NaN/inf embeddings such a step produces."""
    if precision is None or not precision.scaled:
        return
    for name, loss in loss_funcs.items():
        modules = loss.modules() if isinstance(loss, torch.nn.Module) else ()
        if any(isinstance(m, LoOpDistance) and m.nonfinite == "raise" for m in modules):
            raise ConfigError(
                f"loss_funcs.{name}: nonfinite='raise' would stop a float16 run at the first "
                "overflow, a step GradScaler is there to skip; use nonfinite='warn' (the default)"
            )


def install(trainer: Any, precision: MixedPrecision, scaler: Optional[torch.amp.GradScaler]) -> Any:
    """Make a PML trainer's step mixed precision (see the module docstring).

    Replaces ``calculate_loss``, ``backward``, ``clip_gradients`` and
    ``step_optimizers`` on this instance only; each calls the trainer's own
    method where there is one, so a subclass's loss computation and clippers
    still run. ``scaler`` is None for bfloat16. Returns the trainer.
    """
    calculate_loss = trainer.calculate_loss
    clip_gradients = trainer.clip_gradients

    def autocast_calculate_loss(curr_batch):
        # Models and losses run under autocast; LoOpDistance turns it off for
        # its own float32 geometry. The loss tracker sums outside.
        with precision.autocast():
            return calculate_loss(curr_batch)

    def scaled_backward():
        loss = trainer.losses["total_loss"]
        (loss if scaler is None else scaler.scale(loss)).backward()

    def unscaled_clip_gradients():
        if scaler is not None and trainer.gradient_clippers:
            # Clippers must see true gradients; step() then does not unscale twice.
            for optimizer in _stepped(trainer):
                scaler.unscale_(optimizer)
        clip_gradients()

    def scaled_step_optimizers():
        if scaler is None:
            for optimizer in _stepped(trainer):
                optimizer.step()
            return
        for optimizer in _stepped(trainer):
            scaler.step(optimizer)  # skipped when its gradients hold inf/NaN
        scaler.update()  # once per iteration, after every optimizer

    trainer.calculate_loss = autocast_calculate_loss
    trainer.backward = scaled_backward
    trainer.clip_gradients = unscaled_clip_gradients
    trainer.step_optimizers = scaled_step_optimizers
    trainer.mixed_precision = precision
    trainer.grad_scaler = scaler
    return trainer


def _stepped(trainer: Any) -> list:
    """The optimizers PML's ``step_optimizers`` steps: all but frozen models'."""
    return [opt for name, opt in trainer.optimizers.items()
            if c_f.regex_replace("_optimizer$", "", name) not in trainer.freeze_these]


def records(scaler: Optional[torch.amp.GradScaler]) -> dict:
    """What to log: the current loss scale (it halves at each skipped step)."""
    if scaler is None or not scaler.is_enabled():
        return {}
    return {"grad_scale": scaler.get_scale()}
