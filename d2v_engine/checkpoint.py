"""Loading a run's weights outside DeepSpeed: the consolidated student (or teacher) encoder.

A run directory holds `config.yaml` and `checkpoints/<tag>/`, written by `Trainer.save_checkpoint`
through DeepSpeed, with `checkpoints/latest` naming the newest complete tag. Where the weights live
depends on the ZeRO stage and the precision of the run; `export.consolidate` knows every case (fp32
masters of bf16 runs, ZeRO-2/3 optimizer shards, a ZeRO-3 teacher spread over the ranks), and this
module reads through it, so `d2v eval`, `d2v export` and `d2v hf-export` see the same weights.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from d2v_engine.config import Config, load_config
from d2v_engine.errors import UserError
from d2v_engine.export import consolidate, find_tag
from d2v_engine.models.registry import ModelSpec, build_encoder, get_spec, with_model_config

Weights = Literal["student", "teacher", "random"]


@dataclass
class RunWeights:
    """What `load_run_weights` found."""

    tag: str
    """Checkpoint tag, e.g. `step00000400`."""
    step: int
    """Optimizer steps the checkpoint had completed."""
    zero_stage: int
    """ZeRO stage of the run (decides where the weights were read from)."""
    student: dict[str, Tensor]
    """The student encoder's fp32 state dict (names without the `encoder.` prefix)."""
    teacher: dict[str, Tensor]
    """The teacher's fp32 EMA weights by parameter name (audio: no CNN, it is shared)."""


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run recorded as `config.yaml`.

    Raises:
        UserError: `run_dir` is not a run directory.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a run directory (it has no config.yaml); pass the "
                        f"run.dir of a pretraining run.")
    return load_config(path)


def load_run_weights(run_dir: str | Path, tag: str | None = None) -> RunWeights:
    """Read the student and teacher weights of one of a run's checkpoints.

    Args:
        run_dir: the run's directory (`run.dir`).
        tag: checkpoint tag; None = the newest.
    Returns:
        RunWeights with fp32 state dicts on the CPU.
    Raises:
        UserError: no checkpoint, or an incomplete one.
    """
    export = consolidate(find_tag(run_dir, tag))
    return RunWeights(tag=export["tag"], step=int(export["step"]), zero_stage=int(export["zero_stage"]),
                      student=export["student"], teacher=export["teacher"])


def run_spec(cfg: Config, student: dict[str, Tensor]) -> ModelSpec:
    """The run's model spec; a text model's vocabulary size comes from its trained embedding.

    The `model` section's overrides apply (the dropouts are harmless: probes run in eval mode)."""
    spec = with_model_config(get_spec(cfg.model.name), cfg.model)
    table = student.get("embeddings.word_embeddings.weight")
    if spec.modality == "text" and table is not None:
        spec = dataclasses.replace(spec, vocab_size=table.shape[0])
    return spec


def _load_into(encoder: nn.Module, state: dict[str, Tensor], model: str, where: str) -> None:
    """Load `state` into `encoder`; only buffers may be missing (zero_to_fp32 gathers parameters only)."""
    buffers = {name for name, _ in encoder.named_buffers()}
    try:
        result = encoder.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape mismatch
        detail = str(err).splitlines()[-1].strip()
        raise UserError(f"the weights in {where} do not fit model '{model}' ({detail}); the run's "
                        f"config.yaml and checkpoint disagree.") from None
    missing = [k for k in result.missing_keys if k not in buffers]
    if missing or result.unexpected_keys:
        raise UserError(f"the weights in {where} do not fit model '{model}' (missing {missing[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]}); the run's config.yaml and "
                        f"checkpoint disagree.")


def build_run_encoder(cfg: Config, weights: RunWeights, which: Weights = "student") -> nn.Module:
    """An eval-mode encoder of the run's shape with the requested weights.

    Args:
        cfg: the run's config.
        weights: what `load_run_weights` read.
        which: `student` (the trained encoder), `teacher` (the EMA weights over the student's, so
            parts the teacher shares through the input, such as the audio CNN, are the student's),
            or `random` (the same initialisation the run started from: same seed, same shape).
    Returns:
        The encoder on the CPU, in eval mode, without gradients.
    """
    spec = run_spec(cfg, weights.student)
    # The trainer seeds everything, then builds the encoder first: this reproduces its initial weights.
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(spec)
    if which != "random":
        state = dict(weights.student)
        if which == "teacher":
            state.update(weights.teacher)
        _load_into(encoder, state, cfg.model.name, f"checkpoint {weights.tag}")
    return encoder.eval().requires_grad_(False)
