"""Consolidated fp32 weights of a run: `d2v export --run DIR --out FILE`, and `run.init_from=FILE`.

The file is a `torch.save`d dict that depends on neither the number of ranks nor the ZeRO stage of
the run that wrote it:

    format      EXPORT_FORMAT
    model       registry name of the architecture (`model.name`)
    student     the student encoder's fp32 state dict (names without the `encoder.` prefix)
    head        the student's regression head, fp32 (data2vec 1.0; empty for 2.0)
    decoder     the student's conv decoder, fp32 (data2vec 2.0; empty for 1.0)
    teacher     the teacher's fp32 EMA weights by parameter name (audio: without the CNN it shares)
    step, tag, world_size, zero_stage, config   where it came from

A new run on any number of ranks starts from it with `run.init_from=FILE`: that is the way to
continue training on another number of ranks, or with another ZeRO stage.

Where a DeepSpeed checkpoint keeps the weights (`Trainer.save_checkpoint` writes them):
- student, ZeRO 0 in fp32: rank 0's `mp_rank_00_model_states.pt` (`module`);
- student, ZeRO 0 in bf16: the fp32 masters of DeepSpeed's bf16 optimizer, in the same file;
- student, ZeRO 1-3: the fp32 master weights in the ranks' optimizer-state files, which DeepSpeed's
  `zero_to_fp32` gathers;
- teacher: the client state. ZeRO 0-2: `teacher` in rank 0's model-states file, a full replica.
  ZeRO-3: every rank's model-states file holds its flat slices of each tensor; `teacher_shapes`
  gives the full shapes, and the slices concatenate in rank order (`gather_teacher`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from d2v_engine.errors import UserError

EXPORT_FORMAT = "d2v-export-1"
STUDENT_PARTS = ("head", "decoder")
"""What an objective adds to the encoder: 1.0's regression head, 2.0's decoder (one or the other)."""
_META = "d2v.json"   # trainer.CHECKPOINT_META, repeated to keep this module free of the trainer's imports


def find_tag(run_dir: str | Path, tag: str | None = None) -> Path:
    """The folder of checkpoint `tag`, or of the one `checkpoints/latest` names.

    Raises:
        UserError: no such checkpoint, or an incomplete one.
    """
    root = Path(run_dir) / "checkpoints"
    if tag is None:
        if not (root / "latest").is_file():
            raise UserError(f"'{run_dir}' has no checkpoints/latest; pass the run.dir of a pretraining "
                            f"run that saved a checkpoint.")
        tag = (root / "latest").read_text().strip()
    if not (root / tag / _META).is_file():
        complete = sorted(p.parent.name for p in root.glob(f"*/{_META}"))
        raise UserError(f"checkpoint '{tag}' in {root} is missing or incomplete (no {_META}); pass "
                        f"--tag with one of: {', '.join(complete) or 'none yet'}.")
    return root / tag


def _load(path: Path) -> dict[str, Any]:
    # weights_only=False: DeepSpeed's files and our client state hold Python objects (RNG states).
    return torch.load(path, map_location="cpu", weights_only=False)


def gather_teacher(states: list[dict[str, Any]]) -> dict[str, Tensor]:
    """The full fp32 teacher from the client states of a checkpoint's model-states files.

    Args:
        states: every model-states file's contents in rank order (ZeRO-3), or rank 0's alone.
    Returns:
        {name: fp32 tensor of the full shape}.
    """
    shapes = states[0].get("teacher_shapes")
    if shapes is None:                      # ZeRO 0-2: rank 0 holds a full replica
        return {n: t.float() for n, t in states[0]["teacher"].items()}
    full = {}
    for name, shape in shapes.items():
        flat = torch.cat([s["teacher"][name].reshape(-1) for s in states])
        full[name] = flat[:torch.Size(shape).numel()].view(shape).float().clone()
    return full


def _run_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's resolved config (`config.yaml`) as a dict, for the record."""
    import yaml

    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _bf16_optimizer_masters(rank0: dict[str, Any]) -> dict[str, Tensor]:
    """ZeRO 0 in bf16: the fp32 masters of DeepSpeed's bf16 optimizer, named.

    Its `fp32_groups` follow our AdamW groups (`distributed.param_groups`): decayed parameters,
    then the rest, each in the module's parameter order; the bf16 `module` gives names and shapes.
    """
    from d2v_engine.distributed import decays

    buffers = set(rank0.get("buffer_names") or ())
    params = [(n, t) for n, t in rank0["module"].items() if n not in buffers]
    groups = ([n for n, t in params if decays(n, t)], [n for n, t in params if not decays(n, t)])
    shapes = dict(params)
    masters = {}
    for names, tensors in zip(groups, rank0["optimizer"]["fp32_groups"]):
        for name, tensor in zip(names, tensors, strict=True):
            masters[name] = tensor.view(shapes[name].shape)
    return masters


def _student_module(tag_dir: Path, meta: dict[str, Any], rank0: dict[str, Any]) -> dict[str, Tensor]:
    """The whole Data2Vec module's fp32 state dict (`encoder.*`, `head.*`)."""
    if meta["zero_stage"] == 0:
        module = rank0["module"] if meta["precision"] == "fp32" else _bf16_optimizer_masters(rank0)
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            module = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k: v.detach().float() for k, v in module.items() if v.is_floating_point()}


def consolidate(tag_dir: Path) -> dict[str, Any]:
    """The export dict of one checkpoint folder (see the module docstring)."""
    meta = json.loads((tag_dir / _META).read_text())
    if meta["zero_stage"] == 3:
        files = [tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(meta["world_size"])]
    else:
        files = [tag_dir / "mp_rank_00_model_states.pt"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"checkpoint {tag_dir} lacks {', '.join(missing)}; it was not written completely, "
                        f"so export another --tag.")
    states = [_load(f) for f in files]
    module = _student_module(tag_dir, meta, states[0])
    split = {part: {k[len(part) + 1:]: v for k, v in module.items() if k.startswith(part + ".")}
             for part in ("encoder",) + STUDENT_PARTS}
    return {"format": EXPORT_FORMAT, "model": meta["model"], "step": meta["step"], "tag": tag_dir.name,
            "world_size": meta["world_size"], "zero_stage": meta["zero_stage"],
            "config": _run_config(tag_dir.parent.parent), "student": split["encoder"],
            **{part: split[part] for part in STUDENT_PARTS}, "teacher": gather_teacher(states)}


def export_run(run_dir: str | Path, out: str | Path, tag: str | None = None) -> dict[str, Any]:
    """Write the consolidated fp32 student and teacher of a run's checkpoint to `out`.

    Args:
        run_dir: the run's directory (`run.dir`).
        out: the file to write (replaced atomically).
        tag: checkpoint tag; None = the one `latest` names.
    Returns:
        What was written.
    """
    exported = consolidate(find_tag(run_dir, tag))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(exported, tmp)
    os.replace(tmp, out)
    return exported


def load_export(path: str | Path, model_name: str) -> dict[str, Any]:
    """Read a `d2v export` file for `run.init_from`, checking that it holds `model_name`.

    Raises:
        UserError: not a file, not an export, or another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"run.init_from '{path}' does not exist; write one with "
                        f"`d2v export --run RUN_DIR --out {path}`.")
    try:
        exported = _load(path)
    except Exception as err:  # any unpickling failure means the same thing to the user
        raise UserError(f"run.init_from '{path}' is not a readable weights file ({type(err).__name__}); "
                        f"write one with `d2v export`.") from None
    if not isinstance(exported, dict) or exported.get("format") != EXPORT_FORMAT:
        raise UserError(f"run.init_from '{path}' is not a `d2v export` file; write one with `d2v export`.")
    if exported["model"] != model_name:
        raise UserError(f"run.init_from '{path}' holds model '{exported['model']}' but model.name is "
                        f"'{model_name}'; set model.name={exported['model']} or export a matching run.")
    return exported


def load_student_(model: nn.Module, exported: dict[str, Any], where: str) -> None:
    """Load an export's student encoder, and its head or decoder, into a (not yet partitioned) model.

    The encoder must fit exactly. The head (1.0) or decoder (2.0) loads when the export has one for
    this objective; otherwise it keeps its fresh initialisation, so that a 2.0 run can start from a
    1.0 export's encoder and teacher (and the other way round).

    Raises:
        UserError: the weights do not fit the model (e.g. another text vocabulary).
    """
    state = {f"encoder.{k}": v for k, v in exported["student"].items()}
    fresh = []
    for part in STUDENT_PARTS:
        if not hasattr(model, part):
            continue
        if exported.get(part):
            state.update({f"{part}.{k}": v for k, v in exported[part].items()})
        else:
            fresh.append(f"{part}.")
    buffers = {name for name, _ in model.named_buffers()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape mismatch
        raise UserError(f"the weights in {where} do not fit the model "
                        f"({str(err).splitlines()[-1].strip()}).") from None
    missing = [k for k in result.missing_keys                         # zero_to_fp32 keeps no buffers
               if k not in buffers and not k.startswith(tuple(fresh))]
    if missing or result.unexpected_keys:
        raise UserError(f"the weights in {where} do not fit the model (missing {missing[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]}).")
