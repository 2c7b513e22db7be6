"""DeepSpeed: the process group, the DeepSpeed config (built in one place), the engines, collectives.

`build_ds_config(cfg, world_size)` is the only place batch size, accumulation, clipping, precision
and ZeRO stage reach DeepSpeed; the run directory keeps its output as `ds_config.json`. The teacher's
ZeRO-3 engine takes a config derived from it (`teacher_ds_config`), so nothing is stated twice.

Parallelism is applied by free functions, in this order, and leaves the model code untouched:
    build_engine(model, cfg, world_size)     the student under DeepSpeed (ZeRO 0-3, bf16, accumulation)
    apply_zero3_teacher(teacher, ds_config)  ZeRO-3 only: the teacher partitioned like the student

Every optimizer the engine steps skips a step whose gradient norm is not finite (DeepSpeed's own
wrappers, or `FiniteAdamW` where DeepSpeed has none), and checkpoint files are written by
`save_whole`, which reports a full or read-only disk as the OSError it is.
"""
from __future__ import annotations

import math
import os
import socket
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from d2v_engine import cpu_threads
from d2v_engine.config import Config
from d2v_engine.errors import UserError

if TYPE_CHECKING:
    from d2v_engine.teacher import EMATeacher


def set_single_process_env() -> None:
    """Make `python d2v_engine/pretrain.py` a one-rank job when no launcher set the environment.

    A launcher sets all five variables; fill in only what is missing, so that a partial environment
    (say RANK and WORLD_SIZE left behind without MASTER_PORT) never sends DeepSpeed to MPI discovery.
    """
    env = os.environ
    if not env.get("MASTER_PORT"):
        with socket.socket() as sock:  # a free port, so two single-process runs can coexist
            sock.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(sock.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", env.get("RANK", "0")), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        env.setdefault(key, value)


def init_distributed() -> tuple[int, int]:
    """Start the process group (NCCL on GPUs, gloo on CPUs); returns (rank, world_size)."""
    set_single_process_env()
    if not torch.cuda.is_available():
        share_cpu_cores()
        if int(os.environ["RANK"]) == 0:  # the run's first line, before DeepSpeed's own
            print(cpu_threads.CHOSEN.line(), flush=True)
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def share_cpu_cores() -> int:
    """Set this CPU rank's intra-op threads (`cpu_threads.choose_threads`) and return the count.

    torch starts one thread per core in every process, so N ranks on one machine would oversubscribe
    the cores N times over (torchrun sets OMP_NUM_THREADS=1 for this reason; DeepSpeed's launcher only
    with --bind_cores_to_rank): each rank takes its share. The launcher says how many ranks share
    the machine (LOCAL_SIZE for DeepSpeed's, LOCAL_WORLD_SIZE for torchrun's). A rank alone on the
    machine also leaves the cores that other processes keep busy. The choice is kept for the log
    (`cpu_threads.CHOSEN`).
    """
    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    choice = cpu_threads.choose_threads(local, torch.get_num_threads())
    if choice.threads != torch.get_num_threads():
        torch.set_num_threads(choice.threads)
    cpu_threads.CHOSEN = choice
    return torch.get_num_threads()


# ------------------------------------------------------------------------------ the DeepSpeed config
def micro_batch_size(cfg: Config, world_size: int) -> int:
    """Samples per rank per micro-step; the global batch must split evenly."""
    per_step = world_size * cfg.train.grad_accum
    if cfg.train.batch_size % per_step:
        raise UserError(f"train.batch_size={cfg.train.batch_size} does not split over {world_size} "
                        f"rank(s) x {cfg.train.grad_accum} accumulation step(s); use a multiple of {per_step}.")
    return cfg.train.batch_size // per_step


def build_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for `cfg` on `world_size` ranks.

    Args:
        cfg: the run's config.
        world_size: number of ranks.
    Returns:
        A dict for `deepspeed.initialize(config=...)`.
    """
    return {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world_size),
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.clip_grad,
        "zero_optimization": {"stage": cfg.ds.zero_stage},
        "bf16": {"enabled": cfg.ds.precision == "bf16"},
        # Our optimizer is torch's fused AdamW, which DeepSpeed has not certified for ZeRO.
        "zero_allow_untested_optimizer": True,
        # The trainer prints its own metrics line; DeepSpeed's periodic prints would duplicate it.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def teacher_ds_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The teacher's ZeRO-3 config: the student's, with no parameter kept gathered between uses.

    ZeRO-3 keeps parameters below `stage3_param_persistence_threshold` elements (1e5 by default)
    gathered after their first use, which would leave every rank a full teacher for small models.
    The teacher runs once per micro-step, so re-gathering its small tensors costs little.
    """
    zero = {**ds_config["zero_optimization"], "stage3_param_persistence_threshold": 0}
    return {**ds_config, "zero_optimization": zero}


# ------------------------------------------------------------------------------ optimizer and schedule
def decays(name: str, param: Tensor) -> bool:
    """Whether AdamW decays a parameter: not biases, norms, 1-D parameters, tokens, bias tables."""
    no_decay = ("_token", "relative_position_bias_table", "masked_spec_embed")
    return not (param.ndim <= 1 or name.endswith(no_decay))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups, in this order: decayed parameters, then the rest (`decays`)."""
    groups: tuple[list, list] = ([], [])
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[0 if decays(name, p) else 1].append(p)
    return [{"params": groups[0], "weight_decay": weight_decay}, {"params": groups[1], "weight_decay": 0.0}]


class FiniteAdamW(torch.optim.AdamW):
    """torch's AdamW that skips a step whose gradients are not all finite, as DeepSpeed's optimizers do.

    DeepSpeed wraps the client optimizer in one of its own under ZeRO 1-3 and in bf16, and that
    wrapper skips a step with a NaN or infinite gradient norm; under ZeRO-0 in fp32 it steps the
    client optimizer directly, with no such check. Either way `overflow` says the last step was
    skipped, and DeepSpeed then counts it in `engine.skipped_steps` and holds the lr schedule.
    """

    overflow: bool = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        # A sync point per step, as in DeepSpeed's own overflow checks. The gradients were summed
        # over the ranks before this step: every rank decides alike.
        self.overflow = bool(grads) and not bool(torch.nn.utils.get_total_norm(grads).isfinite())
        if self.overflow:
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: Config, groups: list[dict[str, Any]] | None = None
                    ) -> torch.optim.Optimizer:
    """torch's fused AdamW (fused kernels on CPU and GPU; apex is not needed), on `groups` if given
    (else `param_groups`).

    Under ZeRO-0 in fp32 it is `FiniteAdamW`; elsewhere DeepSpeed's wrapper checks the gradients
    before the inner step, and a second check would cost a second sync point per step.
    """
    t = cfg.train
    cls = FiniteAdamW if cfg.ds.zero_stage == 0 and cfg.ds.precision == "fp32" else torch.optim.AdamW
    groups = param_groups(model, t.weight_decay) if groups is None else groups
    return cls(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to `train.lr`, then cosine decay to `train.min_lr_ratio * train.lr`."""
    warmup, total, floor = cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------ engines
def build_engine(model: nn.Module, cfg: Config, world_size: int, optimizer: torch.optim.Optimizer | None = None,
                 scheduler: Any = None):
    """`deepspeed.initialize` on our optimizer and schedule; returns (engine, ds_config).

    `optimizer` and `scheduler` replace pretraining's (`build_optimizer`, `build_scheduler`), as
    fine-tuning's per-layer groups and schedules do.

    Under ZeRO-3 the engine partitions the (fully built, identically seeded) model over the ranks
    here; every rank built the same weights, so no rank's copy is special.
    """
    import deepspeed
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    ds_config = build_ds_config(cfg, world_size)
    if optimizer is None:
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    writer = engine.checkpoint_engine
    if isinstance(writer, TorchCheckpointEngine):
        # The default writer: torch.save on a path, which hides why a write failed (`save_whole`).
        writer.save = lambda state_dict, path: save_whole(state_dict, path, zipfile=writer.zipfile_serialization)
    return engine, ds_config


def save_whole(obj: Any, path: str, zipfile: bool = True) -> None:
    """`torch.save(obj, path)`, raising OSError with the errno when the disk is full or read-only.

    torch.save reports a failed write as a RuntimeError without the cause ("unexpected pos 704 vs
    598"), on a path and through a file object alike: its C++ writer swallows the file's OSError.
    Here the file keeps that OSError, and it is raised instead.
    """
    with open(path, "wb", buffering=0) as raw:
        out = _WholeWrites(raw)
        try:
            torch.save(obj, out, _use_new_zipfile_serialization=zipfile)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


class _WholeWrites:
    """A file object for torch.save whose `write` writes all it is given, or keeps the OSError and raises it."""

    def __init__(self, raw):
        self.raw = raw
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        try:
            while view:   # the OS writes what fits; the write of the rest raises ENOSPC
                view = view[self.raw.write(view):]
        except OSError as err:
            self.error = err
            raise
        return size

    def flush(self) -> None:
        pass


def apply_zero3_teacher(teacher: "EMATeacher", ds_config: dict[str, Any]):
    """Partition the teacher exactly like the student and let its forward gather it (ZeRO-3).

    A second DeepSpeed engine without an optimizer (DeepSpeed's ZeRO-3 inference mode) splits every
    teacher parameter into the same flat, padded per-rank slices as the student's parameter of the
    same name (same shape, same ranks), and installs the ZeRO-3 hooks that all-gather a submodule's
    parameters before its forward and free them after. The teacher then keeps only its partitions
    (`EMATeacher.partition_`), which the EMA updates from the student's partitions.

    Args:
        teacher: the full teacher, built from the unwrapped student.
        ds_config: the student's DeepSpeed config (`build_ds_config`).
    Returns:
        The teacher's engine (keep a reference: it owns the gather hooks' state).
    """
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=teacher.module, config=teacher_ds_config(ds_config))
    teacher.partition_()
    return engine


# ------------------------------------------------------------------------------ collectives
def all_reduce_sum(values: Tensor) -> Tensor:
    """The sum over ranks of a small tensor (a new tensor; `values` itself is left alone)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def cpu_group():
    """A process group whose collectives run on the CPU: the default one under gloo, a new gloo group
    under NCCL (a collective on a CPU tensor then waits for no kernel). Call it on every rank alike;
    None with one rank, where no collective is needed."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def all_reduce_max(values: Tensor, group=None) -> Tensor:
    """The element-wise maximum over ranks of a small tensor (a new tensor), in `group` (`cpu_group`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return values


def all_gather_objects(obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order (one rank: `[obj]`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
