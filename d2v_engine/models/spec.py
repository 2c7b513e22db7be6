"""Model specifications: what an encoder is built from (`ModelSpec`, `TransformerSpec`).

A module of its own so that the encoders and the registry both import it, and neither imports the
other. `models.registry` names the configurations; `build_encoder` turns one into a module.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

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
    fine-tuned checkpoints, whose norm moves to the pooled patch mean outside the encoder (and the
    data2vec 2.0 image model, a post-LN stack without a final norm)."""
    pos_embed: Literal["none", "sincos"] = "none"
    """Absolute patch positions: none (BEiT: the relative position bias alone) or data2vec 2.0's fixed
    2-D sin-cos table (MAE's), added to the patch embeddings before any patch is dropped."""
    embed_norm: bool = False
    """A LayerNorm on the token sequence (CLS + patches) before the first block: data2vec 2.0's
    post-LN image prenet starts with one."""
    init: Literal["beit", "data2vec2"] = "beit"
    """Image initialisation: BEiT's (truncated normal, depth-scaled output projections, CLS std 0.02) or
    data2vec 2.0's (BERT normal(0.02) Linear layers, Xavier patch projection, CLS token N(0, 1))."""
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
    alibi: bool = False
    """ALiBi attention bias (data2vec 2.0 audio): -slope_h * scale_h * |i - j| on every block, fixed
    geometric slopes per head, a learned non-negative scale per head (init 1), shared by the blocks."""
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


def with_overrides(spec: ModelSpec, **transformer_overrides) -> ModelSpec:
    """A copy of `spec` with Transformer fields replaced where the value is not None."""
    changes = {k: v for k, v in transformer_overrides.items() if v is not None}
    return dataclasses.replace(spec, transformer=dataclasses.replace(spec.transformer, **changes))
