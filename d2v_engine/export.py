"""Consolidated fp32 weights of a run: `d2v export --run DIR --out FILE`, and `run.init_from=FILE`.

The file is safetensors (tensors and a JSON header, nothing that runs when read) and depends on
neither the number of ranks nor the ZeRO stage of the run that wrote it. Tensors are named
`<part>/<name>`; the metadata key `d2v` holds the rest as one JSON object:

    tensors   student/*   the student encoder's fp32 state dict (names without the `encoder.` prefix)
              head/*      the student's regression head, fp32 (data2vec 1.0; none for 2.0)
              decoder/*   the student's conv decoder, fp32 (data2vec 2.0; none for 1.0)
              teacher/*   the teacher's fp32 EMA weights by parameter name (audio: without the CNN it shares)
    JSON      format      EXPORT_FORMAT
              model       registry name of the architecture (`model.name`)
              step, tag, world_size, zero_stage, config   where it came from

`read_export` gives it back as one dict with a dict of tensors per part. Exports written before
(`LEGACY_FORMAT`, a `torch.save`d dict of the same keys) are still read, unpickled weights only.

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
Those files are read weights only, with the allow-list of `safe_load` (no code runs).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from d2v_engine.errors import UserError
from d2v_engine.safe_load import (client_state_types, load_file, unreadable_error, unsafe_error, weights_only,
                                  zero_optimizer_types)

EXPORT_FORMAT = "d2v-export-2"
"""safetensors, the JSON header under the metadata key `d2v` (see the module docstring)."""
LEGACY_FORMAT = "d2v-export-1"
"""A `torch.save`d dict: exports written before safetensors, still read (weights only)."""
STUDENT_PARTS = ("head", "decoder")
"""What an objective adds to the encoder: 1.0's regression head, 2.0's decoder (one or the other)."""
TENSOR_PARTS = ("student",) + STUDENT_PARTS + ("teacher",)
"""The export's dicts of tensors; every other key is JSON."""
_HEADER_KEY = "d2v"
_NOT_OURS = "use a run directory that d2v pretraining wrote"
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

        # zero_to_fp32 reads the model-states and optimizer-state files itself, weights only here too
        try:
            with weights_only(client_state_types() + zero_optimizer_types()), \
                    contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                module = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except pickle.UnpicklingError as err:
            raise unsafe_error(f"checkpoint {tag_dir}", err, _NOT_OURS) from None
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
    states = [load_file(f, client_state_types(), f"checkpoint file {f}", _NOT_OURS) for f in files]
    module = _student_module(tag_dir, meta, states[0])
    split = {part: {k[len(part) + 1:]: v for k, v in module.items() if k.startswith(part + ".")}
             for part in ("encoder",) + STUDENT_PARTS}
    return {"format": EXPORT_FORMAT, "model": meta["model"], "step": meta["step"], "tag": tag_dir.name,
            "world_size": meta["world_size"], "zero_stage": meta["zero_stage"],
            "config": _run_config(tag_dir.parent.parent), "student": split["encoder"],
            **{part: split[part] for part in STUDENT_PARTS}, "teacher": gather_teacher(states)}


def export_run(run_dir: str | Path, out: str | Path, tag: str | None = None) -> dict[str, Any]:
    """Write the consolidated fp32 student and teacher of a run's checkpoint to `out` (safetensors).

    Args:
        run_dir: the run's directory (`run.dir`).
        out: the file to write (replaced atomically), e.g. `weights.safetensors`.
        tag: checkpoint tag; None = the one `latest` names.
    Returns:
        What was written.
    """
    exported = consolidate(find_tag(run_dir, tag))
    save_export(exported, out)
    return exported


def save_export(exported: dict[str, Any], out: str | Path) -> None:
    """Write an export dict as safetensors, replacing `out` atomically.

    safetensors refuses tensors that share memory or are not contiguous; those (hf-import's teacher
    is the student's own tensors) are written from a contiguous copy.

    Args:
        exported: the `consolidate` layout: a dict of tensors per `TENSOR_PARTS` entry, JSON values
            for every other key.
        out: the file to write.
    """
    from safetensors.torch import save_file

    tensors, storages = {}, set()
    for part in TENSOR_PARTS:
        for name, tensor in exported.get(part, {}).items():
            tensor = tensor.detach().cpu()
            if tensor.untyped_storage().data_ptr() in storages or not tensor.is_contiguous():
                tensor = tensor.clone(memory_format=torch.contiguous_format)
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[f"{part}/{name}"] = tensor
    header = {k: v for k, v in exported.items() if k not in TENSOR_PARTS} | {"format": EXPORT_FORMAT}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, tmp, metadata={_HEADER_KEY: json.dumps(header)})
    os.replace(tmp, out)


def _is_safetensors(path: Path) -> bool:
    """True when the file starts as safetensors does: a little-endian u64 header length, then `{`."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_safetensors(path: Path, what: str, fix: str) -> dict[str, Any]:
    """A safetensors export as the `consolidate` dict."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = (f.metadata() or {}).get(_HEADER_KEY)
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        exported = json.loads(header) if header is not None else {}
    except Exception as err:  # a truncated or corrupt header means the same to the user
        raise unreadable_error(what, err, fix) from None
    parts: dict[str, dict[str, Tensor]] = {part: {} for part in TENSOR_PARTS}
    for key, tensor in tensors.items():
        part, _, name = key.partition("/")
        if part not in parts:
            exported = {}                       # someone else's safetensors file
            break
        parts[part][name] = tensor
    if not isinstance(exported, dict) or exported.get("format") != EXPORT_FORMAT:
        raise UserError(f"{what} is a safetensors file but not a `d2v export` one; {fix}.")
    return {**exported, **parts}


def read_export(path: str | Path, what: str | None = None) -> dict[str, Any]:
    """The contents of a `d2v export` or `d2v hf-import` file, in the `consolidate` layout.

    Nothing in the file runs: safetensors is tensors and JSON, and a legacy `.pt` export is unpickled
    weights only (tensors and plain values; anything else is refused).

    Args:
        path: the file (safetensors, or `LEGACY_FORMAT`; told apart by content, not by name).
        what: how errors name the file (default: its path).
    Returns:
        The `consolidate` layout: JSON values, and {name: tensor} per `TENSOR_PARTS` entry.
    Raises:
        UserError: missing, unreadable, not an export, or a pickle that asks to run code.
    """
    path = Path(path)
    what = what or f"'{path}'"
    fix = "write one with `d2v export`"
    if not path.is_file():
        raise UserError(f"{what} does not exist; write one with `d2v export --run RUN_DIR --out {path}`.")
    if _is_safetensors(path):
        return _read_safetensors(path, what, fix)
    exported = load_file(path, [], what, fix)
    if not isinstance(exported, dict) or exported.get("format") != LEGACY_FORMAT:
        raise UserError(f"{what} is not a `d2v export` file; {fix}.")
    return exported


def load_export(path: str | Path, model_name: str) -> dict[str, Any]:
    """Read a `d2v export` file for `run.init_from`, checking that it holds `model_name`.

    Raises:
        UserError: not a file, not an export, a pickle that asks to run code, or another architecture.
    """
    exported = read_export(path, what=f"run.init_from '{path}'")
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
