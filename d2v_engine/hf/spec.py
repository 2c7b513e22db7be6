"""Model specs <-> Hugging Face Data2Vec configs.

`spec_from_hf_config` reads what a `Data2VecVisionConfig` / `Data2VecAudioConfig` /
`Data2VecTextConfig` says about the architecture (and its dropouts) into a `ModelSpec`;
`hf_config_from_spec` writes it back. What a Hugging Face config cannot say (the pretraining-only
fields `head` and `target_output`, and dropouts the HF model lacks, such as an image model's
layerdrop) comes from a `like` spec, else from the modality's defaults, so that
`spec_from_hf_config(hf_config_from_spec(s), like=s) == s` for every registry spec.

Variants our encoders do not implement (absolute image positions, per-block plus shared relative
position biases together, audio adapters or conv biases, activations other than exact GELU, decoder
text models) are refused with one sentence.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from d2v_engine.errors import UserError
from d2v_engine.models.spec import ModelSpec, TransformerSpec

MODEL_TYPES = {"data2vec-vision": "image", "data2vec-audio": "audio", "data2vec-text": "text"}
"""Hugging Face `model_type` -> our modality."""

_DEFAULTS = {
    "image": dict(head="linear", target_output="block"),
    "audio": dict(head="linear", target_output="ffn"),
    "text": dict(head="mlp", target_output="ffn"),
}
"""Pretraining-only fields per modality when no `like` spec is given (the registry's choices)."""

ARCHITECTURE = {
    "transformer": ("dim", "depth", "heads", "ffn_dim", "pre_ln", "key_bias"),
    "image": ("image_size", "patch_size", "in_chans", "rel_pos_bias", "pooling"),
    "audio": ("conv_layers", "pos_conv_depth", "pos_conv_kernel", "pos_conv_groups"),
    "text": ("max_positions", "pad_idx"),
}
"""Spec fields that decide the parameters' names and shapes (text `vocab_size` aside: the tokenizer's)."""


def require_transformers():
    """The `transformers` module, or a one-sentence UserError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face interop needs the `transformers` package; install it with "
                        "`pip install d2v_engine[hf]`.") from None
    return transformers


def _require(ok: bool, sentence: str) -> None:
    if not ok:
        raise UserError(sentence)


def _square(value: Any, what: str) -> int:
    """An int, or a pair of equal ints (HF accepts both for image and patch sizes)."""
    if isinstance(value, (list, tuple)):
        _require(len(value) == 2 and value[0] == value[1],
                 f"the Hugging Face model's {what} {tuple(value)} is not square; our image encoder needs square ones.")
        value = value[0]
    return int(value)


def _common_checks(config, modality: str) -> None:
    _require(config.hidden_act == "gelu", f"the Hugging Face model uses hidden_act='{config.hidden_act}'; "
                                          f"our encoders implement exact GELU ('gelu') only.")
    if modality == "text":
        _require(not getattr(config, "is_decoder", False) and not getattr(config, "add_cross_attention", False),
                 "the Hugging Face text model is configured as a decoder; import an encoder (is_decoder=False).")


def _vision_fields(c) -> tuple[dict, dict]:
    _require(not c.use_absolute_position_embeddings, "the Hugging Face vision model uses absolute position "
                                                     "embeddings, which our image encoder does not have.")
    _require(not (c.use_relative_position_bias and c.use_shared_relative_position_bias),
             "the Hugging Face vision model uses a shared and a per-layer relative position bias at once; "
             "our image encoder takes one of them.")
    rel = ("shared" if c.use_shared_relative_position_bias else
           "layer" if c.use_relative_position_bias else "none")
    t = dict(pre_ln=True, key_bias=False, layer_scale=float(c.layer_scale_init_value),
             dropout=float(c.hidden_dropout_prob), attn_dropout=float(c.attention_probs_dropout_prob),
             drop_path=float(c.drop_path_rate))
    m = dict(image_size=_square(c.image_size, "image_size"), patch_size=_square(c.patch_size, "patch_size"),
             in_chans=int(c.num_channels), rel_pos_bias=rel, pooling="mean" if c.use_mean_pooling else "cls")
    return t, m


def _audio_fields(c) -> tuple[dict, dict]:
    _require(c.feat_extract_activation == "gelu", f"the Hugging Face audio model's CNN uses "
                                                  f"'{c.feat_extract_activation}'; ours uses GELU.")
    _require(not c.conv_bias, "the Hugging Face audio model's CNN has biases (conv_bias=True); ours has none.")
    _require(not c.add_adapter, "the Hugging Face audio model has an adapter (add_adapter=True), which our "
                                "audio encoder does not have.")
    t = dict(pre_ln=False, key_bias=True, layer_scale=0.0, dropout=float(c.hidden_dropout),
             attn_dropout=float(c.attention_dropout), act_dropout=float(c.activation_dropout),
             layerdrop=float(c.layerdrop))
    conv = tuple((int(d), int(k), int(s)) for d, k, s in zip(c.conv_dim, c.conv_kernel, c.conv_stride))
    m = dict(conv_layers=conv, pos_conv_depth=int(c.num_conv_pos_embeddings), pos_conv_padding="zeros",
             pos_conv_kernel=int(c.conv_pos_kernel_size), pos_conv_groups=int(c.num_conv_pos_embedding_groups),
             dropout_input=float(c.feat_proj_dropout))
    return t, m


def _text_fields(c) -> tuple[dict, dict]:
    pad = int(c.pad_token_id)
    # RoBERTa positions start at pad + 1: the table's first pad + 1 rows are never a real token's.
    max_positions = int(c.max_position_embeddings) - pad - 1
    _require(max_positions > 0, f"the Hugging Face text model has {c.max_position_embeddings} position rows, "
                                f"too few for RoBERTa positions after pad_token_id={pad}.")
    t = dict(pre_ln=False, key_bias=True, layer_scale=0.0, dropout=float(c.hidden_dropout_prob),
             attn_dropout=float(c.attention_probs_dropout_prob))
    m = dict(vocab_size=int(c.vocab_size), max_positions=max_positions, pad_idx=pad)
    return t, m


_FIELDS = {"image": _vision_fields, "audio": _audio_fields, "text": _text_fields}


def spec_from_hf_config(config, like: ModelSpec | None = None) -> ModelSpec:
    """The model spec of a Hugging Face Data2Vec config.

    Args:
        config: a `Data2VecVisionConfig`, `Data2VecAudioConfig` or `Data2VecTextConfig`.
        like: a spec of the same modality that supplies what the HF config does not describe
            (regression head, target output, dropouts the HF model lacks); None = modality defaults.
    Returns:
        The ModelSpec whose encoder computes what the HF model computes.
    Raises:
        UserError: another model type, or a variant our encoders do not implement.
    """
    modality = MODEL_TYPES.get(getattr(config, "model_type", None))
    _require(modality is not None, f"'{getattr(config, 'model_type', type(config).__name__)}' is not a "
                                   f"Data2Vec model; import one of {', '.join(MODEL_TYPES)}.")
    if like is not None and like.modality != modality:
        raise UserError(f"the Hugging Face model is a '{modality}' model but `like` is a '{like.modality}' one; "
                        f"pass a spec of the same modality.")
    _common_checks(config, modality)
    t_fields, m_fields = _FIELDS[modality](config)
    t_fields.update(dim=int(config.hidden_size), depth=int(config.num_hidden_layers),
                    heads=int(config.num_attention_heads), ffn_dim=int(config.intermediate_size),
                    norm_eps=float(config.layer_norm_eps))
    if like is not None:
        return dataclasses.replace(like, transformer=dataclasses.replace(like.transformer, **t_fields), **m_fields)
    defaults = _DEFAULTS[modality]
    transformer = TransformerSpec(**t_fields, target_output=defaults["target_output"])
    return ModelSpec(modality, transformer, head=defaults["head"], **m_fields)


def _vision_config(spec: ModelSpec) -> dict:
    t = spec.transformer
    return dict(hidden_dropout_prob=t.dropout, attention_probs_dropout_prob=t.attn_dropout,
                drop_path_rate=t.drop_path, layer_scale_init_value=t.layer_scale,
                image_size=spec.image_size, patch_size=spec.patch_size, num_channels=spec.in_chans,
                use_mask_token=True, use_absolute_position_embeddings=False,
                use_relative_position_bias=spec.rel_pos_bias == "layer",
                use_shared_relative_position_bias=spec.rel_pos_bias == "shared",
                use_mean_pooling=spec.pooling == "mean")


def _audio_config(spec: ModelSpec) -> dict:
    t = spec.transformer
    dims, kernels, strides = (list(x) for x in zip(*spec.conv_layers))
    return dict(hidden_dropout=t.dropout, attention_dropout=t.attn_dropout, activation_dropout=t.act_dropout,
                feat_proj_dropout=spec.dropout_input, layerdrop=t.layerdrop, feat_extract_activation="gelu",
                conv_dim=dims, conv_kernel=kernels, conv_stride=strides, conv_bias=False,
                num_conv_pos_embeddings=spec.pos_conv_depth, conv_pos_kernel_size=spec.pos_conv_kernel,
                num_conv_pos_embedding_groups=spec.pos_conv_groups)


def _text_config(spec: ModelSpec) -> dict:
    t = spec.transformer
    # type_vocab_size 1 with a zero row, as in the converted data2vec-text checkpoints: no segments.
    return dict(vocab_size=spec.vocab_size, hidden_dropout_prob=t.dropout,
                attention_probs_dropout_prob=t.attn_dropout,
                max_position_embeddings=spec.max_positions + spec.pad_idx + 1, type_vocab_size=1,
                pad_token_id=spec.pad_idx, bos_token_id=0, eos_token_id=2)


def hf_config_from_spec(spec: ModelSpec):
    """The Hugging Face config of the model `spec` describes.

    Args:
        spec: an image, audio or text ModelSpec.
    Returns:
        A `Data2VecVisionConfig`, `Data2VecAudioConfig` or `Data2VecTextConfig`.
    Raises:
        UserError: the spec has a feature the Hugging Face model cannot express.
    """
    transformers = require_transformers()
    t = spec.transformer
    image = spec.modality == "image"
    _require(spec.pos_embed == "none" and not spec.embed_norm and not spec.alibi,
             "the Hugging Face Data2Vec models have no data2vec 2.0 parts (sin-cos image positions, a norm "
             "before the first block, ALiBi attention biases): transformers has no data2vec 2.0 models "
             "(transformers#23069).")
    _require(t.pre_ln == image and t.key_bias != image,
             f"a {spec.modality} model with pre_ln={t.pre_ln} and key_bias={t.key_bias} has no Hugging Face "
             f"Data2Vec counterpart.")
    _require(image or t.layer_scale == 0, f"the Hugging Face {spec.modality} model has no layer scale; "
                                          f"export a spec with layer_scale=0.")
    _require(spec.modality != "audio" or spec.pos_conv_padding == "zeros",
             "the Hugging Face audio model pads its position convolution with zeros, this one is circular "
             "(audio_debug's default); pretrain with model.pos_conv_padding=zeros to export it.")
    fields = {"image": _vision_config, "audio": _audio_config, "text": _text_config}[spec.modality](spec)
    cls = {"image": transformers.Data2VecVisionConfig, "audio": transformers.Data2VecAudioConfig,
           "text": transformers.Data2VecTextConfig}[spec.modality]
    return cls(hidden_size=t.dim, num_hidden_layers=t.depth, num_attention_heads=t.heads,
               intermediate_size=t.ffn_dim, hidden_act="gelu", layer_norm_eps=t.norm_eps, **fields)


def architecture_diff(got: ModelSpec, want: ModelSpec) -> list[str]:
    """The architecture fields (see `ARCHITECTURE`) on which two specs disagree, as `name: got vs want`.

    Layer scale counts by presence only: its value is an initialisation, but it decides whether the
    `lambda_1/2` parameters exist.
    """
    if got.modality != want.modality:
        return [f"modality: {got.modality} vs {want.modality}"]
    diffs = [f"{name}: {getattr(got.transformer, name)} vs {getattr(want.transformer, name)}"
             for name in ARCHITECTURE["transformer"]
             if getattr(got.transformer, name) != getattr(want.transformer, name)]
    if (got.transformer.layer_scale > 0) != (want.transformer.layer_scale > 0):
        diffs.append(f"layer scale: {got.transformer.layer_scale > 0} vs {want.transformer.layer_scale > 0}")
    diffs += [f"{name}: {getattr(got, name)} vs {getattr(want, name)}"
              for name in ARCHITECTURE[got.modality] if getattr(got, name) != getattr(want, name)]
    return diffs
