"""`d2v finetune`: a run's pretrained encoder (or the same shape at random init) fine-tuned on a task.

    deepspeed [--num_gpus N] d2v_engine/finetune.py --run DIR --task TASK [k=v ...]   # several ranks
    d2v finetune --run DIR --task TASK [--labels N] [--compare random-init] [k=v ...]  # one process
    d2v finetune --hf-dir HF --out DIR --task TASK [...]     # a Hugging Face Data2Vec folder's encoder

The config is the run's `config.yaml`, then the recipe (`configs/finetune_<modality>.yaml`, for CTC
`finetune_audio_ctc.yaml`, or `--config`), then the overrides; it shares the pretraining sections (`train`, `ds`, `model`
dropouts) and adds `finetune`. With `--hf-dir` the first layer comes from the folder instead
(`hf.start`: the registry model of its shape, its preprocessing) and `DIR` below is `--out`. The
loop is pretraining's pieces: DeepSpeed through `distributed` (ZeRO 0-2, bf16), the guards'
non-finite skip, `MetricsLogger`, and the trainer's atomic checkpoints.

A fine-tuning run lives in `DIR/finetune/TASK/` (and `.../random_init/` for the comparison):
config.yaml, metrics.jsonl, test.jsonl (the test metric every `finetune.eval_every` steps),
tensorboard/, checkpoints/ (resumable with run.resume=true) and `model.safetensors` (encoder and
head, `FINETUNE_FORMAT`). `DIR/finetune/finetune.json` gathers the figures of every task run.
SIGTERM or SIGINT stops a run after the step in progress with its checkpoint (exit status 3, as
pretraining's `preemption`); the same command with run.resume=true continues it. A fresh run in a
used folder first removes the earlier run's records and checkpoints (`OWN_FILES`).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from d2v_engine import distributed
from d2v_engine.config import Config, dump_config, load_config
from d2v_engine.errors import UserError
from d2v_engine.preemption import PREEMPTED, StepEndStops, StopSignals

if TYPE_CHECKING:
    from d2v_engine.models.spec import ModelSpec

FINETUNE_FORMAT = "d2v-finetune-1"
"""`format` in the metadata of a fine-tuned `model.safetensors`."""
FIELDS = ("step", "loss", "lr", "grad_norm", "samples_per_s", "step_ms", "skipped_steps")
"""The fields of every fine-tuning `metrics.jsonl` record."""
RECIPES = Path(__file__).resolve().parent.parent / "configs"
OWN_FILES = ("metrics.jsonl", "test.jsonl", "tensorboard", "checkpoints", "model.safetensors", "curve.png")
"""What one fine-tuning run writes in its folder, besides the config files a new run overwrites."""


@dataclass
class FinetuneOptions:
    """What `run_finetune` fine-tunes."""

    task: str
    """A task of `finetune_data.FT_TASKS`, or `custom` with train/test."""
    config: str | None = None
    """The recipe; None = `configs/finetune_<modality>.yaml`."""
    overrides: list[str] = field(default_factory=list)
    """`section.key=value` items, after the recipe."""
    random_init: bool = False
    """Fine-tune the run's shape from its initial weights (same seed) instead of the trained ones."""
    compare: bool = False
    """Also fine-tune the random-init twin, in the same command (`--compare random-init`)."""
    data_root: str | None = None
    """Folder holding the prepared data sets (as `d2v eval --data`)."""
    train: str | None = None
    """`custom`: labelled (or transcribed) training shards."""
    test: str | None = None
    """`custom`: test shards."""
    ctc: bool = False
    """`custom`: transcripts (`.txt`) and a CTC head rather than `.cls` classes."""
    weights: str = "student"
    """Which trained weights start the encoder: `student` or `teacher`."""
    hf_dir: str | None = None
    """Start from this Hugging Face Data2Vec folder rather than a run (`hf.start`)."""
    out: str | None = None
    """With `hf_dir`: the folder that plays the run directory's part (`OUT/finetune/...`)."""


@dataclass
class Start:
    """What a fine-tuning starts from: a run's checkpoint (`run_start`) or a Hugging Face folder (`hf.start`)."""

    base: Path | dict
    """The first config layer: the run's `config.yaml`, or the mapping `hf.start.hf_layer` derives."""
    cfg: Config
    """That layer alone, resolved: the modality, data root and model spec come from it."""
    spec: ModelSpec
    """The encoder's shape."""
    student: dict[str, torch.Tensor]
    """The encoder's weights."""
    teacher: dict[str, torch.Tensor] | None
    """The run's EMA weights over the student's (`--weights teacher`); None for a Hugging Face model."""
    out: Path
    """Where `finetune/` is written: the run directory, or `--out`."""
    what: str
    """How the messages name the source: `the run`, `the Hugging Face model in 'HF'`."""
    record: dict[str, Any] = field(default_factory=dict)
    """Fields of the source in `finetune.json` (the checkpoint tag, or the folder and model name)."""


def run_start(run_dir: str | Path) -> Start:
    """A run's newest checkpoint as the start of a fine-tuning."""
    from d2v_engine.checkpoint import load_run_config, load_run_weights, run_spec

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    weights = load_run_weights(run_dir)
    return Start(base=run_dir / "config.yaml", cfg=cfg, spec=run_spec(cfg, weights.student), student=weights.student,
                 teacher=weights.teacher, out=run_dir, what="the run", record={"checkpoint": weights.tag})


def load_start(run_dir: str | Path | None, opts: FinetuneOptions, echo=tqdm.write) -> Start:
    """The start `--run` or `--hf-dir` names (exactly one of them).

    Raises:
        UserError: both or neither, `--out` without `--hf-dir` or the reverse, teacher weights of
            a Hugging Face model, or what loading the source refuses.
    """
    if run_dir is not None and opts.hf_dir is not None:
        raise UserError("--run and --hf-dir both name the encoder to fine-tune; pass one of them.")
    if opts.hf_dir is None:
        if run_dir is None:
            raise UserError("pass --run DIR (a pretraining run) or --hf-dir DIR (a Hugging Face Data2Vec folder).")
        if opts.out is not None:
            raise UserError("--out places the outputs of --hf-dir; a run's fine-tuning goes to RUN/finetune "
                            "(run.dir=... moves one task's folder).")
        return run_start(run_dir)
    if opts.out is None:
        raise UserError("--hf-dir needs --out DIR, the folder for the outputs (DIR/finetune/TASK).")
    if opts.weights == "teacher":
        raise UserError("--weights teacher picks a run's EMA weights; a Hugging Face folder holds one encoder.")
    from d2v_engine.hf.start import hf_start

    return hf_start(opts.hf_dir, opts.out, opts.overrides, echo)


def finetune_spec(start: Start, cfg: Config):
    """The start's model shape with the fine-tuning config's dropouts (the recipe's drop path,
    dropout, layerdrop and the overrides'), which the start's own config does not hold."""
    from d2v_engine.models.registry import with_model_config

    return with_model_config(start.spec, cfg.model)


def start_encoder(cfg: Config, spec, state: dict | None) -> torch.nn.Module:
    """The encoder a fine-tuning starts with: `state` loaded, or (None) the initial weights of `cfg.seed`.

    Seeded right before the build: random init is a run's own initial weights.
    """
    from d2v_engine.checkpoint import _load_into
    from d2v_engine.models.registry import build_encoder

    torch.manual_seed(cfg.seed)
    encoder = build_encoder(spec)
    if state is not None:
        _load_into(encoder, state, cfg.model.name, "the start's weights")
    return encoder


def line(m: dict[str, float], total: int) -> str:
    width = len(str(total))
    return (f"step {int(m['step']):>{width}}/{total} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
            f"gnorm {m['grad_norm']:.3f} | {m['samples_per_s']:.1f} samples/s | {m['step_ms']:.0f} ms/step"
            + (f" | {m['skipped_steps']} skipped steps" if m.get("skipped_steps") else ""))


# ------------------------------------------------------------------------------ schedule and groups
def lr_factor(step: int, cfg: Config) -> float:
    """The schedule's multiple of `train.lr` at optimizer step `step` (0-based)."""
    t, ft = cfg.train, cfg.finetune
    total = t.steps
    if ft.schedule == "tri_stage":
        warm, hold = (int(f * total) for f in ft.tri_stage[:2])
        if step < warm:
            return 0.01 + (1 - 0.01) * step / max(1, warm)
        if step < warm + hold:
            return 1.0
        decay = max(1, total - warm - hold)
        return math.exp(math.log(ft.final_lr_scale) * min(1.0, (step - warm - hold) / decay))
    if step < t.warmup_steps:
        return (step + 1) / (t.warmup_steps + 1)
    progress = min(1.0, (step - t.warmup_steps) / max(1, total - t.warmup_steps))
    if ft.schedule == "poly":
        return 1.0 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, cfg: Config) -> list[dict[str, Any]]:
    """AdamW groups by (weight decay or not, depth): each has `lr_scale` (layer-wise decay) and
    `encoder` (frozen during `finetune.freeze_steps`)."""
    from d2v_engine.distributed import decays
    from d2v_engine.heads import layer_id, lr_scale

    depth = model.encoder.num_layers
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (decays(name, p), layer_id(name, depth), name.startswith("encoder."))
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": cfg.train.weight_decay if key[0] else 0.0,
                           "lr_scale": lr_scale(name, depth, cfg.finetune.layer_decay), "encoder": key[2]}
        groups[key]["params"].append(p)
    # the head's groups last: `get_lr()[-1]`, the lr the metrics line shows, is the head's
    return [groups[k] for k in sorted(groups, key=lambda k: (not k[2], k))]


def build_scheduler(optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """One schedule per group: `lr_factor` x its `lr_scale`, and 0 for the encoder while it is frozen."""
    freeze = cfg.finetune.freeze_steps

    def schedule(group):
        scale, encoder = group["lr_scale"], group["encoder"]
        return lambda step: 0.0 if encoder and step < freeze else scale * lr_factor(step, cfg)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule(g) for g in optimizer.param_groups])


# ------------------------------------------------------------------------------ the loop
class Finetuner(StepEndStops):
    """One fine-tuning run: model, engine, data, steps, tests, checkpoints, the final weights."""

    def __init__(self, cfg: Config, spec, state: dict | None, task, train, test, classes: list[int] | None,
                 vocab=None, rank: int = 0, world_size: int = 1, echo=tqdm.write):
        """`classes`: the original class ids in head order (None for CTC, whose outputs are `vocab`)."""
        from d2v_engine.guards import SkipStreak
        from d2v_engine.heads import FinetuneModel
        from d2v_engine.metrics import MetricsLogger, git_record
        from d2v_engine.trainer import seed_everything

        if cfg.ds.zero_stage > 2:
            raise UserError("fine-tuning shards with ZeRO 0-2 (the model is small next to its "
                            "optimizer state); set ds.zero_stage to 0, 1 or 2.")
        self.cfg, self.task, self.train_set, self.test_set, self.vocab = cfg, task, train, test, vocab
        self.outputs = len(vocab) if vocab is not None else len(classes)
        self.rank, self.world_size, self.echo = rank, world_size, echo
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.dtype = torch.bfloat16 if cfg.ds.precision == "bf16" else torch.float32
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        encoder = start_encoder(cfg, spec, state)   # first, right after the seed
        seed_everything(cfg.seed + 1)
        model = FinetuneModel(encoder, task.kind, self.outputs, cfg.finetune, cfg.seed).to(self.device)
        optimizer = distributed.build_optimizer(model, cfg, param_groups(model, cfg))
        self.engine, ds_config = distributed.build_engine(model, cfg, world_size, optimizer,
                                                          build_scheduler(optimizer, cfg))
        self.model = self.engine.module
        self.step, self.saved_step = 0, -1
        self.skips = SkipStreak(cfg.train.max_skipped_steps)
        self.curve: list[dict[str, float]] = []
        self.classes = classes
        self.signals = StopSignals(rank, program="finetune")
        self.flags_group = distributed.cpu_group()
        resuming = cfg.run.resume and (self.ckpt_dir / "latest").is_file()
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not resuming:
                self._start_over()
            dump_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
            (self.run_dir / "git.txt").write_text(git_record() + "\n")
        self.logger = MetricsLogger(self.run_dir, cfg.train.steps, enabled=rank == 0, echo=echo,
                                    fields=FIELDS, formatter=line)
        if resuming:
            self.load_checkpoint()

    def _start_over(self) -> None:
        """A fresh run in a folder an earlier fine-tuning used: its records, events and checkpoints go
        (a later `run.resume=true` would otherwise continue the old run, and `test.jsonl` mix both).
        The random-init twin's folder below it is its own run's."""
        import shutil

        old = [p for p in (self.run_dir / n for n in OWN_FILES) if p.exists()]
        for path in old:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if old:
            self.echo(f"finetune: a fresh run in {self.run_dir}: removed the earlier run's "
                      + ", ".join(p.name for p in old) + " (run.resume=true continues a run instead)")

    # -------------------------------------------------------------------------- a step
    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in batch.items()}

    def _generator(self, micro: int) -> torch.Generator:
        """The augmentation draws of one rank's micro-batch: a function of (seed, step, rank, micro)."""
        key = np.random.SeedSequence([self.cfg.seed, self.step, self.rank, micro, 0xA06]).generate_state(1)
        return torch.Generator().manual_seed(int(key[0]))

    def _prepare(self, batch: dict, micro: int) -> dict:
        """Image augmentation and the soft targets of classification (label smoothing, mixup/cutmix)."""
        if self.task.kind != "classify":
            return batch
        from d2v_engine.heads import mix_images, random_resized_crop

        ft = self.cfg.finetune
        targets = torch.nn.functional.one_hot(batch["labels"], self.outputs).float()
        targets = targets * (1 - ft.label_smoothing) + ft.label_smoothing / self.outputs
        if "images" in batch:
            gen = self._generator(micro)
            images = random_resized_crop(batch["images"].float(), gen, ft.crop_scale, ft.flip)
            batch["images"], targets = mix_images(images, targets, gen, ft.mixup, ft.cutmix)
        batch["targets"] = targets
        return batch

    def loss(self, out, frames, batch: dict) -> torch.Tensor:
        """Cross-entropy on the soft targets, or CTC."""
        if self.task.kind == "ctc":
            from d2v_engine.ctc import ctc_loss

            return ctc_loss(out, frames, batch["targets"], batch["target_lengths"])
        logp = out.float().log_softmax(-1)
        return -(batch["targets"].float() * logp).sum(-1).mean()

    def train_step(self) -> tuple[torch.Tensor, bool]:
        """One optimizer step over `train.grad_accum` micro-batches; returns (mean loss, applied)."""
        from d2v_engine.finetune_data import batch_ids
        from d2v_engine.guards import nan_unless_finite

        t = self.cfg.train
        self.model.step = self.step
        frozen = self.step < self.cfg.finetune.freeze_steps
        losses = []
        for micro in range(t.grad_accum):
            ids = batch_ids(self.step, micro, len(self.train_set), t.batch_size, self.rank, self.world_size,
                            t.grad_accum, self.cfg.seed)
            batch = self._to_device(self._prepare(self.train_set.batch(ids), micro))
            out, frames = self.engine(batch, frozen=frozen)
            loss = self.loss(out, frames, batch)
            self.engine.backward(nan_unless_finite(loss))
            self.engine.step()
            losses.append(loss.detach())
        self.step += 1
        return torch.stack(losses).mean(), self.engine.was_step_applied()

    def train(self) -> bool:
        """Fine-tune to `train.steps`, unless SIGTERM or SIGINT stops the run early after a checkpoint
        (as pretraining's `Trainer.train`). Returns whether a signal stopped it."""
        t = self.cfg.train
        bar = tqdm(total=t.steps, initial=self.step, disable=self.rank != 0 or not t.progress,
                   dynamic_ncols=True, desc=f"finetune {self.cfg.finetune.task}")
        self.started, self.saved_at = time.perf_counter(), time.monotonic()
        with self.signals:
            stopped = self._loop(bar)
        bar.close()
        if stopped:
            self._report_stop(self.echo)
            return True
        if self.saved_step != self.step:
            self.save_checkpoint()
        self.save_weights()
        return False

    def _loop(self, bar: tqdm) -> bool:
        t, ft = self.cfg.train, self.cfg.finetune
        loss_sum, applied, steps, seconds = 0.0, 0, 0, 0.0
        while self.step < t.steps:
            self.signals.during(f"step {self.step + 1}")
            t0 = time.perf_counter()
            loss, ok = self.train_step()
            seconds += time.perf_counter() - t0
            steps += 1
            if ok:
                loss_sum, applied = loss_sum + loss, applied + 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.steps:
                mean = (loss_sum / applied) if applied else torch.tensor(math.nan)
                total = distributed.all_reduce_sum(torch.stack([torch.as_tensor(mean).double().cpu()]))
                norm = self.engine.get_global_grad_norm()
                self.logger.log({"step": self.step, "loss": float(total[0]) / self.world_size,
                                 "lr": self.engine.get_lr()[-1],
                                 "grad_norm": float(norm) if norm is not None else math.nan,
                                 "samples_per_s": steps * t.batch_size / seconds, "step_ms": 1000 * seconds / steps,
                                 "skipped_steps": self.engine.skipped_steps})
                loss_sum, applied, steps, seconds = 0.0, 0, 0, 0.0
            if self.skips.record(ok):
                raise UserError(f"step {self.step}: the loss or a gradient was not finite on "
                                f"{self.skips.in_a_row} steps in a row, more than train.max_skipped_steps="
                                f"{self.skips.limit}; lower train.lr or use ds.precision=fp32.")
            if (ft.eval_every and self.step % ft.eval_every == 0) or self.step == t.steps:
                self.signals.during(f"the test at step {self.step}")
                self.record_test()
            if self._save_then_stop():
                return True
        return False

    # -------------------------------------------------------------------------- the test set
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The test metric on all of the test set (each rank scores every world_size-th sample)."""
        from d2v_engine.ctc import error_rates, greedy_decode

        module, test = self.model, self.test_set
        module.eval()
        ids = np.arange(self.rank, len(test), self.world_size)
        if not isinstance(test.items, torch.Tensor):   # similar lengths together: less padding
            ids = ids[np.argsort([len(test.items[i]) for i in ids], kind="stable")]
        sums = torch.zeros(4, dtype=torch.float64)
        for start in range(0, len(ids), self.cfg.finetune.eval_batch_size):
            chunk = ids[start:start + self.cfg.finetune.eval_batch_size]
            batch = self._to_device(test.batch(chunk))
            out, frames = module(batch)
            if self.task.kind == "ctc":
                hyps = [self.vocab.decode(h) for h in greedy_decode(out.float(), frames)]
                rates = error_rates(hyps, [test.texts[i] for i in chunk])
                sums += torch.tensor([rates["wer"] * rates["words"], rates["words"],
                                      rates["cer"] * rates["chars"], rates["chars"]], dtype=torch.float64)
            else:
                correct = (out.argmax(-1).cpu() == batch["labels"].cpu()).sum()
                sums += torch.tensor([float(correct), len(chunk), 0, 0], dtype=torch.float64)
        module.train()
        sums = distributed.all_reduce_sum(sums).tolist()
        if self.task.kind == "ctc":
            return {"wer": sums[0] / max(sums[1], 1), "cer": sums[2] / max(sums[3], 1)}
        return {"accuracy": sums[0] / max(sums[1], 1)}

    def record_test(self) -> dict[str, float]:
        scores = self.evaluate()
        record = {"step": self.step, "seconds": round(time.perf_counter() - self.started, 1), **scores}
        self.curve.append(record)
        if self.rank == 0:
            with open(self.run_dir / "test.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.logger.scalars(record, "test")
            self.echo(f"test at step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        return scores

    # -------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """DeepSpeed's checkpoint plus the step and RNG states, published as pretraining does."""
        from d2v_engine.trainer import _prune_checkpoints, _tag, _write_atomic, rng_state

        tag = _tag(self.step)
        self.signals.during(f"the save of step {self.step}")
        state = {"step": self.step, "rng": distributed.all_gather_objects(rng_state()),
                 "curve": self.curve, "skipped_in_a_row": self.skips.in_a_row}
        try:
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=state, save_latest=False)
            if self.rank == 0:
                meta = {"step": self.step, "world_size": self.world_size, "zero_stage": self.cfg.ds.zero_stage,
                        "precision": self.cfg.ds.precision, "model": self.cfg.model.name, "task": self.cfg.finetune.task}
                (self.ckpt_dir / tag / "d2v.json").write_text(json.dumps(meta) + "\n")
                _write_atomic(self.ckpt_dir / "latest", tag)
        except OSError as err:
            raise UserError(f"could not write checkpoint {tag} in {self.ckpt_dir} ({err.strerror or err}); "
                            f"free space there and resume with run.resume=true.") from None
        if self.rank == 0:
            _prune_checkpoints(self.ckpt_dir, tag, self.cfg.train.keep_checkpoints)
        self.saved_step, self.saved_at = self.step, time.monotonic()

    def load_checkpoint(self) -> None:
        from d2v_engine.trainer import set_rng_state

        latest = self.ckpt_dir / "latest"
        if not latest.is_file():
            return
        tag = latest.read_text().strip()
        meta = json.loads((self.ckpt_dir / tag / "d2v.json").read_text())
        if (meta["world_size"], meta["zero_stage"]) != (self.world_size, self.cfg.ds.zero_stage):
            raise UserError(f"fine-tuning checkpoint {tag} was written by {meta['world_size']} rank(s) with "
                            f"ZeRO-{meta['zero_stage']}; resume with the same setting.")
        path, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if path is None:
            raise UserError(f"the checkpoint {self.ckpt_dir / tag} could not be loaded; remove it.")
        self.step = self.saved_step = client["step"]
        self.curve = client["curve"]
        self.skips.in_a_row = client["skipped_in_a_row"]
        set_rng_state(client["rng"][self.rank])
        if self.rank == 0:
            # The records of steps after the checkpoint are of the run that stopped: they are redone.
            (self.run_dir / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.curve))
            metrics = self.run_dir / "metrics.jsonl"
            if metrics.is_file():
                kept = [x for x in metrics.read_text().splitlines(keepends=True)
                        if x.strip() and json.loads(x)["step"] <= self.step]
                metrics.write_text("".join(kept))   # the logger appends (O_APPEND) after what is kept
            self.echo(f"resumed fine-tuning from {path} at step {self.step}")

    def save_weights(self) -> None:
        """`model.safetensors` (`save_finetuned`), written by rank 0."""
        if self.rank == 0:
            save_finetuned(self.run_dir / "model.safetensors", self.model, self.cfg, self.task.kind, self.outputs,
                           self.classes, self.vocab, self.step)

    def close(self) -> None:
        self.logger.close()
        distributed.barrier()


def save_finetuned(path: str | Path, model: torch.nn.Module, cfg: Config, kind: str, outputs: int,
                   classes: list[int] | None, vocab, step: int) -> None:
    """A fine-tuned model's `model.safetensors`: the encoder (`encoder.*`) and head (`head.*`) in fp32.

    The metadata (`FINETUNE_FORMAT`) is what `d2v hf-export --finetuned` reads: model, task, kind,
    outputs, head, classes (JSON), step, config (JSON of `Config.to_dict()`) and, for CTC, vocab (JSON).

    Args:
        path: the file to write.
        model: the `heads.FinetuneModel`.
        cfg: the fine-tuning config.
        kind: `classify` or `ctc`; outputs: classes, or the vocabulary's size.
        classes: the original class ids in the order of the outputs, or None (CTC).
        vocab: the `ctc.CharVocab` of a CTC head, or None.
        step: the optimizer steps taken.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FINETUNE_FORMAT, "model": cfg.model.name, "task": cfg.finetune.task, "kind": kind,
            "outputs": str(outputs), "head": cfg.finetune.head, "classes": json.dumps(classes),
            "step": str(step), "config": json.dumps(cfg.to_dict())}
    if vocab is not None:
        meta["vocab"] = json.dumps(vocab.to_dict())
    save_file(state, str(path), metadata=meta)


# ------------------------------------------------------------------------------ the command
def recipe_path(modality: str, kind: str, opts: FinetuneOptions) -> Path:
    """`--config`, else `configs/finetune_<modality>_ctc.yaml` for CTC (where it exists), else
    `configs/finetune_<modality>.yaml`."""
    if opts.config:
        return Path(opts.config)
    ctc = RECIPES / f"finetune_{modality}_ctc.yaml"
    return ctc if kind == "ctc" and ctc.is_file() else RECIPES / f"finetune_{modality}.yaml"


def finetune_config(base: Path | dict, modality: str, opts: FinetuneOptions, out: Path,
                    kind: str = "classify") -> Config:
    """The config of one fine-tuning run: `base` (the start's layer), the recipe of the modality and
    the task's `kind`, the overrides."""
    recipe = recipe_path(modality, kind, opts)
    if not recipe.is_file():
        raise UserError(f"no fine-tuning recipe at '{recipe}'; pass --config FT.yaml.")
    cfg = load_config([base, recipe],
                      [f"finetune.task={opts.task}", f"run.dir={out}", *opts.overrides])
    if Path(cfg.run.dir) != out and out.name == "random_init":   # a run.dir override: the twin goes below it
        cfg.run.dir = str(Path(cfg.run.dir) / "random_init")
    return cfg


def run_finetune(run_dir: str | Path | None, opts: FinetuneOptions, echo=tqdm.write) -> dict[str, Any] | None:
    """Fine-tune (and with `compare`, also from random init) and write `finetune.json`.

    Args:
        run_dir: the pretraining run, or None with `opts.hf_dir` (`load_start`).
    Returns:
        The task's record: metric, pretrained, random_init, labels, steps, wall_s, (scores), and
        the source (`checkpoint`, or `hf_dir` and `model`); None when SIGTERM or SIGINT stopped a
        run after its checkpoint (the same command with run.resume=true continues it).
    """
    from d2v_engine.ctc import CharVocab
    from d2v_engine.eval import EvalOptions, data_root
    from d2v_engine.finetune_data import FT_TASKS, custom_task, load_split, remap_classes

    start = load_start(run_dir, opts, echo)
    modality = start.cfg.modality
    if opts.task == "custom":
        if not (opts.train and opts.test):
            raise UserError("task 'custom' needs --train and --test shard folders.")
        task = custom_task(modality, opts.train, opts.test, "ctc" if opts.ctc else "classify")
    elif opts.task not in FT_TASKS:
        raise UserError(f"unknown task '{opts.task}'; choose from {', '.join(FT_TASKS)} or custom.")
    else:
        task = FT_TASKS[opts.task]
    if task.modality != modality:
        article = "a" if modality == "text" else "an"
        raise UserError(f"task '{opts.task}' fine-tunes {task.modality} models but {start.what} is "
                        f"{article} {modality} model.")
    rank, world = distributed.init_distributed()
    base = start.out / "finetune" / opts.task
    inits = [("random_init", None)] if opts.random_init else [("pretrained", start)]
    if opts.compare and not opts.random_init:
        inits.append(("random_init", None))
    cfg0 = finetune_config(start.base, modality, opts, base, task.kind)
    spec = finetune_spec(start, cfg0)
    root = data_root(start.cfg, EvalOptions(data_root=opts.data_root))
    vocab = CharVocab() if task.kind == "ctc" else None
    began = time.perf_counter()
    train = load_split(opts.task, task, cfg0, spec, root, "train", vocab, echo)
    test = load_split(opts.task, task, cfg0, spec, root, "test", vocab, echo)
    classes = remap_classes(train, test, opts.task, echo) if task.kind == "classify" else None
    echo(f"finetune {opts.task}: {len(train)} labelled training samples, {len(test)} test samples "
         f"(read in {time.perf_counter() - began:.0f} s)")
    record: dict[str, Any] = {"metric": task.metric, "labels": len(train), "n_test": len(test)}
    curves, folders = {}, []
    for name, init in inits:
        out = base if name == "pretrained" or opts.random_init else base / "random_init"
        cfg = finetune_config(start.base, modality, opts, out, task.kind)
        state = None
        if init is not None:
            state = dict(init.student)
            if opts.weights == "teacher":
                state.update(init.teacher)
        t0 = time.perf_counter()
        tuner = Finetuner(cfg, spec, state, task, train, test, classes, vocab, rank, world, echo)
        stopped = tuner.train()
        tuner.close()
        if stopped:
            return None
        folders.append(Path(cfg.run.dir))
        scores = tuner.curve[-1]
        record[name] = scores[task.metric]
        record[f"{name}_scores"] = {k: v for k, v in scores.items() if k not in ("step", "seconds")}
        record[f"{name}_wall_s"] = round(time.perf_counter() - t0, 1)
        curves[name] = tuner.curve
        record.update(steps=cfg.train.steps, **start.record)
    record["wall_s"] = round(time.perf_counter() - began, 1)
    if rank == 0:
        write_results(start.out, opts.task, record, curves, folders[0] / "curve.png", echo)
    return record


def write_results(run_dir: Path, task: str, record: dict, curves: dict, plot: Path, echo) -> None:
    """Merge the task's record into `finetune.json`, print the table, draw the curve into `plot`
    (the first run's folder: `RUN/finetune/TASK/curve.png` unless run.dir moved it)."""
    path = run_dir / "finetune" / "finetune.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[task] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    echo(format_table(results, f"fine-tuning of {run_dir}"))
    plot_curves(curves, record["metric"], plot, task)


def format_table(results: dict[str, dict], title: str) -> str:
    head = f"{'task':<20}{'metric':>9}{'labels':>8}{'steps':>7}  {'pretrained':>10} {'random init':>11}{'wall s':>8}"
    lines = [title, head]
    for name, r in results.items():
        pre = f"{r['pretrained']:.4f}" if "pretrained" in r else "-"
        rnd = f"{r['random_init']:.4f}" if "random_init" in r else "-"
        lines.append(f"{name:<20}{r['metric']:>9}{r['labels']:>8}{r['steps']:>7}  {pre:>10} {rnd:>11}"
                     f"{r['wall_s']:>8.0f}")
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[dict]], metric: str, path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, curve in curves.items():
        ax.plot([r["step"] for r in curve], [r[metric] for r in curve], marker="o", label=name.replace("_", " "))
    ax.set(xlabel="step", ylabel=f"test {metric}", title=f"fine-tuning: {task}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


_SECONDS = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}


def label_budget(text: str) -> tuple[str, float]:
    """`--labels`: ("labels", count or fraction), or ("label_seconds", s) for a duration like 10min or 1h."""
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if value <= 0 or (unit and unit not in _SECONDS):
        raise argparse.ArgumentTypeError(f"'{text}' is not a label budget: pass a count (600), a fraction "
                                         "(0.01) or an amount of audio (10min, 1h, 90s)")
    return ("label_seconds", value * _SECONDS[unit]) if unit else ("labels", value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `d2v finetune` and of this script."""
    p.add_argument("--run", dest="run_dir", default=None, metavar="DIR", help="the pretraining run directory")
    p.add_argument("--hf-dir", default=None, metavar="HF",
                   help="fine-tune the encoder of this Hugging Face Data2Vec folder instead (needs --out)")
    p.add_argument("--out", default=None, metavar="DIR", help="--hf-dir: write DIR/finetune/TASK and "
                   "DIR/finetune/finetune.json")
    p.add_argument("--task", required=True, help="fashion-mnist, spoken-digits, spoken-digits-5db, "
                   "spoken-words-ctc, wordnet, or custom")
    p.add_argument("--labels", type=label_budget, default=None, metavar="N|FRACTION|DURATION",
                   help="labelled training samples: a count (600), a fraction (0.01), or for CTC an amount "
                        "of audio (10min, 1h, 90s: finetune.label_seconds)")
    p.add_argument("--config", default=None, metavar="FT.yaml", help="the recipe (default: configs/finetune_<modality>.yaml; CTC: finetune_audio_ctc.yaml)")
    p.add_argument("--random-init", action="store_true", help="fine-tune the run's initial weights instead")
    p.add_argument("--compare", choices=("random-init",), default=None,
                   help="also fine-tune from random init in the same command")
    p.add_argument("--weights", choices=("student", "teacher"), default="student")
    p.add_argument("--data", default=None, metavar="ROOT", help="folder with the prepared data sets")
    p.add_argument("--train", default=None, metavar="DIR", help="custom: labelled training shards")
    p.add_argument("--test", default=None, metavar="DIR", help="custom: test shards")
    p.add_argument("--ctc", action="store_true", help="custom: .txt transcripts and a CTC head")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")


def options(args: argparse.Namespace) -> FinetuneOptions:
    overrides = list(args.overrides)
    if args.labels is not None:
        key, value = args.labels
        overrides.insert(0, f"finetune.{key}={value:g}")
    return FinetuneOptions(task=args.task, config=args.config, overrides=overrides,
                           random_init=args.random_init, compare=args.compare == "random-init",
                           data_root=args.data, train=args.train, test=args.test, ctc=args.ctc,
                           weights=args.weights, hf_dir=args.hf_dir, out=args.out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    try:
        record = run_finetune(args.run_dir, options(args))
    except UserError as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        return 2
    return PREEMPTED if record is None else 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
