"""`d2v finetune --hf-dir`: a Hugging Face Data2Vec folder as the start of a fine-tuning.

The folder's base model (a `Data2Vec*Model`, or the one inside a task class such as
`Data2VecVisionForImageClassification`) is read as `d2v hf-import` reads it
(`commands.load_hf_model`: safetensors, or a `.bin` unpickled weights only) and converted by
`weights.from_hf`. Its architecture names the registry model (`registry_name`) that the
fine-tuning config records as `model.name`, so that `d2v hf-export --finetuned` rebuilds it.

There is no run config, so the first config layer (`hf_layer`) says what the folder says: that
model name, the image processor's mean and std, the feature extractor's sampling rate, the
folder's `tokenizer.json`, and zero-padded audio positions (Hugging Face's). The modality's recipe
and the overrides follow, as for a run.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from d2v_engine.config import Config, load_config
from d2v_engine.errors import UserError
from d2v_engine.hf.commands import _check_fits, load_hf_model, quiet_transformers
from d2v_engine.hf.spec import architecture_diff, spec_from_hf_config
from d2v_engine.hf.weights import from_hf
from d2v_engine.models.registry import MODEL_REGISTRY, ModelSpec, get_spec, with_model_config


def _exportable(spec: ModelSpec) -> bool:
    """A registry spec that a Hugging Face Data2Vec model can hold (no data2vec 2.0 parts)."""
    return spec.pos_embed == "none" and not spec.embed_norm and not spec.alibi


def registry_name(hf_dir: str | Path, got: ModelSpec) -> str:
    """The registry model with the architecture of `got` (the HF model's spec), pooling aside.

    Pooling does not count: fine-tuning replaces the image encoder's final LayerNorm, the only part
    it decides, with the head's (`heads.FinetuneModel`).

    Raises:
        UserError: no registered model of the modality has that architecture.
    """
    best: tuple[str, list[str]] | None = None
    for name, spec in MODEL_REGISTRY.items():
        if spec.modality != got.modality or not _exportable(spec):
            continue
        diffs = architecture_diff(dataclasses.replace(got, pooling=spec.pooling), spec)
        if not diffs:
            return name
        if best is None or len(diffs) < len(best[1]):
            best = (name, diffs)
    assert best is not None   # every modality has registered 1.0 models
    raise UserError(f"the Hugging Face model in '{hf_dir}' has the shape of no registered {got.modality} model "
                    f"(the closest, '{best[0]}', differs in {'; '.join(best[1][:3])}); fine-tune a model of a "
                    f"registered shape (d2v_engine/models/registry.py).")


def hf_layer(hf_dir: str | Path, name: str, modality: str) -> dict[str, Any]:
    """The first config layer of a fine-tuning from `hf_dir`: the model and what its preprocessing says.

    Args:
        hf_dir: the Hugging Face folder.
        name: the registry model (`registry_name`).
        modality: its modality.
    Returns:
        A mapping of config sections (`load_config` takes it as a file's content).
    """
    folder = Path(hf_dir)
    model: dict[str, Any] = {"name": name}
    data: dict[str, Any] = {}
    if modality == "audio":
        model["pos_conv_padding"] = "zeros"   # the only padding Hugging Face's audio model has
    processor = folder / "preprocessor_config.json"
    if processor.is_file():   # JSON: reading it runs nothing
        pre = json.loads(processor.read_text())
        if modality == "image" and pre.get("do_normalize", True) and "image_mean" in pre:
            data.update(mean=[float(x) for x in pre["image_mean"]], std=[float(x) for x in pre["image_std"]])
        if modality == "audio" and "sampling_rate" in pre:
            data["sample_rate"] = int(pre["sampling_rate"])
    if modality == "text" and (folder / "tokenizer.json").is_file():
        data["tokenizer"] = str(folder / "tokenizer.json")
    # A pretraining field, kept valid for models shallower than its default.
    top_k = min(Config().target.top_k, get_spec(name).transformer.depth)
    return {"model": model, "data": data, "target": {"top_k": top_k}}


def _student(hf_model, want: ModelSpec) -> dict[str, Tensor]:
    """The HF weights as the state of our encoder of spec `want`."""
    state = from_hf(hf_model, like=want).state_dict()
    if want.modality == "image" and want.pooling == "cls" and "layernorm.weight" not in state:
        # A mean-pooling model has no final LayerNorm; fine-tuning drops it anyway: a fresh one.
        dim = want.transformer.dim
        state.update({"layernorm.weight": torch.ones(dim), "layernorm.bias": torch.zeros(dim)})
    return state


def hf_start(hf_dir: str | Path, out: str | Path, overrides: list[str] | tuple[str, ...] = (), echo=print):
    """Where `d2v finetune --hf-dir` starts: the folder's encoder weights, its spec and config layer.

    Args:
        hf_dir: a folder written by `save_pretrained` (a Data2Vec vision, audio or text model, or
            a task class around one).
        out: the output folder (`OUT/finetune/...`).
        overrides: the command's `section.key=value` items (a text model's `data.tokenizer`).
        echo: where notes on harmless differences go (layer-norm eps).
    Returns:
        A `finetune.Start` without teacher weights.
    Raises:
        UserError: not a Data2Vec folder, a shape no registered model has, or (text) no tokenizer.
    """
    from d2v_engine.checkpoint import run_spec
    from d2v_engine.finetune import Start

    quiet_transformers()
    hf_model = load_hf_model(hf_dir)
    got = spec_from_hf_config(hf_model.config)
    name = registry_name(hf_dir, got)
    layer = hf_layer(hf_dir, name, got.modality)
    cfg = load_config(layer)
    checked = load_config(layer, list(overrides))
    if got.modality == "text" and not checked.data.tokenizer:
        raise UserError(f"'{hf_dir}' has no tokenizer.json (a fast tokenizer's save_pretrained writes one); "
                        f"pass data.tokenizer=FILE with the model's tokenizer.")
    want = with_model_config(get_spec(name), cfg.model)
    for note in _check_fits(hf_dir, dataclasses.replace(got, pooling=want.pooling), want, checked):
        echo(f"finetune: note: {note}")
    student = _student(hf_model, want)
    what = f"the Hugging Face model in '{hf_dir}'"
    return Start(base=layer, cfg=cfg, spec=run_spec(cfg, student), student=student, teacher=None, out=Path(out),
                 what=what, record={"hf_dir": str(hf_dir), "model": name})

