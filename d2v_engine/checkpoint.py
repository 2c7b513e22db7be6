"""Loading a run's weights outside DeepSpeed: the consolidated student (or teacher) encoder.

A run directory holds `config.yaml` and `checkpoints/<tag>/`, written by `Trainer.save_checkpoint`
through DeepSpeed, with `checkpoints/latest` naming the newest tag. Where the weights live depends on
the ZeRO stage the run used:

- stage 0 and 1 (any number of ranks): every rank keeps whole parameters, so rank 0's
  `mp_rank_00_model_states.pt` holds the full `module` state dict (in the training dtype);
- stage 2 and 3: the fp32 master weights are spread over the ranks' optimizer-state files (stage 3
  also partitions the module itself); DeepSpeed's `zero_to_fp32` helpers gather them.

The teacher is not part of the DeepSpeed module: its fp32 weights ride in the client state
(`teacher`) of rank 0's model-states file, whatever the stage.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from d2v_engine.config import Config, load_config
from d2v_engine.errors import UserError
from d2v_engine.models.registry import ModelSpec, build_encoder, get_spec

Weights = Literal["student", "teacher", "random"]

_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
"""Rank 0's model-states file: ZeRO 0-2, then ZeRO 3."""


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


def find_checkpoint(run_dir: str | Path, tag: str | None = None) -> Path:
    """The folder of checkpoint `tag`, or of the newest one (`checkpoints/latest`, else the last `step*`).

    Raises:
        UserError: the run has no such checkpoint.
    """
    root = Path(run_dir) / "checkpoints"
    if tag is None and (root / "latest").is_file():
        tag = (root / "latest").read_text().strip()
    if tag is None:
        tags = sorted(p.name for p in root.glob("step*") if p.is_dir())
        tag = tags[-1] if tags else None
    if tag is None or not (root / tag).is_dir():
        what = f"checkpoint '{tag}'" if tag else "checkpoint"
        raise UserError(f"run '{run_dir}' has no {what} in {root}; train it first (checkpoints are "
                        f"written at train.save_every steps and at the end).")
    return root / tag


def _read_model_states(tag_dir: Path) -> dict:
    for name in _MODEL_STATES:
        if (tag_dir / name).is_file():
            # weights_only=False: the client state holds numpy RNG states and Python tuples.
            return torch.load(tag_dir / name, map_location="cpu", weights_only=False)
    raise UserError(f"checkpoint '{tag_dir}' has no model-states file ({_MODEL_STATES[0]}); it is "
                    f"incomplete, so remove it or pass another --tag.")


def _module_state(tag_dir: Path, states: dict, stage: int) -> dict[str, Tensor]:
    """The whole Data2Vec module's state dict (`encoder.*`, `head.*`) in fp32."""
    if stage <= 1:
        module = states["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # The helper prints its progress on stdout, which belongs to the eval table: send it to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            module = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k: v.detach().float() if v.is_floating_point() else v for k, v in module.items()}


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
    tag_dir = find_checkpoint(run_dir, tag)
    states = _read_model_states(tag_dir)
    stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    module = _module_state(tag_dir, states, stage)
    prefix = "encoder."
    student = {k[len(prefix):]: v for k, v in module.items() if k.startswith(prefix)}
    return RunWeights(tag=tag_dir.name, step=int(states.get("step", states.get("global_steps", 0))),
                      zero_stage=stage, student=student, teacher=dict(states.get("teacher", {})))


def run_spec(cfg: Config, student: dict[str, Tensor]) -> ModelSpec:
    """The run's model spec; a text model's vocabulary size comes from its trained embedding."""
    spec = get_spec(cfg.model.name)
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
