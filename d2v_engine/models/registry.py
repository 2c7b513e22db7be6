"""Named model configurations: `debug`, `base` and `large` per modality (and `image_small`).

An explicit dict, nothing registered by import side effect. The base and large entries follow the
published data2vec 1.0 recipes (see the README's notes on sources); the debug entries keep each
front-end's structure at a width that trains in seconds on a CPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from torch import nn

Modality = Literal["image", "audio", "text"]

WAV2VEC_CONV = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
"""The 7-layer CNN of wav2vec 2.0 / data2vec audio: (channels, kernel, stride); 16 kHz -> 50 Hz."""


@dataclass(frozen=True)
class TransformerSpec:
    dim: int
    """Model width C."""
    depth: int
    """Number of blocks."""
    heads: int
    """Attention heads."""
    ffn_dim: int
    """Hidden width of the feed-forward network."""
    pre_ln: bool
    """Pre-LN blocks (BEiT, images) or post-LN blocks (wav2vec 2.0 / RoBERTa)."""
    layer_scale: float = 0.0
    """Initial value of the per-channel residual scales (BEiT gamma_1/gamma_2); 0 = no layer scale."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    dropout: float = 0.1
    """Dropout after attention and FFN outputs."""
    attn_dropout: float = 0.1
    """Dropout on attention probabilities."""
    act_dropout: float = 0.0
    """Dropout after the FFN activation."""
    drop_path: float = 0.0
    """Stochastic depth of the last block (linear in depth from 0)."""
    layerdrop: float = 0.0
    """Probability of skipping a block while training."""
    key_bias: bool = True
    """Bias on the key projection (BEiT has none)."""
    target_output: Literal["ffn", "block"] = "ffn"
    """Which block output the teacher hands out: the FFN output before the residual, or the block output."""


@dataclass(frozen=True)
class ModelSpec:
    modality: Modality
    transformer: TransformerSpec
    head: Literal["linear", "mlp"] = "linear"
    """Student regression head: Linear(C, C), or Linear(C, 2C) -> GELU -> Linear(2C, C) (text)."""
    # images
    image_size: int = 224
    """Input height and width in pixels."""
    patch_size: int = 16
    """Square patch size."""
    in_chans: int = 3
    """Input channels."""
    rel_pos_bias: Literal["shared", "layer", "none"] = "shared"
    """Relative position bias: one table shared by all blocks (BEiT / data2vec-vision pretraining), one
    per block (the fine-tuned data2vec-vision checkpoints), or none."""
    pooling: Literal["cls", "mean"] = "cls"
    """`cls`: a final LayerNorm on every token (pretraining); `mean`: no final LayerNorm, as in the
    fine-tuned checkpoints, whose norm moves to the pooled patch mean outside the encoder."""
    # audio
    conv_layers: tuple[tuple[int, int, int], ...] = WAV2VEC_CONV
    """Feature-extractor CNN: (channels, kernel, stride) per layer."""
    pos_conv_depth: int = 5
    """Convolutional positional embedding: number of conv layers."""
    pos_conv_kernel: int = 19
    """Convolutional positional embedding: kernel size of each layer."""
    pos_conv_groups: int = 16
    """Convolutional positional embedding: groups of each layer."""
    pos_conv_padding: Literal["zeros", "circular"] = "zeros"
    """Convolutional positional embedding: padding of each layer. `zeros` is data2vec's; with it a frame
    within the receptive field of an edge can tell its index, and on clips no longer than that field
    (single words) student and teacher can agree on targets that depend on the index alone, a
    collapse instance norm does not prevent. `circular` leaves the encoder no absolute position."""
    dropout_input: float = 0.0
    """Dropout on the projected CNN features (student only: the teacher runs in eval mode)."""
    # text
    vocab_size: int = 50265
    """Token vocabulary (replaced by the tokenizer's size when the model is built for data)."""
    max_positions: int = 512
    """Longest sequence (learned positions; RoBERTa layout adds padding_idx + 1 rows)."""
    pad_idx: int = 1
    """Padding token id (RoBERTa: <s>=0, <pad>=1, </s>=2, <unk>=3)."""

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _image(dim, depth, heads, **kw) -> TransformerSpec:
    base = dict(dim=dim, depth=depth, heads=heads, ffn_dim=4 * dim, pre_ln=True, layer_scale=0.1,
                norm_eps=1e-6, dropout=0.0, attn_dropout=0.0, key_bias=False, target_output="block")
    return TransformerSpec(**{**base, **kw})


def _post_ln(dim, depth, heads, **kw) -> TransformerSpec:
    base = dict(dim=dim, depth=depth, heads=heads, ffn_dim=4 * dim, pre_ln=False, norm_eps=1e-5,
                dropout=0.1, attn_dropout=0.1, act_dropout=0.0, target_output="ffn")
    return TransformerSpec(**{**base, **kw})


_DEBUG_CONV = ((64, 10, 5),) + ((64, 3, 2),) * 4 + ((64, 2, 2),) * 2

MODEL_REGISTRY: dict[str, ModelSpec] = {
    # images: BEiT-style ViT, 16x16 patches for base/large (data2vec_vision README recipes)
    "image_debug": ModelSpec("image", _image(64, 4, 4), image_size=28, patch_size=4),
    "image_small": ModelSpec("image", _image(192, 6, 3), image_size=28, patch_size=4),
    "image_base": ModelSpec("image", _image(768, 12, 12, layer_scale=1e-4, attn_dropout=0.05, drop_path=0.25)),
    "image_large": ModelSpec("image", _image(1024, 24, 16, layer_scale=1e-5, attn_dropout=0.15, drop_path=0.2)),
    # audio: wav2vec 2.0 CNN + 5-layer conv positions + post-LN blocks (base_librispeech.yaml)
    # Pretrains on single spoken words (~1 s, 50 frames), shorter than the 91-frame receptive field of
    # the position convolution: circular padding, so that no frame knows its index (see the field).
    "audio_debug": ModelSpec("audio", _post_ln(128, 4, 4, dropout=0.0, attn_dropout=0.0), conv_layers=_DEBUG_CONV,
                             pos_conv_padding="circular"),
    "audio_base": ModelSpec("audio", _post_ln(768, 12, 12, layerdrop=0.05)),
    "audio_large": ModelSpec("audio", _post_ln(1024, 24, 16, layerdrop=0.05)),
    # text: RoBERTa layout, post-LN, 2-layer regression head (data2vec_text.py)
    "text_debug": ModelSpec("text", _post_ln(128, 4, 4, dropout=0.0, attn_dropout=0.0), head="mlp",
                            max_positions=128),
    "text_base": ModelSpec("text", _post_ln(768, 12, 12), head="mlp"),
    "text_large": ModelSpec("text", _post_ln(1024, 24, 16), head="mlp"),
}


def get_spec(name: str) -> ModelSpec:
    """The registered spec called `name` (KeyError if there is none; config validation checks first)."""
    return MODEL_REGISTRY[name]


def with_overrides(spec: ModelSpec, **transformer_overrides) -> ModelSpec:
    """A copy of `spec` with Transformer fields replaced where the value is not None."""
    changes = {k: v for k, v in transformer_overrides.items() if v is not None}
    return dataclasses.replace(spec, transformer=dataclasses.replace(spec.transformer, **changes))


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
