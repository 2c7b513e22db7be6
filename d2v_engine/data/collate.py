"""Per-modality batch builders: decode one sample, then stack a batch and compute its masks.

Each builder has two steps so that the reader can replace a sample that fails to decode before the
batch is assembled: `decode(raw, epoch=, index=)` raises on bad input, `collate(samples, index,
labels, epoch=)` returns the batch dict of the interfaces file. Masks come from `d2v_engine.masking`
with the run seed, the epoch and the global sample indices, so they never depend on batch order,
worker count or rank.
"""
from __future__ import annotations

import torch

from d2v_engine import masking
from d2v_engine.data.transforms import (STREAM_AUDIO_CROP, STREAM_BATCH_CROP, ImageTransform,
                                        TextEncoder, decode_audio, normalize_audio, random_crop,
                                        sample_rng)
from d2v_engine.errors import UserError


class ImageBatcher:
    """Images: random resized crop + flip + normalise, then BEiT block masks over the patch grid.

    Args:
        cfg: the run config (data.*, mask.*, seed).
        spec: the model spec (image_size, patch_size).
    """

    payload = ("png", "jpg", "jpeg", "webp")

    def __init__(self, cfg, spec):
        self.seed = cfg.seed
        size = cfg.data.image_size or spec.image_size
        self.transform = ImageTransform(size, cfg.data.crop_scale, cfg.data.hflip,
                                        tuple(cfg.data.mean), tuple(cfg.data.std))
        side = size // spec.patch_size
        self.grid = (side, side)
        self.num_masked = max(1, round(cfg.mask.prob * side * side))
        self.block = dict(min_block=cfg.mask.min_block, max_block=cfg.mask.max_block,
                          min_aspect=cfg.mask.min_aspect)

    def decode(self, raw: dict[str, bytes], *, epoch: int, index: int) -> torch.Tensor:
        """Raw sample -> float32 [3, H, W] normalised pixels."""
        return self.transform(_payload(raw, self.payload), seed=self.seed, epoch=epoch, index=index)

    def collate(self, samples: list[torch.Tensor], index: torch.Tensor, labels: torch.Tensor, *,
                epoch: int) -> dict[str, torch.Tensor]:
        """Stack decoded images and draw block masks.

        Args:
            samples: B tensors [3, H, W].
            index: [B] int64 global sample indices; labels: [B] int64 (-1 = none).
        Returns:
            {"images": [B, 3, H, W] float32, "mask": [B, N] bool, "index", "labels"}.
        """
        mask = masking.block_mask(index, seed=self.seed, epoch=epoch, grid=self.grid,
                                  num_masked=self.num_masked, **self.block)
        return {"images": torch.stack(samples), "mask": mask, "index": index, "labels": labels}


class AudioBatcher:
    """Audio: decode to mono float32 at data.sample_rate, crop or pad the batch, span-mask frames.

    Args:
        cfg: the run config (data.sample_rate, data.max_sample_size, data.audio_batching, mask.*).
        spec: the model spec (conv_layers gives the frame count of a clip).
    """

    payload = ("flac", "wav")

    def __init__(self, cfg, spec):
        self.conv_layers = spec.conv_layers
        self.seed = cfg.seed
        self.sample_rate = cfg.data.sample_rate
        self.max_samples = cfg.data.max_sample_size
        self.pad = cfg.data.audio_batching == "pad"
        self.prob, self.span = cfg.mask.prob, cfg.mask.length

    def frames(self, num_samples):
        """CNN output frames of `num_samples` (int or int64 tensor [B])."""
        # Imported here so the data package loads without the model package being complete.
        from d2v_engine.models.audio import conv_output_length

        return conv_output_length(self.conv_layers, num_samples)

    def decode(self, raw: dict[str, bytes], *, epoch: int, index: int):
        """Raw sample -> float32 numpy [S] (pad mode: randomly cropped to data.max_sample_size)."""
        wave = decode_audio(_payload(raw, self.payload), self.sample_rate)
        if self.pad:
            wave = random_crop(wave, self.max_samples, sample_rng(self.seed, epoch, index, STREAM_AUDIO_CROP))
        if int(self.frames(len(wave))) < 1:
            raise ValueError(f"clip of {len(wave)} samples is shorter than one CNN frame")
        return wave

    def collate(self, samples: list, index: torch.Tensor, labels: torch.Tensor, *,
                epoch: int) -> dict[str, torch.Tensor]:
        """Crop every clip to the shortest (or pad to the longest), normalise, span-mask frames.

        Args:
            samples: B float32 numpy clips [S_b].
            index: [B] int64 global sample indices; labels: [B] int64 (-1 = none).
        Returns:
            {"audio": [B, S] float32, "padding_mask": [B, S] bool, "mask": [B, T] bool, "index", "labels"}.
        """
        if not self.pad:
            size = min(min(len(w) for w in samples), self.max_samples)
            samples = [random_crop(w, size, sample_rng(self.seed, epoch, int(i), STREAM_BATCH_CROP))
                       for w, i in zip(samples, index.tolist())]
        lengths = torch.tensor([len(w) for w in samples], dtype=torch.int64)
        size = int(lengths.max())
        audio = torch.zeros(len(samples), size, dtype=torch.float32)
        for row, wave in enumerate(samples):
            audio[row, : len(wave)] = torch.from_numpy(normalize_audio(wave))
        padding_mask = torch.arange(size)[None, :] >= lengths[:, None]
        num_frames = int(self.frames(size))
        frame_lengths = torch.as_tensor(self.frames(lengths), dtype=torch.int64).clamp(max=num_frames)
        mask = masking.span_mask(index, frame_lengths, seed=self.seed, epoch=epoch,
                                 num_frames=num_frames, prob=self.prob, span=self.span)
        return {"audio": audio, "padding_mask": padding_mask, "mask": mask, "index": index,
                "labels": labels}


class TextBatcher:
    """Text: tokenize to `<s> ... </s>`, pad to the longest, BERT-mask (80/10/10).

    Args:
        cfg: the run config (data.max_tokens, mask.*).
        spec: the model spec (max_positions bounds the sequence length).
        tokenizer: path of the `tokenizers` JSON file.
    """

    payload = ("txt",)

    def __init__(self, cfg, spec, tokenizer: str):
        self.seed = cfg.seed
        max_tokens = min(cfg.data.max_tokens, spec.max_positions)
        if max_tokens < 3:
            raise UserError(f"data.max_tokens={cfg.data.max_tokens} leaves no room for text between "
                            f"<s> and </s>; use at least 3.")
        self.encoder = TextEncoder(tokenizer, max_tokens)
        self.bert = dict(mask_id=self.encoder.mask_id, random_range=self.encoder.random_range,
                         prob=cfg.mask.prob, replace_prob=cfg.mask.replace_prob,
                         random_prob=cfg.mask.random_prob)

    def decode(self, raw: dict[str, bytes], *, epoch: int, index: int) -> list[int]:
        """Raw sample -> token ids `[<s>, ..., </s>]` (UTF-8 errors and empty texts raise)."""
        return self.encoder(_payload(raw, self.payload).decode("utf-8"))

    def collate(self, samples: list[list[int]], index: torch.Tensor, labels: torch.Tensor, *,
                epoch: int) -> dict[str, torch.Tensor]:
        """Pad the id lists and draw BERT masks.

        Args:
            samples: B lists of token ids.
            index: [B] int64 global sample indices; labels: [B] int64 (-1 = none).
        Returns:
            {"tokens": [B, T] int64 (masked), "clean": [B, T] int64, "padding_mask": [B, T] bool,
             "mask": [B, T] bool (selected positions), "index", "labels"}.
        """
        enc = self.encoder
        size = max(len(ids) for ids in samples)
        clean = torch.full((len(samples), size), enc.pad, dtype=torch.int64)
        for row, ids in enumerate(samples):
            clean[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        lengths = torch.tensor([len(ids) for ids in samples])
        positions = torch.arange(size)[None, :]
        # Padding by position: a text may spell out "<pad>" itself, which the tokenizer maps to its id.
        padding_mask = positions >= lengths[:, None]
        special = padding_mask | (positions == 0) | (positions == lengths[:, None] - 1)
        special |= (clean == enc.bos) | (clean == enc.eos) | (clean == enc.pad) | (clean == enc.mask_id)
        tokens, mask = masking.bert_mask(index, clean, special, seed=self.seed, epoch=epoch, **self.bert)
        return {"tokens": tokens, "clean": clean, "padding_mask": padding_mask, "mask": mask,
                "index": index, "labels": labels}


def _payload(raw: dict[str, bytes], extensions: tuple[str, ...]) -> bytes:
    """The sample's payload: the first of `extensions` it has (KeyError when it has none)."""
    for ext in extensions:
        if ext in raw:
            return raw[ext]
    raise KeyError(f"sample has none of the extensions {', '.join(extensions)}")


def build_batcher(cfg, spec, tokenizer: str | None = None):
    """The batch builder of the model's modality (`tokenizer`: the JSON path, text only)."""
    if spec.modality == "image":
        return ImageBatcher(cfg, spec)
    if spec.modality == "audio":
        return AudioBatcher(cfg, spec)
    return TextBatcher(cfg, spec, tokenizer)
