"""DeepSpeed: the process group, the DeepSpeed config (built in one place), and the engine.

`build_ds_config(cfg, world_size)` is the only place batch size, accumulation, clipping, precision
and ZeRO stage reach DeepSpeed; the run directory keeps its output as `ds_config.json`.
"""
from __future__ import annotations

import math
import os
import socket
from typing import Any

import torch
from torch import nn

from d2v_engine.config import Config
from d2v_engine.errors import UserError


def set_single_process_env() -> None:
    """Make `python d2v_engine/pretrain.py` a one-rank job when no launcher set the environment."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as sock:  # a free port, so two single-process runs can coexist
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))


def init_distributed() -> tuple[int, int]:
    """Start the process group (NCCL on GPUs, gloo on CPUs); returns (rank, world_size)."""
    import deepspeed

    set_single_process_env()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, 1-D parameters, tokens and bias tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("_token", "relative_position_bias_table", "masked_spec_embed"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """torch's fused AdamW (fused kernels on CPU and GPU; apex is not needed)."""
    t = cfg.train
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas),
                             eps=t.eps, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to `train.lr`, then cosine decay to `train.min_lr_ratio * train.lr`."""
    warmup, total, floor = cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_engine(model: nn.Module, cfg: Config, world_size: int):
    """`deepspeed.initialize` on our optimizer and schedule; returns (engine, ds_config)."""
    import deepspeed

    ds_config = build_ds_config(cfg, world_size)
    optimizer = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=build_scheduler(optimizer, cfg), config=ds_config)
    return engine, ds_config
