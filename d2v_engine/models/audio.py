"""Audio encoder of data2vec audio 1.0 (Hugging Face Data2VecAudio layout).

Local features (shared by student and teacher, computed once in `views`): a 1-D CNN on the waveform,
each layer Conv1d -> LayerNorm over channels -> GELU, then LayerNorm + Linear to the model width.
Encoder (`forward`): mask embedding, a multi-layer convolutional position embedding, LayerNorm,
post-LN Transformer blocks, no final LayerNorm.

data2vec 2.0 (fairseq `modalities/audio.py`): given `visible`, each clone row's masked frames are
zeroed (no mask embedding), the position convolution runs over the whole clone, and only the visible
frames go on to the LayerNorm and the blocks. `spec.alibi` adds ALiBi attention biases (`AlibiBias`),
which relate the visible frames by their original positions.
"""
from __future__ import annotations

import math
from typing import Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v_engine.models.encoder import (EncoderOutput, LayerCallback, TransformerEncoder, Views, Visible,
                                       gather_visible, init_linear_)
from d2v_engine.models.spec import ModelSpec

Length = TypeVar("Length", int, Tensor)

POS_CONV_EPS = 1e-5
"""Epsilon of the position convolution's LayerNorms: PyTorch's default, which fairseq and Hugging Face
use there whatever the model's `layer_norm_eps`."""


def conv_output_length(conv_layers: Sequence[tuple[int, int, int]], num_samples: Length) -> Length:
    """Frames the feature-extractor CNN produces from `num_samples` samples (unpadded convolutions).

    A frame counts only if its whole receptive field lies inside the samples.

    Args:
        conv_layers: (channels, kernel, stride) per layer (`ModelSpec.conv_layers`).
        num_samples: an int, or an int64 tensor of any shape.
    Returns:
        The frame count(s), same type and shape as `num_samples`, never negative.
    """
    n = num_samples
    for _, kernel, stride in conv_layers:
        n = (n - kernel) // stride + 1
        n = n.clamp(min=0) if isinstance(n, Tensor) else max(n, 0)
    return n


class ConvLayer(nn.Module):
    """Conv1d (no bias) -> LayerNorm over channels (affine) -> GELU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride, bias=False)
        self.layer_norm = nn.LayerNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C_in, S] -> [B, C_out, S']."""
        x = self.conv(x)
        return F.gelu(self.layer_norm(x.transpose(1, 2)).transpose(1, 2))


class FeatureExtractor(nn.Module):
    """The waveform CNN (16 kHz -> 50 Hz with the wav2vec 2.0 layers)."""

    def __init__(self, conv_layers: Sequence[tuple[int, int, int]]):
        super().__init__()
        channels = [1] + [c for c, _, _ in conv_layers]
        self.conv_layers = nn.ModuleList(ConvLayer(channels[i], c, k, s) for i, (c, k, s) in enumerate(conv_layers))

    def forward(self, audio: Tensor) -> Tensor:
        """audio: [B, S] -> [B, C_conv, T]."""
        x = audio.unsqueeze(1)
        for layer in self.conv_layers:
            x = layer(x)
        return x


class FeatureProjection(nn.Module):
    """LayerNorm over the CNN channels, then Linear to the model width."""

    def __init__(self, conv_dim: int, dim: int, eps: float):
        super().__init__()
        self.layer_norm = nn.LayerNorm(conv_dim, eps=eps)
        self.projection = nn.Linear(conv_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, T, C_conv] -> [B, T, C]."""
        return self.projection(self.layer_norm(x))


class PosConvLayer(nn.Module):
    """Grouped Conv1d that keeps the length -> LayerNorm (no affine) -> GELU.

    `padding`: `zeros` as in data2vec (frames within half a kernel of an edge see the zeros, which tells
    them where they are) or `circular` (the clip wraps around: no frame can tell its index).
    """

    def __init__(self, dim: int, kernel: int, groups: int, eps: float, padding: str = "zeros"):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups, padding_mode=padding)
        # An even kernel with padding k//2 yields one frame too many; the last one is dropped.
        self.trim = 1 if kernel % 2 == 0 else 0
        self.layer_norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, T] -> [B, C, T]."""
        x = self.conv(x)
        if self.trim:
            x = x[..., :-self.trim]
        return F.gelu(self.layer_norm(x.transpose(1, 2)).transpose(1, 2))


class PosConvEmbed(nn.Module):
    """Convolutional position embedding: `spec.pos_conv_depth` stacked `PosConvLayer`s."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        t = spec.transformer
        self.layers = nn.ModuleList(PosConvLayer(t.dim, spec.pos_conv_kernel, spec.pos_conv_groups, POS_CONV_EPS,
                                                 spec.pos_conv_padding)
                                    for _ in range(spec.pos_conv_depth))

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, T, C] -> the position embedding [B, T, C] (added to x by the caller)."""
        x = x.transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return x.transpose(1, 2)


def alibi_slopes(heads: int) -> Tensor:
    """ALiBi's per-head slopes (Press et al.): a geometric sequence from 2^(-8/n); for a head count
    that is not a power of two, the power-of-two sequence below it plus every other slope of the one
    above (fairseq's and the paper's recipe). Returns [heads] float32."""
    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(heads).is_integer():
        return torch.tensor(power_of_two(heads))
    below = 2 ** math.floor(math.log2(heads))
    return torch.tensor(power_of_two(below) + alibi_slopes(2 * below).tolist()[0::2][: heads - below])


class AlibiBias(nn.Module):
    """ALiBi attention bias with a learned, non-negative scale per head (data2vec 2.0 audio).

    bias[r, h, i, j] = -slope_h * max(scale_h, 0) * |pos_i - pos_j|, shared by every block.
    """

    def __init__(self, heads: int):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)
        self.scale = nn.Parameter(torch.ones(heads))

    def forward(self, positions: Tensor) -> Tensor:
        """positions: [R or 1, T] int64 steps -> [R or 1, H, T, T] float32 additive bias."""
        distance = (positions[:, :, None] - positions[:, None, :]).abs().float()
        slope = self.slopes * self.scale.float().clamp(min=0)
        return -slope[None, :, None, None] * distance[:, None]


class AudioEncoder(nn.Module):
    """data2vec audio 1.0 encoder.

    The teacher is `deepcopy(student)` with the `teacher_exclude` attributes set to None: the CNN and
    projection are shared through the input (`views`), `masked_spec_embed` is used only for the
    student's mask, and the position convolution is copied at every EMA update (`teacher_copy`).
    `forward` reads `masked_spec_embed` only when a mask is given, and never the other two.
    """

    modality = "audio"
    teacher_exclude: tuple[str, ...] = ("feature_extractor", "feature_projection", "masked_spec_embed")
    teacher_copy: tuple[str, ...] = ("pos_conv_embed",)
    teacher_copy_v2: tuple[str, ...] = ()
    """data2vec 2.0 averages the position convolution like the blocks (it shares only the CNN)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        t = spec.transformer
        self.spec, self.dim, self.num_layers = spec, t.dim, t.depth
        self.grad_checkpointing = False
        conv_dim = spec.conv_layers[-1][0]
        # local features
        self.feature_extractor = FeatureExtractor(spec.conv_layers)
        self.feature_projection = FeatureProjection(conv_dim, t.dim, t.norm_eps)
        # encoder
        self.dropout_input = nn.Dropout(spec.dropout_input)
        self.masked_spec_embed = nn.Parameter(torch.empty(t.dim))
        self.pos_conv_embed = PosConvEmbed(spec)
        self.layer_norm = nn.LayerNorm(t.dim, eps=t.norm_eps)
        self.dropout = nn.Dropout(t.dropout)
        self.alibi = AlibiBias(t.heads) if spec.alibi else None
        self.encoder = TransformerEncoder(t)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Kaiming-normal convolutions, normal(0.02) Linear layers, uniform [0, 1) mask embedding.

        Idempotent; a ZeRO-3 caller may re-run it while the parameters are gathered.
        """
        init_linear_(self)
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        nn.init.uniform_(self.masked_spec_embed)
        if self.alibi is not None:
            nn.init.ones_(self.alibi.scale)
            self.alibi.slopes.copy_(alibi_slopes(self.spec.transformer.heads))

    def local_features(self, audio: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """CNN features projected to the model width, and which frames are padding.

        Args:
            audio: [B, S] normalised waveform.
            padding_mask: [B, S] bool, True = padding sample, or None.
        Returns:
            (feats [B, T, C], frame padding mask [B, T] bool, True = padding, or None): a frame is
            padding unless its whole receptive field lies in the valid samples.
        """
        feats = self.feature_projection(self.feature_extractor(audio).transpose(1, 2))
        if padding_mask is None:
            return feats, None
        frames = conv_output_length(self.spec.conv_layers, (~padding_mask).sum(-1))
        frame_pad = torch.arange(feats.shape[1], device=feats.device)[None, :] >= frames[:, None]
        return feats, frame_pad

    def views(self, batch: dict[str, Tensor]) -> Views:
        """Local features computed once: the teacher reads them detached (the CNN is trained by the student).

        Args:
            batch: `audio` [B, S], `padding_mask` [B, S] bool, `mask` [B, T] bool.
        Returns:
            Views(feats [B, T, C], feats.detach(), frame padding mask [B, T] | None, mask [B, T]).
        """
        feats, frame_pad = self.local_features(batch["audio"], batch.get("padding_mask"))
        return Views(feats, feats.detach(), frame_pad, batch["mask"])

    def forward(self, x: Tensor, *, mask: Tensor | None = None, padding_mask: Tensor | None = None,
                top_k: int = 0, on_layer: LayerCallback | None = None,
                visible: Visible | None = None) -> EncoderOutput:
        """Encode local features.

        Args:
            x: [B, T, C] features from `local_features`.
            mask: [B, T] bool, True = frame replaced by `masked_spec_embed` (student only), or None.
            padding_mask: [B, T] bool, True = padding frame, or None.
            top_k: number of final blocks whose target outputs are returned.
            on_layer: streaming alternative to `layer_results` (see `TransformerEncoder.forward`).
            visible: 2.0 student: encode each clone row's visible frames only (`mask` unused).
        Returns:
            EncoderOutput: x [B, T, C] (last block output; [R, V, C] with `visible`), layer_results
            top_k x [B, T, C], padding_mask as given (with `visible`: of the visible slots), cls None.
        """
        # A teacher kept in bf16 receives the student's fp32 features: compute in the weights' dtype.
        h = self.dropout_input(x.to(self.layer_norm.weight.dtype))
        if visible is not None:
            # 2.0: every clone row runs the position convolution over its own copy, masked frames zeroed.
            h = h[visible.rows].masked_fill(visible.mask.unsqueeze(-1), 0.0)
            padding_mask = None if padding_mask is None else padding_mask[visible.rows]
        elif mask is not None:
            h = torch.where(mask.unsqueeze(-1), self.masked_spec_embed.to(h.dtype), h)
        if padding_mask is not None:
            # Zero padded frames so the position convolution sees silence there, whatever the CNN made.
            h = h.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        h = h + self.pos_conv_embed(h)
        positions = torch.arange(h.shape[1], device=h.device)[None]
        if visible is not None:
            h, positions, padding_mask = gather_visible(h, visible, per_copy=True), visible.keep, visible.padding
        h = self.dropout(self.layer_norm(h))
        bias = self.alibi(positions) if self.alibi is not None else None
        h, layers = self.encoder(h, attn_bias=bias, padding_mask=padding_mask, top_k=top_k,
                                 grad_checkpointing=self.grad_checkpointing, on_layer=on_layer)
        return EncoderOutput(x=h, layer_results=layers, padding_mask=padding_mask)
