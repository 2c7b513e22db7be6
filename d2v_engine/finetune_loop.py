"""The fine-tuning loop: one run of a task head on a start's encoder (`d2v finetune`, `finetune.py`).

`Finetuner` is pretraining's pieces put together for a labelled task: DeepSpeed through
`distributed` (ZeRO 0-2, bf16), the guards' non-finite skip, `MetricsLogger`, the trainer's atomic
checkpoints and RNG states, and the preemption stop (`StepEndStops`). The optimizer groups carry the
layer-wise lr decay (`param_groups`); one schedule per group (`build_scheduler`: warm-up + cosine,
polynomial or tri-stage, and 0 for the encoder during `finetune.freeze_steps`).

What a run writes into its folder (`cfg.run.dir`) is listed in `finetune.py`'s docstring;
`model.safetensors` is `save_finetuned`'s, and a fresh run in a used folder first removes `OWN_FILES`.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from d2v_engine import distributed
from d2v_engine.config import Config, dump_config
from d2v_engine.errors import UserError
from d2v_engine.preemption import StepEndStops, StopSignals

FINETUNE_FORMAT = "d2v-finetune-1"
"""`format` in the metadata of a fine-tuned `model.safetensors`."""
FIELDS = ("step", "loss", "lr", "grad_norm", "samples_per_s", "step_ms", "skipped_steps")
"""The fields of every fine-tuning `metrics.jsonl` record."""
OWN_FILES = ("metrics.jsonl", "test.jsonl", "tensorboard", "checkpoints", "model.safetensors", "curve.png")
"""What one fine-tuning run writes in its folder, besides the config files a new run overwrites."""



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
