"""`d2v hf-export --finetuned`: a fine-tuned model -> a Hugging Face task model folder.

`d2v finetune` writes `RUN/finetune/TASK/model.safetensors` (`finetune_loop.save_finetuned`): the fp32
state of a `heads.FinetuneModel` (`encoder.*`, `head.*`) and metadata, the full config among it.
The export rebuilds the encoder from that config, names its weights as `d2v hf-export` does
(`weights.hf_state_dict`) and the head as the task class does:

    image                      Data2VecVisionForImageClassification   pooler.layernorm, classifier
                               (use_mean_pooling=True)
    text, finetune.head=first  Data2VecTextForSequenceClassification  classifier.dense, classifier.out_proj
    audio, CTC                 Data2VecAudioForCTC                    lm_head

The preprocessing is `d2v hf-export`'s: the image processor or the run's tokenizer; for CTC a
`Wav2Vec2Processor`, the feature extractor with a `Wav2Vec2CTCTokenizer` of the run's letters
(`ctc.CharVocab`).

Heads that no Hugging Face class computes exactly are refused with one sentence: image models
fine-tuned with the encoder's final LayerNorm before the mean (files written before the image head
dropped it), text heads over the mean of the tokens, and audio keyword heads (a LayerNorm after the
mean, which `Data2VecAudioForSequenceClassification` lacks). Data2vec 2.0 image and audio models
are refused as `d2v hf-export` refuses them.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from d2v_engine.checkpoint import _load_into, run_spec
from d2v_engine.config import Config, load_config
from d2v_engine.errors import UserError
from d2v_engine.finetune_loop import FINETUNE_FORMAT
from d2v_engine.hf.commands import build_preprocessor
from d2v_engine.hf.spec import hf_config_from_spec, require_transformers
from d2v_engine.hf.weights import build_hf_model, hf_state_dict
from d2v_engine.models.registry import ModelSpec, build_encoder
from d2v_engine.safe_load import unreadable_error

TASK_HEADS = {
    ("image", "classify"): ("Data2VecVisionForImageClassification",
                            {"norm.": "data2vec_vision.pooler.layernorm.", "linear.": "classifier."}),
    ("text", "classify"): ("Data2VecTextForSequenceClassification",
                           {"dense.": "classifier.dense.", "out_proj.": "classifier.out_proj."}),
    ("audio", "ctc"): ("Data2VecAudioForCTC", {"linear.": "lm_head."}),
}
"""(modality, kind) -> (the `transformers` class an export writes, our head's parameter prefixes
(`head.` stripped) -> the class's names)."""


def read_finetuned(folder: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a fine-tuning folder's `model.safetensors` (nothing in it runs).

    Args:
        folder: `RUN/finetune/TASK`, as `d2v finetune` wrote it.
    Returns:
        (state: name -> fp32 tensor, metadata: key -> str).
    Raises:
        UserError: no such file, an unreadable one, or not a fine-tuned model.
    """
    from safetensors import safe_open

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise UserError(f"'{folder}' holds no model.safetensors; pass the folder of a finished fine-tuning "
                        f"run (RUN/finetune/TASK).")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # a truncated or corrupt header means the same to the user
        raise unreadable_error(f"'{path}'", err, "fine-tune again to rewrite it") from None
    if meta.get("format") != FINETUNE_FORMAT:
        raise UserError(f"'{path}' is not a fine-tuned model (its format is {meta.get('format')!r}, not "
                        f"'{FINETUNE_FORMAT}'); pass a folder that `d2v finetune` wrote.")
    return state, meta


def check_exportable(modality: str, kind: str, head: str, final_norm: bool) -> None:
    """Refuse, with one sentence, a data2vec 1.0 head that no Hugging Face task class computes exactly.

    Args:
        modality, kind, head: the file's model modality, `kind` and `head`.
        final_norm: the encoder state has a final LayerNorm (`layernorm.*`, images).
    """
    if modality == "image" and final_norm:
        raise UserError("this image model was fine-tuned with the encoder's final LayerNorm before the mean, "
                        "which Hugging Face's mean-pooling Data2VecVisionForImageClassification does not have; "
                        "fine-tune it again (the image head now drops that LayerNorm) to export it.")
    if modality == "text" and head != "first":
        raise UserError(f"Hugging Face's Data2VecTextForSequenceClassification reads the first token (<s>) but "
                        f"this model was fine-tuned with finetune.head={head}; fine-tune with "
                        f"finetune.head=first to export it.")
    if modality == "audio" and kind != "ctc":
        raise UserError("Hugging Face's Data2VecAudioForSequenceClassification has no LayerNorm between its "
                        "mean pooling and its classifier, so audio keyword heads are not exportable (CTC "
                        "heads are).")


def task_config(spec: ModelSpec, meta: dict[str, str], cfg: Config, final_norm: bool):
    """The Hugging Face config of the task model: the encoder's, plus the head's labels or vocabulary.

    Raises:
        UserError: the encoder (data2vec 2.0 images and audio, circular audio positions) or the head
            has no exact Hugging Face counterpart (`check_exportable`).
    """
    config = hf_config_from_spec(spec)
    check_exportable(spec.modality, meta["kind"], meta["head"], final_norm)
    config.architectures = [TASK_HEADS[spec.modality, meta["kind"]][0]]
    # An image head's LayerNorm follows the mean: HF's mean-pooling pooler (whose eps is the encoder's).
    config.use_mean_pooling = spec.modality == "image"
    if meta["kind"] == "ctc":
        vocab = json.loads(meta["vocab"])
        # The CTC blank is `<pad>` in both (ctc.BLANK); ctc.ctc_loss averages per target length and
        # zeroes alignments that cannot fit, as these two settings do.
        config.update(dict(vocab_size=len(vocab), pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"],
                           eos_token_id=vocab["</s>"], ctc_loss_reduction="mean", ctc_zero_infinity=True,
                           final_dropout=cfg.finetune.head_dropout))
    else:
        classes = json.loads(meta["classes"])
        config.update(dict(id2label={i: str(c) for i, c in enumerate(classes)},
                           label2id={str(c): i for i, c in enumerate(classes)},
                           classifier_dropout=cfg.finetune.head_dropout))
    return config


def _encoder(spec: ModelSpec, state: dict[str, Tensor], model: str) -> nn.Module:
    """Our encoder of `spec` holding `state` (the `encoder.*` tensors, prefix stripped)."""
    with torch.random.fork_rng(devices=[]):   # the caller's random stream stays as it was
        encoder = build_encoder(spec)
    if spec.modality == "image":   # as in FinetuneModel: the head's LayerNorm replaces the final one
        encoder.layernorm = nn.Identity()
    _load_into(encoder, state, model, "the fine-tuned model")
    return encoder.eval()


def split_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A `FinetuneModel` state dict -> (encoder state, head state), the `encoder.` / `head.` prefixes stripped."""
    parts: dict[str, dict[str, Tensor]] = {"encoder": {}, "head": {}}
    for name, tensor in state.items():
        part, _, rest = name.partition(".")
        parts[part][rest] = tensor
    return parts["encoder"], parts["head"]


def to_hf_task(spec: ModelSpec, encoder_state: dict[str, Tensor], head_state: dict[str, Tensor],
               meta: dict[str, str], cfg: Config) -> nn.Module:
    """The Hugging Face task model of a fine-tuned `FinetuneModel`.

    Args:
        spec: the encoder's spec; encoder_state, head_state: `split_state` of the model's state;
            meta, cfg: the file's metadata and config.
    Returns:
        A `TASK_HEADS` model in eval mode whose logits are the `FinetuneModel`'s (CTC: before the
        log-softmax).
    """
    config = task_config(spec, meta, cfg, final_norm="layernorm.weight" in encoder_state)
    cls = getattr(require_transformers(), config.architectures[0])
    encoder = _encoder(spec, encoder_state, cfg.model.name)
    hf_state = {f"{cls.base_model_prefix}.{k}": v for k, v in hf_state_dict(encoder).items()}
    names = TASK_HEADS[spec.modality, meta["kind"]][1]
    for name, tensor in head_state.items():
        prefix = next(p for p in names if name.startswith(p))
        hf_state[names[prefix] + name[len(prefix):]] = tensor.float().clone()
    return build_hf_model(cls, config, hf_state)


def task_preprocessor(cfg: Config, spec: ModelSpec, meta: dict[str, str]):
    """`d2v hf-export`'s preprocessing; for CTC a `Wav2Vec2Processor`: it and a tokenizer of the letters."""
    if meta["kind"] != "ctc":
        return build_preprocessor(cfg, spec)
    transformers = require_transformers()
    with tempfile.TemporaryDirectory() as tmp:   # the tokenizer reads its vocabulary from a file
        path = Path(tmp) / "vocab.json"
        path.write_text(meta["vocab"])
        tokenizer = transformers.Wav2Vec2CTCTokenizer(
            str(path), bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
            word_delimiter_token="|", do_lower_case=False)
    return transformers.Wav2Vec2Processor(feature_extractor=build_preprocessor(cfg, spec), tokenizer=tokenizer)


def hf_export_finetuned(folder: str | Path, out: str | Path) -> dict[str, Any]:
    """`d2v hf-export --finetuned`: a fine-tuned model -> a folder `transformers` loads with `from_pretrained`.

    Args:
        folder: the fine-tuning folder (`RUN/finetune/TASK`).
        out: the folder to write (created; existing files of the same names are replaced).
    Returns:
        {"model", "task", "kind", "step", "hf_class", "files"}.
    Raises:
        UserError: not a fine-tuned model, or a model or head with no exact Hugging Face counterpart
            (nothing is written then).
    """
    state, meta = read_finetuned(folder)
    cfg = load_config(json.loads(meta["config"]))
    encoder_state, head_state = split_state(state)
    spec = run_spec(cfg, encoder_state)
    model = to_hf_task(spec, encoder_state, head_state, meta, cfg)
    preprocessor = task_preprocessor(cfg, spec, meta)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    preprocessor.save_pretrained(out)
    return {"model": meta["model"], "task": meta["task"], "kind": meta["kind"], "step": int(meta["step"]),
            "hf_class": type(model).__name__, "files": sorted(p.name for p in out.iterdir())}
