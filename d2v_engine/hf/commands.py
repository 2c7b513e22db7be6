"""`d2v hf-import` and `d2v hf-export`: Hugging Face folders <-> our weights files and runs.

hf-import reads a folder that `transformers` wrote (`save_pretrained`), checks that the model fits
the config's `model.name`, and writes a `d2v export` file (safetensors, `export.EXPORT_FORMAT`) that
a run starts from with `run.init_from=FILE`: the student and the teacher both start at the HF
weights, the regression head (which HF models lack) at a fresh initialisation from the config's
seed. transformers reads the folder's weights without running code (safetensors, or a `.bin`
unpickled weights only).

hf-export gathers a run's fp32 weights (`export.consolidate`: any ZeRO stage, fp32 or bf16) and
writes a folder that `transformers` loads with `from_pretrained`: `config.json` and
`model.safetensors`, plus the preprocessing the run used: an image processor (resize and centre
crop to the run's size, its mean and std), an audio feature extractor (the run's rate, per-clip
normalisation) or the run's tokenizer (`<s> ... </s>`, RoBERTa specials). `hf-export --finetuned`
(a fine-tuned model as a task class) lives in `hf.finetuned`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from d2v_engine.checkpoint import build_run_encoder, load_run_config, load_run_weights
from d2v_engine.config import Config, load_config
from d2v_engine.errors import UserError
from d2v_engine.export import EXPORT_FORMAT, save_export
from d2v_engine.hf.spec import MODEL_TYPES, architecture_diff, require_transformers, spec_from_hf_config
from d2v_engine.hf.weights import from_hf, to_hf
from d2v_engine.models.registry import ModelSpec, get_spec, with_model_config
from d2v_engine.safe_load import is_refusal, unsafe_error


def quiet_transformers() -> None:
    """No progress bars or load reports from transformers: the d2v commands print their own line."""
    logging = require_transformers().utils.logging
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_hf_model(hf_dir: str | Path) -> nn.Module:
    """The Data2Vec base model saved in `hf_dir` (local files only, nothing downloads), in eval mode.

    Raises:
        UserError: not a model folder, not a Data2Vec model, or unreadable weights.
    """
    transformers = require_transformers()
    path = Path(hf_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"'{hf_dir}' is not a Hugging Face model folder (it has no config.json); pass a "
                        f"folder written by `save_pretrained`.")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in MODEL_TYPES:
        raise UserError(f"'{hf_dir}' holds a '{model_type}' model, not a Data2Vec one; d2v reads "
                        f"{', '.join(MODEL_TYPES)} models.")
    try:
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    except Exception as err:  # a missing, truncated or mismatched weights file means the same to the user
        if is_refusal(err):   # transformers unpickles a pytorch_model.bin weights only
            raise unsafe_error(f"the Hugging Face model in '{hf_dir}'", err,
                               "ask its source for a safetensors copy (model.safetensors)") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"the Hugging Face model in '{hf_dir}' cannot be loaded ({first}).") from None
    return model.eval()


def _tokenizer_path(cfg: Config) -> str | None:
    """The run's tokenizer file as the data loader would find it, or None when there is none yet."""
    from d2v_engine.data.shards import list_shards
    from d2v_engine.data.webdataset import find_tokenizer

    shards = list_shards(cfg.data.path) or [Path(cfg.data.path) / "shard.tar"]
    try:
        return find_tokenizer(cfg, shards)
    except UserError:
        return None


def _check_fits(hf_dir: str | Path, got: ModelSpec, want: ModelSpec, cfg: Config) -> list[str]:
    """Refuse an HF model of another shape than `model.name`; returns notes on harmless differences."""
    name = cfg.model.name
    diffs = architecture_diff(got, want)
    if diffs:
        raise UserError(f"the Hugging Face model in '{hf_dir}' does not have the shape of model '{name}' "
                        f"({'; '.join(diffs[:3])}); set model.name to a model of its shape.")
    if got.modality == "text" and (path := _tokenizer_path(cfg)) is not None:
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
        if vocab != got.vocab_size:
            raise UserError(f"the Hugging Face model in '{hf_dir}' has {got.vocab_size} token embeddings but the "
                            f"config's tokenizer '{path}' has {vocab} entries; use the model's tokenizer.")
    notes = []
    if got.transformer.norm_eps != want.transformer.norm_eps:
        notes.append(f"layer-norm eps is {got.transformer.norm_eps:g} in the Hugging Face model and "
                     f"{want.transformer.norm_eps:g} in model '{name}': d2v uses the latter.")
    if got.modality == "audio" and got.pos_conv_padding != want.pos_conv_padding:
        notes.append(f"the position convolution pads with {got.pos_conv_padding} in the Hugging Face model and "
                     f"{want.pos_conv_padding} in model '{name}': d2v uses the latter.")
    return notes


def _fresh_head(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """The regression head's state at a fresh initialisation (HF models have no data2vec head)."""
    from d2v_engine.models.data2vec import build_head

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = build_head(spec.head, spec.transformer.dim)
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def hf_import(hf_dir: str | Path, config: str | Path, out: str | Path,
              overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """`d2v hf-import`: a Hugging Face Data2Vec folder -> a weights file for `run.init_from`.

    Args:
        hf_dir: a folder written by `save_pretrained` (a Data2Vec vision, audio or text model).
        config: the pretraining config the weights are for (its `model.name` decides the shape).
        out: the weights file to write (replaced atomically).
        overrides: `section.key=value` config overrides.
    Returns:
        What was written (the `d2v export` layout), plus `notes`: sentences on harmless differences.
    Raises:
        UserError: another model type, shape or vocabulary than the config's model.
    """
    cfg = load_config(config, list(overrides))
    want = with_model_config(get_spec(cfg.model.name), cfg.model)
    hf_model = load_hf_model(hf_dir)
    modality = MODEL_TYPES[hf_model.config.model_type]
    if modality != want.modality:
        article = {"image": "an", "audio": "an", "text": "a"}
        raise UserError(f"'{hf_dir}' holds {article[modality]} {modality} model but model.name={cfg.model.name} "
                        f"is {article[want.modality]} {want.modality} model; pass a config of the same modality.")
    got = spec_from_hf_config(hf_model.config, like=want)
    notes = _check_fits(hf_dir, got, want, cfg)
    encoder = from_hf(hf_model, like=want)
    student = encoder.state_dict()
    # The teacher starts as the student's copy: every parameter it owns (not those shared via the
    # input). The tensors are the student's; save_export writes them twice, as safetensors must.
    teacher = {n: p.detach() for n, p in encoder.named_parameters() if n.split(".")[0] not in encoder.teacher_exclude}
    exported = {"format": EXPORT_FORMAT, "model": cfg.model.name, "step": 0, "tag": "hf-import",
                "world_size": 1, "zero_stage": 0, "config": cfg.to_dict(), "source": str(hf_dir),
                "student": student, "head": _fresh_head(encoder.spec, cfg.seed), "teacher": teacher}
    save_export(exported, out)
    return {**exported, "notes": notes}


def _tokenizer(cfg: Config, spec: ModelSpec):
    """The run's tokenizer as a `transformers` fast tokenizer that adds `<s> ... </s>` as d2v does."""
    from tokenizers import Tokenizer, processors

    path = _tokenizer_path(cfg)
    if path is None:
        raise UserError(f"the run's tokenizer cannot be found (data.tokenizer, or tokenizer.json beside "
                        f"data.path '{cfg.data.path}'); the text export needs it.")
    tokenizer = Tokenizer.from_file(path)
    # d2v's TextEncoder adds <s> and </s> itself, whatever post-processor the file has: so must HF.
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", eos), ("<s>", bos))
    return require_transformers().PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", sep_token="</s>",
        cls_token="<s>", pad_token="<pad>", mask_token="<mask>",
        model_max_length=min(cfg.data.max_tokens, spec.max_positions))


def save_preprocessor(cfg: Config, spec: ModelSpec, out: Path) -> None:
    """Write the HF preprocessing that matches the run's eval inputs (`probes.*Inputs`) into `out`."""
    build_preprocessor(cfg, spec).save_pretrained(out)


def build_preprocessor(cfg: Config, spec: ModelSpec):
    """The HF preprocessing of the run's eval inputs: an image processor, a feature extractor or a tokenizer."""
    transformers = require_transformers()
    d = cfg.data
    if spec.modality == "image":
        size = d.image_size or spec.image_size
        # Shorter side to `size` (bicubic), centre crop, [0, 1], the run's mean/std: probes.ImageInputs.
        return transformers.BeitImageProcessorPil(
            do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
            crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
            do_normalize=True, image_mean=list(d.mean), image_std=list(d.std))
    if spec.modality == "audio":
        return transformers.Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=d.sample_rate, padding_value=0.0, do_normalize=True,
            return_attention_mask=True)
    return _tokenizer(cfg, spec)


def hf_export(run_dir: str | Path, out: str | Path, tag: str | None = None,
              weights: str = "student") -> dict[str, Any]:
    """`d2v hf-export`: a run's checkpoint -> a folder `transformers` loads with `from_pretrained`.

    Args:
        run_dir: the run's directory (`run.dir`).
        out: the folder to write (created; existing files of the same names are replaced).
        tag: checkpoint tag; None = the one `checkpoints/latest` names.
        weights: `student`, or `teacher` (the EMA weights over the student's).
    Returns:
        {"model", "modality", "step", "tag", "weights", "files"}.
    """
    cfg = load_run_config(run_dir)
    found = load_run_weights(run_dir, tag)
    encoder = build_run_encoder(cfg, found, weights)   # the model section's overrides, dropouts included
    model = to_hf(encoder)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_preprocessor(cfg, encoder.spec, out)
    return {"model": cfg.model.name, "modality": encoder.modality, "step": found.step,
            "tag": found.tag, "weights": weights, "files": sorted(p.name for p in out.iterdir())}
