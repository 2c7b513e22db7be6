"""Fine-tuning models: a pretrained encoder with a task head, and what trains them in each modality.

    FinetuneModel(encoder, head_kind, outputs, cfg)  encoder + head; forward(batch) -> logits
    layer_id(name, depth)                            the depth of a parameter for layer-wise lr decay
    mix_images(images, targets, ...)                 mixup / cutmix with soft targets
    random_resized_crop(images, ...)                 a random crop per image, one batched resample

Heads, and the Hugging Face classes that `d2v hf-export --finetuned` writes (`hf.finetuned`):
    image  mean over patch tokens -> LayerNorm -> Linear, the encoder's final LayerNorm dropped as BEiT
           does (Data2VecVisionForImageClassification with mean pooling: `pooler.layernorm`, `classifier`)
    text   `<s>` token -> dense -> tanh -> Linear (Data2VecTextClassificationHead), or the mean (not
           exported)
    audio  mean over valid frames -> LayerNorm -> Linear (keywords, not exported: HF's head has no
           LayerNorm), or every frame -> Linear (CTC, Data2VecAudioForCTC's `lm_head`)
"""
from __future__ import annotations

import math
import re
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v_engine.config import FinetuneConfig
from d2v_engine.masking import span_mask
from d2v_engine.probes import masked_mean

HeadKind = Literal["classify", "ctc"]


class FinetuneModel(nn.Module):
    """A pretrained encoder and a fresh head.

    Args:
        encoder: an image, audio or text encoder (`models.registry.build_encoder`), trained weights loaded.
        kind: `classify` (one label per sample) or `ctc` (a letter distribution per audio frame).
        outputs: classes, or the CTC vocabulary's size.
        cfg: the `finetune` section (pooling, dropout, audio masking).
        seed: seeds the fine-tuning masks (with the step and the sample's index).
    """

    def __init__(self, encoder: nn.Module, kind: HeadKind, outputs: int, cfg: FinetuneConfig, seed: int = 0):
        super().__init__()
        self.encoder, self.kind, self.cfg, self.seed = encoder, kind, cfg, seed
        self.modality = encoder.modality
        dim = encoder.dim
        self.head = nn.Module()
        if kind == "ctc":
            self.head.dropout = nn.Dropout(cfg.head_dropout)
            self.head.linear = nn.Linear(dim, outputs)
        elif self.modality == "text" and cfg.head == "first":
            self.head.dense = nn.Linear(dim, dim)
            self.head.dropout = nn.Dropout(cfg.head_dropout)
            self.head.out_proj = nn.Linear(dim, outputs)
        else:
            if self.modality == "image":
                # BEiT's mean pooling: the head's LayerNorm takes the place of the encoder's final one
                # (Data2VecVisionForImageClassification with use_mean_pooling=True has the same).
                self.encoder.layernorm = nn.Identity()
            self.head.norm = nn.LayerNorm(dim, eps=encoder.spec.transformer.norm_eps)
            self.head.dropout = nn.Dropout(cfg.head_dropout)
            self.head.linear = nn.Linear(dim, outputs)
        for m in self.head.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if self.modality == "audio" and cfg.freeze_feature_extractor:
            self.encoder.feature_extractor.requires_grad_(False)
        self.step = 0
        """Set by the loop before each step: the fine-tuning masks depend on it."""

    def forward(self, batch: dict[str, Tensor], frozen: bool = False) -> tuple[Tensor, Tensor | None]:
        """Logits of a batch.

        Args:
            batch: a task's collate output (`images`; `audio`, `padding_mask`; `tokens`,
                `padding_mask`), plus `index` [B] (sample ids, for the masks).
            frozen: run the encoder without gradients (the head-only updates of `freeze_steps`).
        Returns:
            (logits [B, K], None) for classification; (log-probs [B, T, V], valid frames [B]) for CTC.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            x, pad = self._encode(batch)
        if self.kind == "ctc":
            logits = self.head.linear(self.head.dropout(x)).float().log_softmax(-1)
            frames = torch.full((x.shape[0],), x.shape[1], device=x.device) if pad is None else (~pad).sum(1)
            return logits, frames
        if hasattr(self.head, "dense"):   # RoBERTa: the <s> token
            return self.head.out_proj(self.head.dropout(torch.tanh(self.head.dense(x[:, 0])))), None
        return self.head.linear(self.head.dropout(self.head.norm(masked_mean(x, pad)))), None

    def _encode(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The encoder's last output [B, T, C] and its padding mask (masking applied in training)."""
        enc = self.encoder
        if self.modality == "image":
            return enc(batch["images"]).x, None
        if self.modality == "text":
            out = enc(batch["tokens"], padding_mask=batch["padding_mask"])
            return out.x, out.padding_mask
        feats, pad = enc.local_features(batch["audio"], batch["padding_mask"])
        mask = None
        if self.training:
            mask = self._time_mask(feats, pad, batch["index"])
            feats = self._channel_mask(feats, batch["index"])
        out = enc(feats, mask=mask, padding_mask=pad)
        return out.x, out.padding_mask

    def _time_mask(self, feats: Tensor, pad: Tensor | None, index: Tensor) -> Tensor | None:
        """wav2vec 2.0 fine-tuning's time masks: spans replaced by the mask embedding."""
        if self.cfg.mask_time_prob <= 0:
            return None
        B, T, _ = feats.shape
        lengths = torch.full((B,), T) if pad is None else (~pad).sum(1).cpu()
        mask = span_mask(index.cpu(), lengths, seed=self.seed, epoch=self.step, num_frames=T,
                         prob=self.cfg.mask_time_prob, span=self.cfg.mask_time_length, min_masks=0,
                         same_count=False)
        return mask.to(feats.device)

    def _channel_mask(self, feats: Tensor, index: Tensor) -> Tensor:
        """wav2vec 2.0's channel masks: spans of feature channels zeroed, the same for all frames."""
        if self.cfg.mask_channel_prob <= 0:
            return feats
        B, _, C = feats.shape
        span = min(self.cfg.mask_channel_length, C)
        mask = span_mask(index.cpu(), torch.full((B,), C), seed=self.seed + 1, epoch=self.step,
                         num_frames=C, prob=self.cfg.mask_channel_prob, span=span, min_masks=0,
                         same_count=False)
        return feats.masked_fill(mask.to(feats.device)[:, None, :], 0.0)


_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.")
_EMBEDDING = ("embeddings.", "embed_norm.", "feature_extractor.", "feature_projection.", "pos_conv_embed.",
              "masked_spec_embed", "layer_norm.", "alibi.")


def layer_id(name: str, depth: int) -> int:
    """How deep a parameter of a `FinetuneModel` sits: 0 = embeddings, i + 1 = block i, depth + 1 = head.

    BEiT's rule: the shared relative position bias belongs with the last block, the final
    LayerNorm with the head. Audio's front-end (CNN, projection, position convolution, the
    LayerNorm before the blocks) counts as embeddings.
    """
    if not name.startswith("encoder."):
        return depth + 1
    inner = name[len("encoder."):]
    found = _BLOCK.match(inner)
    if found:
        return int(found.group(1)) + 1
    if inner.startswith("relative_position_bias."):
        return depth
    if inner.startswith(_EMBEDDING):
        return 0
    return depth + 1


def lr_scale(name: str, depth: int, decay: float) -> float:
    """Layer-wise lr decay: decay^(depth + 1 - layer_id)."""
    return decay ** (depth + 1 - layer_id(name, depth))


# ------------------------------------------------------------------------------ image augmentation
def random_resized_crop(images: Tensor, generator: torch.Generator, min_scale: float, flip: bool) -> Tensor:
    """A random crop per image (area in [min_scale, 1], aspect in [3/4, 4/3]) resized back, and flips.

    One `grid_sample` for the batch (bilinear; the crop is an affine map of the output grid).

    Args:
        images: [B, 3, S, S]; generator: the step's CPU generator.
        min_scale: smallest area fraction (1 = no crop); flip: mirror half of the images.
    Returns:
        [B, 3, S, S].
    """
    B = images.shape[0]
    if min_scale >= 1 and not flip:
        return images
    if min_scale < 1:
        area = min_scale + (1 - min_scale) * torch.rand(B, generator=generator)
        ratio = ((torch.rand(B, generator=generator) * 2 - 1) * math.log(4 / 3)).exp()
        w, h = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    else:
        w = h = torch.ones(B)
    cx = (torch.rand(B, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(B, generator=generator) * 2 - 1) * (1 - h)
    sign = torch.ones(B)
    if flip:
        sign = torch.where(torch.rand(B, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def mix_images(images: Tensor, targets: Tensor, generator: torch.Generator, mixup: float, cutmix: float
               ) -> tuple[Tensor, Tensor]:
    """Mixup or cutmix of a batch with its reverse (timm's batch mode), soft targets to match.

    Args:
        images: [B, 3, S, S]; targets: [B, K] soft labels (one-hot, maybe smoothed).
        generator: the step's CPU generator; mixup, cutmix: Beta alphas (0 = off; both on: 50/50).
    Returns:
        (mixed images, mixed targets).
    """
    use_cut = cutmix > 0 and (mixup <= 0 or torch.rand(1, generator=generator).item() < 0.5)
    alpha = cutmix if use_cut else mixup
    if alpha <= 0:
        return images, targets
    lam = _beta(alpha, generator)
    flipped = images.flip(0)
    if use_cut:
        S = images.shape[-1]
        cut = math.sqrt(1 - lam)
        ch, cw = int(S * cut), int(S * cut)
        cy, cx = (int(v) for v in torch.randint(0, S, (2,), generator=generator))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, S)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, S)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (S * S)   # the area actually pasted
    else:
        images = lam * images + (1 - lam) * flipped
    return images, lam * targets + (1 - lam) * targets.flip(0)


def _beta(alpha: float, generator: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw from `generator` (two Gamma draws through torch's seeded sampler)."""
    a = torch._standard_gamma(torch.full((2,), alpha), generator=generator)
    return float(a[0] / a.sum())
