"""Per-modality batch builders: decode samples, then stack a batch and compute its masks.

Each builder has separate steps so that a reader can drop a sample that fails to decode before the
batch is assembled: `decode_many(raws, index, epoch=)` returns each sample or the exception that
rejected it, `collate(samples, index, labels, epoch=)` returns the batch dict of the interfaces
file, and `finish(...)` turns the tensors the `dali` reader's pipelines produce into that dict.
Masks come from `d2v_engine.masking` with the run seed, the epoch and the global sample indices, so
they never depend on batch order, worker count, rank or reader. Each builder picks its masking once,
from `method.version`: data2vec 1.0 masks are [B, T], data2vec 2.0 masks [B, M, T] (M =
`method.clones` copies per sample, each with an exact masked count). Image and text masks of a sample
depend on nothing else, so `decode_many` draws them (in the DataLoader workers); audio masks look
across the batch (equal counts per row) and are drawn in `collate`.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch

from d2v_engine import masking

from d2v_engine.data.checks import image_header
from d2v_engine.data.shards import EXTENSIONS
from d2v_engine.data.transforms import (STREAM_AUDIO_CROP, STREAM_BATCH_CROP, ImageTransform,
                                        TextEncoder, crop_start, decode_audio, normalize_audio,
                                        random_crop, sample_rng)
from d2v_engine.errors import UserError


class ImageBatcher:
    """Images: random resized crop + flip + normalise, then BEiT block masks over the patch grid.

    Args:
        cfg: the run config (data.*, mask.*, seed).
        spec: the model spec (image_size, patch_size).
    """

    extensions = EXTENSIONS["image"]
    worker_masks = True
    """`decode_many` draws the masks too (False times decoding alone, in benchmarks)."""

    def __init__(self, cfg, spec):
        self.seed = cfg.seed
        size = cfg.data.image_size or spec.image_size
        self.transform = ImageTransform(size, cfg.data.crop_scale, cfg.data.hflip,
                                        tuple(cfg.data.mean), tuple(cfg.data.std))
        side = size // spec.patch_size
        self.grid = (side, side)
        m = cfg.mask
        if cfg.method.version == 2:
            self._mask = partial(masking.block_mask_2d, grid=self.grid, clones=cfg.method.clones,
                                 prob=m.prob, length=m.length, adjust=m.adjust, inverse=m.inverse)
        else:
            self._mask = partial(masking.block_mask, grid=self.grid,
                                 num_masked=max(1, round(m.prob * side * side)), min_block=m.min_block,
                                 max_block=m.max_block, min_aspect=m.min_aspect)

    def check(self, raw: dict[str, bytes]) -> tuple[str, int, int]:
        """(format, width, height) of the sample's image; ValueError when it is bad (`checks`)."""
        return image_header(payload(raw, self.extensions))

    def decode_many(self, raws: list[dict[str, bytes]], index: list[int], *, epoch: int) -> list:
        """Decode and augment images, their crop boxes drawn at once from the header sizes, and draw
        their block masks (a function of the sample index alone, so a worker can draw them).

        Returns:
            Per sample (float32 [3, H, W] image, bool [N] or [M, N] mask), or the exception that
            rejected it.
        """
        out: list = [None] * len(raws)
        sizes = []
        for k, raw in enumerate(raws):
            try:
                sizes.append(self.check(raw)[1:])
            except Exception as err:  # any failure on one file: that sample is bad, never the batch
                out[k] = err
        good = [k for k in range(len(raws)) if out[k] is None]
        boxes, flips = self.transform.plan(np.array(sizes).reshape(-1, 2),
                                           np.array([index[k] for k in good]), seed=self.seed, epoch=epoch)
        for k, box, flip in zip(good, boxes, flips):
            try:
                out[k] = self.transform.apply(payload(raws[k], self.extensions), box, bool(flip))
            except Exception as err:
                out[k] = err
        good = [k for k in good if not isinstance(out[k], Exception)]
        if good and self.worker_masks:
            masks = self.masks(torch.tensor([index[k] for k in good]), epoch=epoch)
            for k, mask in zip(good, masks):
                out[k] = (out[k], mask)
        return out

    def masks(self, index: torch.Tensor, *, epoch: int) -> torch.Tensor:
        """Block masks of the samples `index` [B]: bool [B, N] (1.0) or [B, M, N] (2.0), N = grid
        patches, True = masked."""
        return self._mask(index, seed=self.seed, epoch=epoch)

    def collate(self, samples: list[tuple[torch.Tensor, torch.Tensor]], index: torch.Tensor,
                labels: torch.Tensor, *, epoch: int) -> dict[str, torch.Tensor]:
        """Stack the (image [3, H, W], mask [N] | [M, N]) pairs of `decode_many` into the batch dict."""
        images, masks = zip(*samples)
        return {"images": torch.stack(images), "mask": torch.stack(masks), "index": index, "labels": labels}

    def finish(self, images: torch.Tensor, index: torch.Tensor, labels: torch.Tensor, *,
               epoch: int) -> dict[str, torch.Tensor]:
        """Add block masks to a stack of augmented images.

        Args:
            images: [B, 3, H, W] float32, normalised (on any device).
            index: [B] int64 global sample indices; labels: [B] int64 (-1 = none).
        Returns:
            {"images": [B, 3, H, W] float32, "mask": [B, N] | [B, M, N] bool, "index", "labels"}.
        """
        return {"images": images, "mask": self.masks(index, epoch=epoch), "index": index, "labels": labels}


class AudioBatcher:
    """Audio: decode to mono float32 at data.sample_rate, crop or pad the batch, span-mask frames.

    Args:
        cfg: the run config (data.sample_rate, data.max_sample_size, data.audio_batching, mask.*).
        spec: the model spec (conv_layers gives the frame count of a clip).
    """

    extensions = EXTENSIONS["audio"]

    def __init__(self, cfg, spec):
        self.conv_layers = spec.conv_layers
        self.seed = cfg.seed
        self.sample_rate = cfg.data.sample_rate
        self.max_samples = cfg.data.max_sample_size
        self.pad = cfg.data.audio_batching == "pad"
        m = cfg.mask
        if cfg.method.version == 2:
            self._mask = partial(masking.block_mask_1d, clones=cfg.method.clones, prob=m.prob, span=m.length,
                                 adjust=m.adjust, inverse=m.inverse)
        else:
            self._mask = partial(masking.span_mask, prob=m.prob, span=m.length)

    def frames(self, num_samples):
        """CNN output frames of `num_samples` (int or int64 tensor [B])."""
        # Imported here so the data package loads without the model package being complete.
        from d2v_engine.models.audio import conv_output_length

        return conv_output_length(self.conv_layers, num_samples)

    def decode(self, raw: dict[str, bytes], *, epoch: int, index: int):
        """Raw sample -> float32 numpy [S] (pad mode: randomly cropped to data.max_sample_size)."""
        wave = decode_audio(payload(raw, self.extensions), self.sample_rate)
        if self.pad:
            wave = random_crop(wave, self.max_samples, sample_rng(self.seed, epoch, index, STREAM_AUDIO_CROP))
        self.check_length(len(wave))
        return wave

    def decode_many(self, raws: list[dict[str, bytes]], index: list[int], *, epoch: int) -> list:
        """`decode` of each sample, or the exception that rejected it."""
        return _decode_each(self, raws, index, epoch)

    def check_length(self, num_samples: int) -> None:
        """ValueError when a clip (after the pad-mode crop) is shorter than one CNN frame."""
        if int(self.frames(num_samples)) < 1:
            raise ValueError(f"clip of {num_samples} samples is shorter than one CNN frame")

    def crop_plan(self, lengths: list[int], index: list[int], *, epoch: int) -> tuple[list[int], list[int]]:
        """Where each clip of a batch is cropped, from the clip lengths alone (the `dali` reader).

        The same windows as `decode` + `collate` take: pad mode crops each clip to
        data.max_sample_size; crop mode crops every clip to the batch's shortest.

        Args:
            lengths: B clip lengths at data.sample_rate.
            index: B global sample indices.
        Returns:
            (starts, sizes): B window starts and B window lengths in samples.
        """
        if self.pad:
            starts = [crop_start(n, self.max_samples, sample_rng(self.seed, epoch, i, STREAM_AUDIO_CROP))
                      for n, i in zip(lengths, index)]
            return starts, [min(n, self.max_samples) for n in lengths]
        size = min(min(lengths), self.max_samples)
        starts = [crop_start(n, size, sample_rng(self.seed, epoch, i, STREAM_BATCH_CROP))
                  for n, i in zip(lengths, index)]
        return starts, [size] * len(lengths)

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
        audio = torch.zeros(len(samples), int(lengths.max()), dtype=torch.float32)
        for row, wave in enumerate(samples):
            audio[row, : len(wave)] = torch.from_numpy(normalize_audio(wave))
        return self.finish(audio, lengths, index, labels, epoch=epoch)

    def finish(self, audio: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor,
               labels: torch.Tensor, *, epoch: int) -> dict[str, torch.Tensor]:
        """Padding mask and span masks for a batch of normalised, zero-padded clips.

        Args:
            audio: [B, S] float32 (on any device), row b valid up to lengths[b], zeros after.
            lengths: [B] int64 valid samples per row (CPU).
            index: [B] int64 global sample indices; labels: [B] int64 (-1 = none).
        Returns:
            {"audio": [B, S], "padding_mask": [B, S] bool, "mask": [B, T] | [B, M, T] bool, "index",
            "labels"}.
        """
        size = audio.shape[1]
        padding_mask = torch.arange(size, device=audio.device)[None, :] >= lengths.to(audio.device)[:, None]
        num_frames = int(self.frames(size))
        frame_lengths = torch.as_tensor(self.frames(lengths), dtype=torch.int64).clamp(max=num_frames)
        mask = self._mask(index, frame_lengths, seed=self.seed, epoch=epoch, num_frames=num_frames)
        return {"audio": audio, "padding_mask": padding_mask, "mask": mask, "index": index,
                "labels": labels}


class TextBatcher:
    """Text: tokenize to `<s> ... </s>`, pad to the longest, BERT-mask (80/10/10).

    Args:
        cfg: the run config (data.max_tokens, mask.*).
        spec: the model spec (max_positions bounds the sequence length).
        tokenizer: path of the `tokenizers` JSON file.
    """

    extensions = EXTENSIONS["text"]

    def __init__(self, cfg, spec, tokenizer: str):
        self.seed = cfg.seed
        max_tokens = min(cfg.data.max_tokens, spec.max_positions)
        if max_tokens < 3:
            raise UserError(f"data.max_tokens={cfg.data.max_tokens} leaves no room for text between "
                            f"<s> and </s>; use at least 3.")
        self.encoder = TextEncoder(tokenizer, max_tokens)
        m = cfg.mask
        if cfg.method.version == 2:
            # 2.0 removes the masked tokens from the student's input: it reads the clean ids.
            self._mask = partial(_clean_and_random_mask, clones=cfg.method.clones, prob=m.prob)
        else:
            self._mask = partial(masking.bert_mask, mask_id=self.encoder.mask_id,
                                 random_range=self.encoder.random_range, prob=m.prob,
                                 replace_prob=m.replace_prob, random_prob=m.random_prob)

    def decode(self, raw: dict[str, bytes], *, epoch: int, index: int) -> list[int]:
        """Raw sample -> token ids `[<s>, ..., </s>]` (UTF-8 errors and empty texts raise)."""
        return self.encoder(payload(raw, self.extensions).decode("utf-8"))

    def decode_many(self, raws: list[dict[str, bytes]], index: list[int], *, epoch: int) -> list:
        """Tokenize, then BERT-mask the texts together (a row's mask does not depend on the others).

        Returns:
            Per sample (clean ids, student ids, selected) int64/int64/bool [T_b] (2.0: selected
            [M, T_b]), or the exception that rejected it.
        """
        out = _decode_each(self, raws, index, epoch)
        good = [k for k, ids in enumerate(out) if not isinstance(ids, Exception)]
        if good:
            batch = self.collate_ids([out[k] for k in good], torch.tensor([index[k] for k in good]),
                                     epoch=epoch)
            lengths = (~batch["padding_mask"]).sum(1).tolist()
            for row, (k, n) in enumerate(zip(good, lengths)):
                out[k] = (batch["clean"][row, :n], batch["tokens"][row, :n], batch["mask"][row, ..., :n])
        return out

    def collate(self, samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], index: torch.Tensor,
                labels: torch.Tensor, *, epoch: int) -> dict[str, torch.Tensor]:
        """Pad the (clean, student, selected) rows of `decode_many` into the batch dict (as `collate_ids`)."""
        size = max(len(clean) for clean, _, _ in samples)
        pad = self.encoder.pad
        clean = torch.full((len(samples), size), pad, dtype=torch.int64)
        tokens = torch.full((len(samples), size), pad, dtype=torch.int64)
        mask = torch.zeros(len(samples), *samples[0][2].shape[:-1], size, dtype=torch.bool)
        for row, (c, t, m) in enumerate(samples):
            clean[row, : len(c)], tokens[row, : len(t)], mask[row, ..., : m.shape[-1]] = c, t, m
        lengths = torch.tensor([len(c) for c, _, _ in samples])
        padding_mask = torch.arange(size)[None, :] >= lengths[:, None]
        return {"tokens": tokens, "clean": clean, "padding_mask": padding_mask, "mask": mask,
                "index": index, "labels": labels}

    def collate_ids(self, samples: list[list[int]], index: torch.Tensor, *,
                    epoch: int) -> dict[str, torch.Tensor]:
        """Pad token id lists and draw BERT masks.

        Args:
            samples: B lists of token ids.
            index: [B] int64 global sample indices.
        Returns:
            {"tokens": [B, T] int64 (masked), "clean": [B, T] int64, "padding_mask": [B, T] bool,
             "mask": [B, T] bool (selected positions; 2.0: [B, M, T] masked positions)}.
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
        tokens, mask = self._mask(index, clean, special, seed=self.seed, epoch=epoch)
        return {"tokens": tokens, "clean": clean, "padding_mask": padding_mask, "mask": mask}


def _clean_and_random_mask(index: torch.Tensor, tokens: torch.Tensor, special: torch.Tensor, *, seed: int,
                           epoch: int, clones: int, prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """2.0 text: the student's ids are the clean ids; the masks say which of them it never sees."""
    return tokens, masking.random_mask(index, special, seed=seed, epoch=epoch, clones=clones, prob=prob)


def _decode_each(batcher, raws: list[dict[str, bytes]], index: list[int], epoch: int) -> list:
    """`batcher.decode` of each sample, or the exception that rejected it."""
    out = []
    for raw, i in zip(raws, index):
        try:
            out.append(batcher.decode(raw, epoch=epoch, index=i))
        except Exception as err:  # any decoder's failure on one file: that sample is bad
            out.append(err)
    return out


def payload(raw: dict[str, bytes], extensions: tuple[str, ...]) -> bytes:
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
