"""Named model configurations: `debug`, `base` and `large` per modality (and `image_small`).

An explicit dict, nothing registered by import side effect. The base and large entries follow the
published data2vec 1.0 recipes (see the README's notes on sources); the debug entries keep each
front-end's structure at a width that trains in seconds on a CPU. The `*_v2` entries are the
data2vec 2.0 architectures where they differ from 1.0: images (post-LN blocks with q/k/v biases, fixed
sin-cos positions, a LayerNorm before the blocks, no layer scale, no relative position bias) and audio
(ALiBi attention biases); data2vec 2.0 text keeps the 1.0 RoBERTa layout.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from d2v_engine.models.spec import WAV2VEC_CONV, Modality, ModelSpec, TransformerSpec, with_overrides

__all__ = ["MODEL_REGISTRY", "ModelSpec", "TransformerSpec", "build_encoder", "get_spec", "with_model_config",
           "with_overrides"]


def _image(dim, depth, heads, **kw) -> TransformerSpec:
    base = dict(dim=dim, depth=depth, heads=heads, ffn_dim=4 * dim, pre_ln=True, layer_scale=0.1,
                norm_eps=1e-6, dropout=0.0, attn_dropout=0.0, key_bias=False, target_output="block")
    return TransformerSpec(**{**base, **kw})


def _post_ln(dim, depth, heads, **kw) -> TransformerSpec:
    base = dict(dim=dim, depth=depth, heads=heads, ffn_dim=4 * dim, pre_ln=False, norm_eps=1e-5,
                dropout=0.1, attn_dropout=0.1, act_dropout=0.0, target_output="ffn")
    return TransformerSpec(**{**base, **kw})


def _image_v2(dim, depth, heads, **kw) -> TransformerSpec:
    # fairseq data2vec2 AltBlock with layer_norm_first=False, qkv_bias=True, norm_eps 1e-6
    base = dict(dim=dim, depth=depth, heads=heads, ffn_dim=4 * dim, pre_ln=False, norm_eps=1e-6,
                dropout=0.0, attn_dropout=0.0, act_dropout=0.0, key_bias=True, target_output="ffn")
    return TransformerSpec(**{**base, **kw})


_IMAGE_V2 = dict(rel_pos_bias="none", pooling="mean", pos_embed="sincos", embed_norm=True, init="data2vec2")
_DEBUG_CONV = ((64, 10, 5),) + ((64, 3, 2),) * 4 + ((64, 2, 2),) * 2

MODEL_REGISTRY: dict[str, ModelSpec] = {
    # images: BEiT-style ViT, 16x16 patches for base/large (data2vec_vision README recipes)
    "image_debug": ModelSpec("image", _image(64, 4, 4), image_size=28, patch_size=4),
    "image_small": ModelSpec("image", _image(192, 6, 3), image_size=28, patch_size=4),
    "image_base": ModelSpec("image", _image(768, 12, 12, layer_scale=1e-4, attn_dropout=0.05, drop_path=0.25)),
    "image_large": ModelSpec("image", _image(1024, 24, 16, layer_scale=1e-5, attn_dropout=0.15, drop_path=0.2)),
    # images, data2vec 2.0 (base_images_only_task.yaml: 2 prenet + 10 blocks; large: 24 blocks)
    "image_debug_v2": ModelSpec("image", _image_v2(64, 4, 4), image_size=28, patch_size=4, **_IMAGE_V2),
    "image_small_v2": ModelSpec("image", _image_v2(192, 6, 3), image_size=28, patch_size=4, **_IMAGE_V2),
    "image_base_v2": ModelSpec("image", _image_v2(768, 12, 12), **_IMAGE_V2),
    "image_large_v2": ModelSpec("image", _image_v2(1024, 24, 16), **_IMAGE_V2),
    # audio: wav2vec 2.0 CNN + 5-layer conv positions + post-LN blocks (base_librispeech.yaml)
    # Pretrains on single spoken words (~1 s, 50 frames), shorter than the 91-frame receptive field of
    # the position convolution: circular padding, so that no frame knows its index (see the field).
    "audio_debug": ModelSpec("audio", _post_ln(128, 4, 4, dropout=0.0, attn_dropout=0.0), conv_layers=_DEBUG_CONV,
                             pos_conv_padding="circular"),
    "audio_base": ModelSpec("audio", _post_ln(768, 12, 12, layerdrop=0.05)),
    "audio_large": ModelSpec("audio", _post_ln(1024, 24, 16, layerdrop=0.05)),
    # audio, data2vec 2.0 (base_audio_only_task.yaml): the same encoder with ALiBi attention biases
    "audio_debug_v2": ModelSpec("audio", _post_ln(128, 4, 4, dropout=0.0, attn_dropout=0.0), conv_layers=_DEBUG_CONV,
                                pos_conv_padding="circular", alibi=True),
    "audio_base_v2": ModelSpec("audio", _post_ln(768, 12, 12, layerdrop=0.05), alibi=True),
    "audio_large_v2": ModelSpec("audio", _post_ln(1024, 16 + 8, 16, layerdrop=0.05), alibi=True),
    # text: RoBERTa layout, post-LN, 2-layer regression head (data2vec_text.py)
    "text_debug": ModelSpec("text", _post_ln(128, 4, 4, dropout=0.0, attn_dropout=0.0), head="mlp",
                            max_positions=128),
    "text_base": ModelSpec("text", _post_ln(768, 12, 12), head="mlp"),
    "text_large": ModelSpec("text", _post_ln(1024, 24, 16), head="mlp"),
}


def get_spec(name: str) -> ModelSpec:
    """The registered spec called `name` (KeyError if there is none; config validation checks first)."""
    return MODEL_REGISTRY[name]


def with_model_config(spec: ModelSpec, model) -> ModelSpec:
    """`spec` with what a config's `model` section overrides (None fields keep the registry's values)."""
    spec = with_overrides(spec, dropout=model.dropout, drop_path=model.drop_path, layerdrop=model.layerdrop)
    if model.pos_conv_padding is not None:
        spec = dataclasses.replace(spec, pos_conv_padding=model.pos_conv_padding)
    return spec


def build_encoder(spec: ModelSpec) -> nn.Module:
    """The modality's encoder (front-end + shared Transformer), freshly initialised."""
    if spec.modality == "image":
        from d2v_engine.models.image import ImageEncoder
        return ImageEncoder(spec)
    if spec.modality == "audio":
        from d2v_engine.models.audio import AudioEncoder
        return AudioEncoder(spec)
    from d2v_engine.models.text import TextEncoder
    return TextEncoder(spec)
