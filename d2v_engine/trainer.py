"""The training loop: forward/backward through DeepSpeed, the EMA update, logging and checkpoints.

    Trainer(cfg)              builds data, student, teacher and the DeepSpeed engine, resumes if asked
    .forward_backward_step    one micro-batch: targets, predictions, loss, backward
    .train_step               one optimizer step: `grad_accum` micro-batches, then the EMA update
    .train                    the loop: steps, metrics lines, checkpoints
"""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from d2v_engine import distributed
from d2v_engine.config import Config, dump_config
from d2v_engine.data import build_loader
from d2v_engine.errors import UserError
from d2v_engine.metrics import MetricsLogger, git_record, plot_run
from d2v_engine.models.data2vec import Data2Vec, masked_std
from d2v_engine.models.registry import build_encoder, get_spec, with_overrides
from d2v_engine.teacher import EMATeacher


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """data2vec pretraining of one model on one data set, on one or more DeepSpeed ranks."""

    # config
    cfg: Config
    # components
    engine: Any
    model: Data2Vec
    teacher: EMATeacher
    data: Any
    logger: MetricsLogger
    # runtime
    rank: int
    world_size: int
    device: torch.device
    run_dir: Path
    # state
    step: int

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank, self.world_size = distributed.init_distributed()
        seed_everything(cfg.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0
        self._grad_norm: Tensor | float = float("nan")

        # data first: a text model's vocabulary comes from the data's tokenizer
        spec = with_overrides(get_spec(cfg.model.name), dropout=cfg.model.dropout,
                              drop_path=cfg.model.drop_path, layerdrop=cfg.model.layerdrop)
        self.data = self._build_data(spec, position=None)
        if spec.modality == "text":
            spec = dataclasses.replace(spec, vocab_size=self.data.vocab_size)

        # student, then the teacher as its copy, then the engine that owns the student
        encoder = build_encoder(spec).to(self.device)
        encoder.grad_checkpointing = cfg.train.activation_checkpointing
        model = Data2Vec(encoder, cfg.loss, backend=cfg.kernels.backend)
        bf16 = cfg.ds.precision == "bf16"
        self.teacher = EMATeacher(encoder, cfg.teacher, cfg.target, backend=cfg.kernels.backend,
                                  compute_dtype=torch.bfloat16 if bf16 else torch.float32)
        self.engine, ds_config = distributed.build_engine(model, cfg, self.world_size)
        self.model = self.engine.module
        self.input_dtype = torch.bfloat16 if bf16 else torch.float32

        # run record
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
            (self.run_dir / "git.txt").write_text(git_record() + "\n")
        self.logger = MetricsLogger(self.run_dir, cfg.train.steps, enabled=self.rank == 0, echo=tqdm.write)
        if cfg.run.resume:
            self.load_checkpoint()

    def _build_data(self, spec, position):
        return build_loader(self.cfg, spec, rank=self.rank, world_size=self.world_size, position=position)

    # ------------------------------------------------------------------------------ the step
    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: (v.to(self.device, self.input_dtype, non_blocking=True) if v.is_floating_point()
                    else v.to(self.device, non_blocking=True)) for k, v in batch.items()}

    def forward_backward_step(self, batch: dict[str, Tensor], measure_grad_norm: bool = False
                              ) -> tuple[Tensor, dict[str, Tensor]]:
        """One micro-batch: teacher targets, student predictions, loss, backward, engine step."""
        loss, stats = self.engine(self._to_device(batch), self.teacher)
        self.engine.backward(loss)
        if measure_grad_norm:
            self._grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters() if p.grad is not None])
        self.engine.step()  # DeepSpeed steps the optimizer only at accumulation boundaries
        return loss.detach(), stats

    def train_step(self) -> tuple[Tensor, dict[str, Tensor], float, float]:
        """One optimizer step over `grad_accum` micro-batches, then the teacher's EMA update.

        Returns:
            (mean loss, last micro-batch's stats, seconds spent waiting for data, EMA decay used).
        """
        losses, data_s = [], 0.0
        accum, next_step = self.cfg.train.grad_accum, self.step + 1
        # Without ZeRO, DeepSpeed computes no gradient norm: measure it ourselves, on logged steps only.
        logged = next_step % self.cfg.train.log_every == 0 or next_step == self.cfg.train.steps
        measure = logged and self.cfg.ds.zero_stage == 0
        for i in range(accum):
            t0 = time.perf_counter()
            batch = next(self.data)
            data_s += time.perf_counter() - t0
            loss, stats = self.forward_backward_step(batch, measure_grad_norm=measure and i == accum - 1)
            losses.append(loss)
        self.step += 1
        decay = self.teacher.update(self.model.encoder, self.step)
        return torch.stack(losses).mean(), stats, data_s, decay

    # ------------------------------------------------------------------------------ the loop
    def train(self) -> None:
        cfg = self.cfg.train
        bar = tqdm(total=cfg.steps, initial=self.step, disable=self.rank != 0 or not cfg.progress,
                   dynamic_ncols=True, desc="pretrain")
        window = _Window()
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            loss, stats, data_s, decay = self.train_step()
            window.add(loss, time.perf_counter() - t0, data_s)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.logger.log(self._metrics(window, stats, decay))
                window = _Window()
                self._check_bad_samples()
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
        bar.close()
        if not self._saved_at(self.step):
            self.save_checkpoint()

    def _metrics(self, window: "_Window", stats: dict[str, Tensor], decay: float) -> dict[str, float]:
        # .item() here only, once per logging interval: each is a device sync point.
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self._grad_norm
        return {
            "step": self.step,
            "loss": (window.loss_sum / window.steps).item(),
            "lr": self.engine.get_lr()[0],
            "ema_decay": decay,
            "target_var": masked_std(stats["target"]).item(),
            "pred_var": masked_std(stats["pred"]).item(),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "samples_per_s": window.steps * self.cfg.train.batch_size / window.seconds,
            "step_ms": 1000 * window.seconds / window.steps,
            "data_ms": 1000 * window.data_seconds / window.steps,
        }

    def _check_bad_samples(self) -> None:
        """Stop with one sentence once undecodable samples pass `data.max_bad_fraction`."""
        read, bad = self.data.samples_read, self.data.bad_samples
        if read and bad / read > self.cfg.data.max_bad_fraction:
            raise UserError(f"{bad} of the {read} samples read from data.path '{self.cfg.data.path}' could "
                            f"not be decoded, more than data.max_bad_fraction={self.cfg.data.max_bad_fraction}; "
                            f"fix or remove the bad files (the log names their shards and keys).")

    # ------------------------------------------------------------------------------ checkpoints
    def _saved_at(self, step: int) -> bool:
        return (self.ckpt_dir / f"step{step:08d}").is_dir()

    def save_checkpoint(self) -> None:
        """DeepSpeed's checkpoint plus the teacher, the step, the data position and all RNG states."""
        client_state = {"step": self.step, "data": self.data.state_dict(),
                        "teacher": self.teacher.state_dict(), "rng": rng_state()}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=f"step{self.step:08d}", client_state=client_state)
        if self.rank == 0:
            tags = sorted(p for p in self.ckpt_dir.glob("step*") if p.is_dir())
            for old in tags[:-self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> None:
        """Continue from the newest checkpoint in `run.dir`; a fresh start when there is none."""
        if not (self.ckpt_dir / "latest").is_file():
            if self.rank == 0:
                tqdm.write(f"run.resume: no checkpoint in {self.ckpt_dir}, starting from step 0")
            return
        path, client = self.engine.load_checkpoint(str(self.ckpt_dir))
        if path is None:
            raise UserError(f"the checkpoint in {self.ckpt_dir} could not be loaded; "
                            f"remove it or start a new run.dir.")
        self.step = client["step"]
        self.teacher.load_state_dict(client["teacher"])
        self.data = self._build_data(self.model.encoder.spec, position=client["data"])
        set_rng_state(client["rng"])
        if self.rank == 0:
            tqdm.write(f"resumed from {path} at step {self.step}")

    def close(self) -> None:
        """Flush logs, draw the plot, and leave the process group in step with the other ranks."""
        self.logger.close()
        if self.rank == 0:
            plot_run(self.run_dir)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


@dataclasses.dataclass
class _Window:
    """Sums over the steps since the last metrics line."""

    loss_sum: Tensor | float = 0.0
    steps: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0

    def add(self, loss: Tensor, seconds: float, data_seconds: float) -> None:
        self.loss_sum = self.loss_sum + loss
        self.steps += 1
        self.seconds += seconds
        self.data_seconds += data_seconds
