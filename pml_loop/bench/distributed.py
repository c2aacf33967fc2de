"""Training with several processes (``torchrun``): one global batch, split over ranks.

``torchrun --nproc_per_node N -m pml_loop.bench ...`` starts N copies of the
runner; each finds RANK / LOCAL_RANK / WORLD_SIZE in its environment
(`launch_from_env`). Without those variables nothing here is used and the
runner is the single-process one.

What makes N processes train like one process on the concatenated batch:

- `RankShardSampler`: every rank draws the *same* global order (the configured
  sampler, e.g. MPerClassSampler with the global batch size, fed from a
  random stream the ranks share) and keeps its own slice of each global batch,
  so the union of the ranks' local batches at a step is the one-process batch.
- `GlobalBatchLoss` / `GlobalBatchMiner`: the embeddings and labels of all
  ranks are gathered (in rank order, i.e. the one-process batch order), the
  local slice keeping its autograd graph, and the loss / miner runs on the
  whole batch, so LoOp's positive partners and negatives come from every
  rank. DistributedDataParallel then *averages* the ranks' gradients; each
  rank only back-propagates through its own slice, so that slice's gradient is
  scaled by the world size (`scale_gradient`): the average of the ranks'
  gradients is then exactly the one-process gradient, while the loss *value*
  (what is logged) stays the one-process loss. PML's DistributedLossWrapper
  instead multiplies the loss itself by the world size, which also scales the
  logged value and the gradient of any parameters the loss owns.
- Rank 0 alone evaluates, logs and writes checkpoints; the other ranks wait
  for it on a barrier (`DistContext.barrier`) of a gloo group whose timeout
  (``--dist_timeout``) turns a dead or stuck rank into an error message
  instead of a hang.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
from pytorch_metric_learning.utils import common_functions as c_f

from .config import ConfigError

LOGGER = logging.getLogger(__name__)

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
DEFAULT_TIMEOUT_S = 600.0


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank died or is stuck."""


# ------------------------------------------------------------------ launch
@dataclass(frozen=True)
class Launch:
    """Where this process sits, as torchrun's environment says."""

    rank: int
    local_rank: int
    world_size: int


def launch_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[Launch]:
    """The torchrun launch this process is part of, or None when it was started
    as a plain single process (none of RANK, LOCAL_RANK, WORLD_SIZE set)."""
    environ = os.environ if environ is None else environ
    present = [k for k in LAUNCH_VARIABLES if k in environ]
    if not present:
        return None
    missing = [k for k in LAUNCH_VARIABLES if k not in environ]
    if missing:
        raise ConfigError(
            f"environment: {', '.join(present)} set but {', '.join(missing)} not; start several "
            "processes with torchrun --nproc_per_node N -m pml_loop.bench ..., or unset them"
        )
    try:
        launch = Launch(*(int(environ[k]) for k in LAUNCH_VARIABLES))
    except ValueError as exc:
        raise ConfigError(f"environment: {LAUNCH_VARIABLES} must be integers: {exc}") from exc
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size or launch.local_rank < 0:
        raise ConfigError(f"environment: inconsistent torchrun variables {launch}")
    return launch


def global_batch_size(cfg: Mapping[str, Any]) -> int:
    return int(next(iter(cfg["trainer"].values()))["batch_size"])


def check_world_size(cfg: Mapping[str, Any], world_size: int) -> int:
    """The per-rank batch size; ConfigError when the world size cannot share
    the global batch. Runs before anything is written.

    A local batch need not be a multiple of the sampler's m: the loss sees the
    whole global batch, where every class still has its m samples."""
    batch = global_batch_size(cfg)
    trainer = next(iter(cfg["trainer"]))
    if batch % world_size:
        raise ConfigError(
            f"trainer.{trainer}.batch_size: {batch} is the global batch (all processes together) "
            f"and must be divisible by the number of processes, {world_size}; "
            f"e.g. use --nproc_per_node {_divisor_hint(batch, world_size)} or a batch_size of "
            f"{batch + world_size - batch % world_size}"
        )
    if not cfg.get("sampler"):
        raise ConfigError(
            "sampler: several processes need a sampler (e.g. {MPerClassSampler: {m: 4}}) so that "
            "all ranks cut their batches from one global order"
        )
    return batch // world_size


def _divisor_hint(batch: int, world_size: int) -> int:
    return max(d for d in range(1, world_size + 1) if batch % d == 0)


# ----------------------------------------------------------------- context
class DistContext:
    """This process's rank, device and the groups it talks through.

    The single-process runner uses `SINGLE` (world size 1, no process group),
    whose barriers and broadcasts do nothing, so the runner code reads the
    same in both cases.
    """

    def __init__(
        self,
        rank: int = 0,
        local_rank: int = 0,
        world_size: int = 1,
        device: Optional[torch.device] = None,
        control_group: Any = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        active: bool = False,
    ):
        self.rank = rank
        self.local_rank = local_rank
        self.world_size = world_size
        self.device = device
        self.control_group = control_group
        self.timeout_s = timeout_s
        # True when a process group is in use (torchrun, even with one process)
        self.active = active

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self, what: str) -> None:
        """Wait for every rank (e.g. for rank 0's evaluation and checkpoint)."""
        if not self.active:
            return
        try:
            dist.barrier(group=self.control_group)
        except RuntimeError as exc:  # DistBackendError and gloo timeouts
            raise self.failure(what, exc) from exc

    def broadcast(self, value: Any, what: str) -> Any:
        """Rank 0's `value` on every rank (a picklable object)."""
        if not self.active:
            return value
        box = [value]
        try:
            dist.broadcast_object_list(box, src=0, group=self.control_group)
        except RuntimeError as exc:
            raise self.failure(what, exc) from exc
        return box[0]

    def failure(self, what: str, exc: BaseException) -> DistributedError:
        return DistributedError(
            f"rank {self.rank}/{self.world_size}: {what} failed: another process died or did not "
            f"answer within --dist_timeout {self.timeout_s:g} s (raise it if rank 0's evaluation "
            f"takes longer). Cause: {type(exc).__name__}: {exc}"
        )

    def same_on_all_ranks(self, value: int, what: str) -> None:
        """Raise when the ranks disagree on `value` (e.g. a hash of the sampler order)."""
        if not self.active or self.world_size == 1:
            return
        values: List[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(values, value, group=self.control_group)
        except RuntimeError as exc:
            raise self.failure(what, exc) from exc
        if len(set(values)) > 1:
            raise DistributedError(f"{what}: the processes disagree ({values})")


SINGLE = DistContext()


def resolve_dist_device(name: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK for "cuda"/"auto" with a GPU, else the CPU. An explicit
    cuda:N would put every rank on one GPU, so it is refused."""
    if name.startswith("cuda:"):
        raise ConfigError(
            f"device: {name} with several processes; use device cuda (or auto): each process "
            "uses cuda:LOCAL_RANK (select GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device: cuda requested but torch sees no GPU")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"device: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible; "
                "use at most one process per GPU"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(launch: Launch, device_name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join torchrun's process group: nccl on GPU, gloo on CPU. Barriers and
    object broadcasts go through a gloo group (on GPU a second one) so that
    waiting for rank 0 needs no GPU and its timeout always raises an error."""
    if timeout_s <= 0:
        raise ConfigError(f"--dist_timeout: must be positive, got {timeout_s}")
    device = resolve_dist_device(device_name, launch.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs: Dict[str, Any] = {}
        if device.type == "cuda":
            kwargs["device_id"] = device  # binds the nccl communicator to this rank's GPU
        dist.init_process_group(
            backend, rank=launch.rank, world_size=launch.world_size, timeout=timeout, **kwargs
        )
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    LOGGER.info("rank %d/%d on %s (%s)", launch.rank, launch.world_size, device, backend)
    return DistContext(
        launch.rank, launch.local_rank, launch.world_size, device, control, timeout_s, active=True
    )


def teardown(context: DistContext) -> None:
    if context.active and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------ random state
def decorrelate_rank_rng(context: DistContext, *seed_parts: int) -> None:
    """Give ranks > 0 their own torch and python random streams (data
    augmentation, dropout: each rank sees other samples and must not repeat
    rank 0's draws). Rank 0 keeps the seeded stream of a one-process run. The
    numpy stream (PML's c_f.NUMPY_RANDOM) stays identical on every rank: the
    miners and losses run on the global batch on every rank and must agree."""
    if not context.active or context.rank == 0:
        return
    seed = int(np.random.SeedSequence([*seed_parts, context.rank]).generate_state(1)[0])
    torch.manual_seed(seed)
    random.seed(seed)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a rank-0-only section (evaluation) without moving any random
    stream, so rank 0 stays in step with the other ranks."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "pml_numpy": c_f.NUMPY_RANDOM.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    try:
        yield
    finally:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        c_f.NUMPY_RANDOM.set_state(state["pml_numpy"])
        random.setstate(state["python"])
        if state["cuda"] is not None:
            torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------- sampler
class RankShardSampler(torch.utils.data.Sampler):
    """This rank's share of a global sampler's batches.

    Every rank draws the full order of `sampler` (built with the *global*
    batch size, e.g. MPerClassSampler), cuts it into global batches of
    `global_batch_size` and yields the `rank`-th slice of each, of
    global_batch_size / world_size indices; a DataLoader with that batch size
    then gives this rank its part of each global batch, in order.

    The ranks must draw the same order. PML's samplers draw from
    c_f.NUMPY_RANDOM; this sampler keeps its own copy of that stream
    (`numpy_state`, started from c_f.NUMPY_RANDOM's state at construction,
    i.e. after seeding) and swaps it in while the global order is drawn, so
    nothing rank 0 alone does (evaluation) can shift it. A one-process run
    draws the same numbers from c_f.NUMPY_RANDOM itself, so with the same seed
    the global batches are the ones a one-process run trains on.

    `check_order` (optional) receives a hash of each drawn order; the runner
    passes one that compares it across ranks and raises if they differ (a
    sampler drawing from another random stream).
    """

    def __init__(
        self,
        sampler: Any,
        global_batch_size: int,
        rank: int,
        world_size: int,
        numpy_state: Optional[tuple] = None,
        check_order: Optional[Callable[[int], None]] = None,
    ):
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} not divisible by world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.inner_sampler = sampler
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.world_size = world_size
        self.numpy_state = numpy_state if numpy_state is not None else c_f.NUMPY_RANDOM.get_state()
        self.check_order = check_order

    def __len__(self) -> int:
        # only whole global batches (the trainer's DataLoader drops the rest)
        return (len(self.inner_sampler) // self.global_batch_size) * self.local_batch_size

    def global_order(self) -> List[int]:
        """The next full order of the wrapped sampler, drawn from this
        sampler's stream (c_f.NUMPY_RANDOM is left as it was)."""
        outside = c_f.NUMPY_RANDOM.get_state()
        c_f.NUMPY_RANDOM.set_state(self.numpy_state)
        try:
            order = [int(i) for i in iter(self.inner_sampler)]
            self.numpy_state = c_f.NUMPY_RANDOM.get_state()
        finally:
            c_f.NUMPY_RANDOM.set_state(outside)
        return order

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        if self.check_order is not None:
            self.check_order(zlib.crc32(np.asarray(order, dtype=np.int64).tobytes()))
        batch, local = self.global_batch_size, self.local_batch_size
        start = self.rank * local
        shard: List[int] = []
        for offset in range(0, len(order) - batch + 1, batch):
            shard.extend(order[offset + start: offset + start + local])
        return iter(shard)


# ---------------------------------------------------------- loss and miner
class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `scale`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` unchanged, but the gradient reaching `x` multiplied by `scale`."""
    return _ScaleGradient.apply(x, scale)


def gather_global(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` concatenated in rank order (the one-process batch
    order); this rank's part is `x` itself and keeps its autograd graph, the
    others are constants. All ranks must pass the same shape."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


class GlobalBatchLoss(torch.nn.Module):
    """Runs `loss` on the global batch (every rank's embeddings and labels).

    The value is the one-process loss on the concatenated batch. The gradient
    reaching this rank's embeddings is world_size times that loss's gradient,
    which DistributedDataParallel's averaging turns into the one-process
    gradient of the model; parameters of the loss itself get the one-process
    gradient directly (every rank computes the same one). `indices_tuple`, if
    given, must index the global batch (`GlobalBatchMiner` does).
    """

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        indices_tuple: Optional[tuple] = None,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("GlobalBatchLoss: ref_emb/ref_labels are not supported with several processes")
        if labels is None:
            raise ValueError("GlobalBatchLoss: labels are needed to gather the global batch")
        world = dist.get_world_size()
        all_emb = gather_global(scale_gradient(embeddings, float(world)) if world > 1 else embeddings)
        all_labels = gather_global(torch.as_tensor(labels, device=embeddings.device))
        return self.loss(all_emb, all_labels, indices_tuple)


class GlobalBatchMiner(torch.nn.Module):
    """Runs `miner` on the global batch; its indices point into it (as
    `GlobalBatchLoss` expects)."""

    def __init__(self, miner: torch.nn.Module):
        super().__init__()
        self.miner = miner

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
    ) -> Any:
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("GlobalBatchMiner: ref_emb/ref_labels are not supported with several processes")
        with torch.no_grad():
            all_emb = gather_global(embeddings.detach())
            all_labels = gather_global(torch.as_tensor(labels, device=embeddings.device))
        return self.miner(all_emb, all_labels)


# Miners that pick a subset of the batch before the forward pass act on the
# local data; only the tuple miner sees embeddings.
GLOBAL_MINER_KEYS = ("tuple_miner",)


def wrap_losses_and_miners(
    loss_funcs: Mapping[str, torch.nn.Module], mining_funcs: Mapping[str, Any]
) -> tuple:
    """(loss_funcs, mining_funcs) for the trainer: metric losses and the tuple
    miner see the global batch. Other losses (e.g. a classifier's cross
    entropy on local logits, averaged by DDP over equal local batches) stay as
    they are."""
    from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory

    losses = {}
    for name, loss in loss_funcs.items():
        if isinstance(loss, CrossBatchMemory):
            raise ConfigError(
                f"loss_funcs.{name}: CrossBatchMemory is not supported with several processes "
                "(its memory would have to be kept in step across ranks)"
            )
        losses[name] = GlobalBatchLoss(loss) if isinstance(loss, BaseMetricLossFunction) else loss
    miners = {
        name: GlobalBatchMiner(miner) if name in GLOBAL_MINER_KEYS else miner
        for name, miner in mining_funcs.items()
    }
    return losses, miners


def wrap_models(
    models: Dict[str, torch.nn.Module], context: DistContext, frozen: tuple = ()
) -> Dict[str, torch.nn.Module]:
    """DistributedDataParallel around each model with trainable parameters
    (not around the ones the trainer freezes: DDP would wait for their
    gradients). On GPU, BatchNorm layers become SyncBatchNorm first, so batch
    statistics are those of the global batch as in one process; this changes
    `models` in place (the layers share their parameters and buffers, and the
    state_dict keys are the same). On CPU SyncBatchNorm does not exist: there
    BatchNorm normalises each rank's local batch."""
    from torch.nn.parallel import DistributedDataParallel

    wrapped = {}
    for name, model in models.items():
        trainable = any(p.requires_grad for p in model.parameters())
        if not trainable or name in frozen:
            wrapped[name] = model
            continue
        if context.device is not None and context.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            models[name] = model
        device_ids = [context.device] if context.device is not None and context.device.type == "cuda" else None
        wrapped[name] = DistributedDataParallel(model, device_ids=device_ids)
    return wrapped


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistContext",
    "DistributedError",
    "GlobalBatchLoss",
    "GlobalBatchMiner",
    "Launch",
    "RankShardSampler",
    "SINGLE",
    "check_world_size",
    "decorrelate_rank_rng",
    "gather_global",
    "launch_from_env",
    "preserved_rng",
    "resolve_dist_device",
    "scale_gradient",
    "setup",
    "teardown",
    "wrap_losses_and_miners",
    "wrap_models",
]
