"""The training loop: forward/backward through DeepSpeed, the EMA update, logging and checkpoints.

    Trainer(cfg)              builds data, student, teacher and the DeepSpeed engine(s), resumes if asked
    .forward_backward_step    one micro-batch: targets, predictions, loss, backward
    .train_step               one optimizer step: `grad_accum` micro-batches, then the EMA update
    .train                    the loop: steps, metrics lines, the guards (`guards`), checkpoints, and
                              the stop on SIGTERM or SIGINT after a checkpoint (`preemption`)
    .save_checkpoint          DeepSpeed's checkpoint + client state, published atomically
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
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
from d2v_engine.data import BatchStream, build_loader
from d2v_engine.errors import UserError
from d2v_engine.guards import CollapseWatchdog, SkipStreak, nan_unless_finite
from d2v_engine.metrics import MetricsLogger, git_record, plot_run
from d2v_engine.models.data2vec import Data2Vec, masked_std, std_across_samples
from d2v_engine.models.data2vec2 import Data2Vec2
from d2v_engine.models.objective import build_objective
from d2v_engine.models.registry import build_encoder, get_spec, with_model_config, with_overrides
from d2v_engine.preemption import StepEndStops, StopSignals
from d2v_engine.teacher import EMATeacher

CHECKPOINT_META = "d2v.json"
"""Written into a checkpoint's folder before `latest` names it: step, ranks, ZeRO stage, precision."""


def too_many_bad(read: int, bad: int, limit: float) -> bool:
    """Whether `bad` undecodable samples out of `read` show a bad fraction above `limit`.

    The count so far is a sample of the data: with exactly `limit` of it bad, the running fraction
    is above `limit` half of the time, and a plain comparison would stop a healthy run by chance in
    its first log interval. So the run stops only once the count is three binomial standard
    deviations above what `limit` allows. With a 1% limit and a check every 64 samples (simulated):
    data exactly 1% bad stops about 1 run in 18 within 20,000 samples, data 2% bad stops after a
    median of 700 samples, 3% bad within 1,400, and 50 bad of the first 100 stop at once.
    A limit of 0 stops at the first bad sample.

    Args:
        read: samples read so far (all ranks), bad ones included.
        bad: samples among them that could not be decoded.
        limit: `data.max_bad_fraction`.
    Returns:
        True when the run should stop.
    """
    if bad == 0 or read == 0:
        return False
    allowed = limit * read + 3.0 * math.sqrt(limit * (1.0 - limit) * read)
    return bad > allowed


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


class Trainer(StepEndStops):
    """data2vec pretraining of one model on one data set, on one or more DeepSpeed ranks."""

    # config
    cfg: Config
    # components
    engine: Any                  # the student's DeepSpeed engine
    model: Data2Vec | Data2Vec2  # engine.module: the objective of method.version
    teacher: EMATeacher
    teacher_engine: Any | None   # ZeRO-3 only: partitions the teacher, gathers it for its forward
    data: BatchStream
    logger: MetricsLogger
    signals: StopSignals         # SIGTERM / SIGINT while `train` runs: stop after a checkpoint
    # runtime
    rank: int
    world_size: int
    device: torch.device
    input_dtype: torch.dtype
    run_dir: Path
    ckpt_dir: Path
    flags_group: Any             # the CPU process group of the per-step stop flags (`_agree`)
    # state
    step: int                    # optimizer steps completed, skipped ones included
    saved_step: int              # step of the newest published checkpoint, -1 = none
    skips: SkipStreak            # steps skipped in a row (non-finite loss or gradient)
    collapse: CollapseWatchdog   # logged steps in a row with collapsed targets
    window: "_Window"            # the steps since the last metrics line (in checkpoints)
    saved_at: float              # time.monotonic() of the last save (or of the loop's start)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank, self.world_size = distributed.init_distributed()
        seed_everything(cfg.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step, self.saved_step = 0, -1
        self.window, self.saved_at = _Window(), time.monotonic()
        self.signals = StopSignals(self.rank)
        self.flags_group = distributed.cpu_group()
        self._grad_norm: Tensor | float = float("nan")
        self._stop_signum = 0   # the signal the ranks agreed to stop on (`_agree`), 0 = none
        self.skips = SkipStreak(cfg.train.max_skipped_steps)
        self.collapse = CollapseWatchdog(cfg.train.collapse_threshold, cfg.train.collapse_window)

        # data first: a text model's vocabulary comes from the data's tokenizer
        spec = with_overrides(with_model_config(get_spec(cfg.model.name), cfg.model),
                              target_output=cfg.target.block_output)
        self.data = self._build_data(spec, position=None)
        if spec.modality == "text":
            spec = dataclasses.replace(spec, vocab_size=self.data.vocab_size)

        # student, whole and identical on every rank (same seed); weights from run.init_from if set
        # (a checkpoint that run.resume finds later replaces them: a restarted job continues)
        encoder = build_encoder(spec).to(self.device)
        # activation checkpointing: the student's blocks recompute their activations in backward
        encoder.grad_checkpointing = cfg.train.activation_checkpointing
        # the objective of method.version: 1.0 (encoder + head) or 2.0 (visible tokens + decoder)
        model = build_objective(cfg, encoder)
        init = self._load_init_from(model) if cfg.run.init_from else None

        # teacher: a copy of the unwrapped student, made before DeepSpeed partitions it
        bf16 = cfg.ds.precision == "bf16"
        self.input_dtype = torch.bfloat16 if bf16 else torch.float32
        self.teacher = EMATeacher(encoder, cfg.teacher, cfg.target, backend=cfg.kernels.backend,
                                  compute_dtype=self.input_dtype, copy=model.teacher_copy)
        if init is not None:
            self.teacher.load_state_dict(init["teacher"])

        # parallelism: the student's engine, then (ZeRO-3) the teacher partitioned the same way
        self.engine, ds_config = distributed.build_engine(model, cfg, self.world_size)
        self.model = self.engine.module
        self.teacher_engine = None
        if cfg.ds.zero_stage == 3:
            self.teacher_engine = distributed.apply_zero3_teacher(self.teacher, ds_config)

        # run record
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
            (self.run_dir / "git.txt").write_text(git_record() + "\n")
        self.logger = MetricsLogger(self.run_dir, cfg.train.steps, enabled=self.rank == 0, echo=tqdm.write)
        self._report_teacher_memory()
        if cfg.run.resume:
            self.load_checkpoint()

    def _build_data(self, spec, position):
        return build_loader(self.cfg, spec, rank=self.rank, world_size=self.world_size, position=position)

    def _load_init_from(self, model: Data2Vec | Data2Vec2) -> dict[str, Any]:
        """Student weights from a `d2v export` file (before any partitioning); returns the file's contents."""
        from d2v_engine.export import load_export, load_student_

        init = load_export(self.cfg.run.init_from, self.cfg.model.name)
        load_student_(model, init, where=f"run.init_from '{self.cfg.run.init_from}'")
        return init

    def _report_teacher_memory(self) -> None:
        """One line: the teacher weights each rank holds (halves with 2 ranks under ZeRO-3)."""
        held = distributed.all_gather_objects(self.teacher.memory_bytes())
        if self.rank == 0:
            how = (f"ZeRO-3 slices over {self.world_size} rank(s)" if self.teacher_engine is not None
                   else "a full replica on each rank")
            tqdm.write(f"teacher: {max(held)} bytes per rank ({how})")

    # ------------------------------------------------------------------------------ the step
    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: (v.to(self.device, self.input_dtype, non_blocking=True) if v.is_floating_point()
                    else v.to(self.device, non_blocking=True)) for k, v in batch.items()}

    def forward_backward_step(self, batch: dict[str, Tensor], measure_grad_norm: bool = False
                              ) -> tuple[Tensor, dict[str, Tensor]]:
        """One micro-batch: teacher targets, student predictions, loss, backward, engine step."""
        loss, stats = self.engine(self._to_device(batch), self.teacher)
        # A non-finite loss makes every gradient NaN, so that the optimizer skips the step.
        self.engine.backward(nan_unless_finite(loss))
        if measure_grad_norm:
            # After the boundary's backward the gradients are averaged over ranks: the same norm everywhere.
            self._grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters() if p.grad is not None])
        self.engine.step()  # DeepSpeed steps the optimizer only at accumulation boundaries
        return loss.detach(), stats

    def train_step(self) -> tuple[Tensor, dict[str, Tensor], float, float, bool]:
        """One optimizer step over `grad_accum` micro-batches, then the teacher's EMA update.

        A step whose loss or gradient is not finite, in any micro-batch on any rank, is skipped by
        the optimizer (`guards`): the weights, the optimizer state, the lr schedule and the teacher
        stay as they were, while the step counter (and with it the EMA decay schedule) and the data
        move on.

        Returns:
            (mean loss, last micro-batch's stats, seconds spent waiting for data, EMA decay of
            the step, whether the optimizer applied it).
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
        applied = self.engine.was_step_applied()   # the same on every rank (see `guards`)
        if not applied:
            return torch.stack(losses).mean(), stats, data_s, self.teacher.decay_at(self.step), False
        # EMA at the accumulation boundary, from the student the optimizer just updated (its
        # partition under ZeRO-3: each rank updates only its own slice of the teacher).
        decay = self.teacher.update(self.model.encoder, self.step)
        return torch.stack(losses).mean(), stats, data_s, decay, True

    # ------------------------------------------------------------------------------ the loop
    def train(self) -> bool:
        """Train to `train.steps`, unless SIGTERM or SIGINT stops the run early after a checkpoint.

        Returns:
            True when a signal stopped the run (its checkpoint written, `preemption`), False when
            it reached `train.steps`.
        """
        cfg = self.cfg.train
        bar = tqdm(total=cfg.steps, initial=self.step, disable=self.rank != 0 or not cfg.progress,
                   dynamic_ncols=True, desc="pretrain")
        self.saved_at = time.monotonic()
        try:
            return self._loop(bar)
        except BaseException:
            # The workers ignore SIGTERM (`preemption`), and at exit multiprocessing terminates its
            # daemon children with SIGTERM and then joins them: it would wait for them forever.
            self.data.close()
            raise

    def _loop(self, bar: tqdm) -> bool:
        """`train`'s loop, with the stop signals' handlers installed."""
        cfg = self.cfg.train
        with self.signals:
            while self.step < cfg.steps:
                self.signals.during(f"step {self.step + 1}")
                t0 = time.perf_counter()
                loss, stats, data_s, decay, applied = self.train_step()
                self.window.add(loss, time.perf_counter() - t0, data_s, applied)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    metrics, read, bad = self._metrics(self.window, stats, decay)
                    self.logger.log(metrics)
                    self.window = _Window()
                    self._check_bad_samples(read, bad)
                    self._check_collapse(metrics)
                if self.skips.record(applied):
                    raise self._diverged()
                if self._save_then_stop():
                    bar.close()
                    self._report_stop(tqdm.write)
                    return True
            bar.close()
            if self.saved_step != self.step:
                self.save_checkpoint()
        return False

    def _metrics(self, window: "_Window", stats: dict[str, Tensor], decay: float
                 ) -> tuple[dict[str, float], int, int]:
        """The metrics line's values, and the samples read and failed on all ranks.

        One all-reduce per logging interval: loss and spreads are averaged over the ranks, sample
        counts summed. `.tolist()` is the interval's one device sync point.
        """
        # The mean over the interval's applied steps: a skipped step's loss is not finite.
        loss = (window.loss_sum / window.applied if window.applied
                else torch.full((), math.nan, device=self.device))
        local = torch.stack([loss, masked_std(stats["target"]),
                             masked_std(stats["pred"]),
                             std_across_samples(stats["target"], stats["mask"])]).double()
        counts = torch.tensor([self.data.samples_read, self.data.bad_samples], dtype=torch.float64,
                              device=local.device)
        total = distributed.all_reduce_sum(torch.cat([local, counts])).tolist()
        loss, target_var, pred_var, sample_var = (v / self.world_size for v in total[:4])
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self._grad_norm
        metrics = {
            "step": self.step,
            "loss": loss,
            "lr": self.engine.get_lr()[0],
            "ema_decay": decay,
            "target_var": target_var,
            "pred_var": pred_var,
            "target_sample_var": sample_var,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "samples_per_s": window.steps * self.cfg.train.batch_size / window.seconds,
            "step_ms": 1000 * window.seconds / window.steps,
            "data_ms": 1000 * window.data_seconds / window.steps,
            "bad_samples": int(total[5]),   # running count over the run, all ranks
            "skipped_steps": self.engine.skipped_steps,   # running count over the run (in checkpoints)
            "clones": self.model.clones,    # masked copies per sample (samples_per_s counts samples)
        }
        return metrics, int(total[4]), int(total[5])

    def _check_bad_samples(self, read: int, bad: int) -> None:
        """Stop with one sentence once undecodable samples (all ranks) pass `data.max_bad_fraction`."""
        if too_many_bad(read, bad, self.cfg.data.max_bad_fraction):
            raise UserError(f"{bad} of the {read} samples read from data.path '{self.cfg.data.path}' could "
                            f"not be decoded, more than data.max_bad_fraction={self.cfg.data.max_bad_fraction}; "
                            f"fix or remove the bad files (the log names their shards and keys).")

    def _diverged(self) -> UserError:
        """The stop sentence once more than `train.max_skipped_steps` steps in a row were skipped."""
        latest = _read_latest(self.ckpt_dir)
        last = (f"the last good checkpoint is {self.ckpt_dir / latest}" if latest else
                "no checkpoint was written before it")
        return UserError(f"step {self.step}: the loss or a gradient was not finite on {self.skips.in_a_row} "
                         f"steps in a row, more than train.max_skipped_steps={self.skips.limit}, so the run "
                         f"stops; {last}.")

    def worker_died(self, death: str) -> UserError:
        """The stop sentence when a data loader worker died (`data.workers`); stops the other workers.

        Args:
            death: what happened, e.g. "a data loader worker (pid 31242) was killed by signal 9 (SIGKILL)".
        """
        self.data.close()   # joins the surviving workers, which would otherwise outlive os._exit
        latest = _read_latest(self.ckpt_dir)
        resume = (f"resume with run.resume=true from {self.ckpt_dir / latest}" if latest else
                  "no checkpoint was written before it, so start the run again")
        return UserError(f"step {self.step + 1}: {death}, so the run stops; {resume}.")

    def _check_collapse(self, metrics: dict[str, float]) -> None:
        """One warning line (rank 0) when the targets have collapsed; with train.stop_on_collapse, the stop."""
        message = self.collapse.check(metrics)
        if message is None:
            return
        if self.cfg.train.stop_on_collapse:
            raise UserError(f"{message}, and train.stop_on_collapse=true stops the run; the teacher's "
                            f"targets no longer tell the inputs apart.")
        if self.rank == 0:
            tqdm.write(f"warning: {message}; the teacher's targets no longer tell the inputs apart "
                       f"(train.stop_on_collapse=true would stop the run).")

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """DeepSpeed's checkpoint plus the teacher, the step, the data position and all RNG states.

        Complete or absent: every rank writes under a new tag, and only once all have finished
        does rank 0 write the tag's `d2v.json` and atomically point `latest` at it. A run killed
        mid-save leaves `latest` on the previous checkpoint. A write that fails (a full or
        read-only disk: every OSError) stops the run with one sentence; rank 0 removes the partial
        tag, and `latest` and the checkpoint it names are left as they were. (With several ranks,
        a rank that fails exits and the launcher stops the others; the partial tag then goes at
        the next save.)
        """
        tag = _tag(self.step)
        self.signals.during(f"the save of step {self.step}")
        client_state = {
            "step": self.step,
            # every rank's reader position, in rank order: ranks skip different bad samples
            "data": distributed.all_gather_objects(self.data.state_dict()),
            "teacher": self.teacher.state_dict(),          # this rank's slices under ZeRO-3
            "teacher_shapes": self.teacher.shapes,         # None unless sliced
            "rng": distributed.all_gather_objects(rng_state()),   # every rank's, in rank order
            "guards": {"skipped_in_a_row": self.skips.in_a_row, "collapse": self.collapse.state_dict()},
            # the steps since the last metrics line: a resumed run logs the same next line
            "window": self.window.state_dict(),
        }
        try:
            self._write_checkpoint(tag, client_state)
        except OSError as err:
            if self.rank == 0:
                shutil.rmtree(self.ckpt_dir / tag, ignore_errors=True)
            latest = _read_latest(self.ckpt_dir)
            kept = f"`latest` still names {latest}, intact" if latest else "no earlier checkpoint exists"
            raise UserError(f"could not write checkpoint {tag} in {self.ckpt_dir} ({err.strerror or err}); "
                            f"{kept}: free space there or choose another run.dir, then resume with "
                            f"run.resume=true.") from None
        if self.rank == 0:
            _prune_checkpoints(self.ckpt_dir, tag, self.cfg.train.keep_checkpoints)
        self.saved_step, self.saved_at = self.step, time.monotonic()

    def _write_checkpoint(self, tag: str, client_state: dict[str, Any]) -> None:
        """Write and publish `tag`; raises OSError when a write fails (`distributed.save_whole`)."""
        if self.rank == 0 and (self.ckpt_dir / tag).exists():
            # An unpublished leftover of a killed run. No rank writes before the barrier that
            # opens DeepSpeed's save, which rank 0 joins only after this.
            shutil.rmtree(self.ckpt_dir / tag)
        # save_checkpoint ends with a barrier: past it, every rank's files are written.
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        if self.rank == 0:
            meta = {"step": self.step, "world_size": self.world_size, "zero_stage": self.cfg.ds.zero_stage,
                    "precision": self.cfg.ds.precision, "model": self.cfg.model.name}
            (self.ckpt_dir / tag / CHECKPOINT_META).write_text(json.dumps(meta) + "\n")
            _write_atomic(self.ckpt_dir / "latest", tag)

    def load_checkpoint(self) -> None:
        """Continue from the newest checkpoint in `run.dir`; a fresh start when there is none.

        DeepSpeed's loader unpickles with weights_only=False: resuming trusts the run directory
        (the readers for eval and export do not; see `safe_load`).
        """
        latest = self.ckpt_dir / "latest"
        if not latest.is_file():
            if self.rank == 0:
                tqdm.write(f"run.resume: no checkpoint in {self.ckpt_dir}, starting from step 0")
            return
        tag = latest.read_text().strip()
        meta = self._checkpoint_meta(tag)
        path, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if path is None:
            raise UserError(f"the checkpoint {self.ckpt_dir / tag} could not be loaded; "
                            f"remove it or start a new run.dir.")
        self.step = self.saved_step = client["step"]
        self.teacher.load_state_dict(client["teacher"])
        if "guards" in client:   # checkpoints before the guards lack it
            self.skips.in_a_row = client["guards"]["skipped_in_a_row"]
            self.collapse.load_state_dict(client["guards"]["collapse"])
        if "window" in client:   # checkpoints before preemption lack it (and were saved at log steps)
            self.window = _Window.from_state(client["window"], self.device)
        position = client["data"]
        if isinstance(position, list):  # checkpoints before per-rank positions hold one dict
            position = position[self.rank]
        self.data = self._build_data(self.model.encoder.spec, position=position)
        set_rng_state(client["rng"][self.rank])
        if self.rank == 0:
            tqdm.write(f"resumed from {path} at step {self.step} (ZeRO-{meta['zero_stage']}, "
                       f"{meta['world_size']} rank(s))")

    def _checkpoint_meta(self, tag: str) -> dict[str, Any]:
        """The tag's `d2v.json`, checked against this run's ranks, ZeRO stage and precision."""
        path = self.ckpt_dir / tag / CHECKPOINT_META
        if not path.is_file():
            raise UserError(f"the checkpoint {self.ckpt_dir / tag} named by 'latest' is incomplete (no "
                            f"{CHECKPOINT_META}); point 'latest' at an earlier step or start a new run.dir.")
        meta = json.loads(path.read_text())
        saved = (meta["world_size"], meta["zero_stage"], meta["precision"])
        here = (self.world_size, self.cfg.ds.zero_stage, self.cfg.ds.precision)
        if saved != here:
            raise UserError(
                f"checkpoint {tag} was written by {saved[0]} rank(s) with ZeRO-{saved[1]} in {saved[2]}, "
                f"but this run has {here[0]} rank(s) with ZeRO-{here[1]} in {here[2]}; resume with the "
                f"same setting, or export the weights (`d2v export --run {self.run_dir} --out "
                f"weights.safetensors`) and start a new run.dir from them with "
                f"run.init_from=weights.safetensors.")
        return meta

    def close(self, plot: bool = True) -> None:
        """Stop the data workers, flush logs, leave in step with the other ranks, draw the plot.

        The barrier keeps every rank here until rank 0 has published the last checkpoint: the
        DeepSpeed launcher stops the other ranks as soon as one exits with a status other than 0
        (a stopped run's 3). A stopped run skips the plot, to leave within the launcher's grace time.
        """
        self.data.close()  # joins the DataLoader workers, which would otherwise outlive os._exit
        self.logger.close()
        distributed.barrier()
        if self.rank == 0 and plot:
            try:
                plot_run(self.run_dir)
            except Exception as err:  # the plot is a convenience: never fail a finished run over it
                tqdm.write(f"warning: could not draw {self.run_dir / 'plots'}: {err}")


def _tag(step: int) -> str:
    return f"step{step:08d}"


def _read_latest(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, or None when there is none (or it cannot be read)."""
    try:
        return (ckpt_dir / "latest").read_text().strip() or None
    except OSError:
        return None


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old content or the new, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):   # a read-only disk refuses the clean-up as well
            tmp.unlink(missing_ok=True)
        raise


def _prune_checkpoints(ckpt_dir: Path, published: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints up to `published`, which is always one of them.

    Complete means with its `d2v.json`; the others (older or newer) are leftovers of saves that
    were killed or failed, and go as well.
    """
    tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())
    complete = [t for t in tags if t <= published and (ckpt_dir / t / CHECKPOINT_META).is_file()]
    kept = set(complete[-keep:]) | {published}
    for tag in tags:
        if tag not in kept:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


@dataclasses.dataclass
class _Window:
    """Sums over the steps since the last metrics line."""

    loss_sum: Tensor | float = 0.0   # over the applied steps
    applied: int = 0
    steps: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        state = dataclasses.asdict(self)
        if torch.is_tensor(self.loss_sum):
            state["loss_sum"] = self.loss_sum.detach().cpu()
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "_Window":
        """The window of `state_dict`, its loss sum (bit for bit the same) back on `device`."""
        state = dict(state)
        if torch.is_tensor(state["loss_sum"]):
            state["loss_sum"] = state["loss_sum"].to(device)
        return cls(**state)

    def add(self, loss: Tensor, seconds: float, data_seconds: float, applied: bool = True) -> None:
        if applied:
            self.loss_sum = self.loss_sum + loss
            self.applied += 1
        self.steps += 1
        self.seconds += seconds
        self.data_seconds += data_seconds
