"""Per-sample decoding and augmentation for the three modalities (PIL, soundfile, tokenizers).

Every random choice draws from `sample_rng(seed, epoch, index, stream)`, a generator that is a pure
function of those numbers: a resumed run, another worker count or another rank order sees the same
crops and flips for the same sample in the same epoch.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
from PIL import Image

from d2v_engine.errors import UserError

# Streams of `sample_rng`: one per kind of random choice, so adding one never shifts another.
STREAM_CROP, STREAM_FLIP, STREAM_AUDIO_CROP, STREAM_BATCH_CROP, STREAM_REPLACE = range(5)


def sample_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """A numpy generator seeded by (seed, epoch, sample index, stream) alone."""
    return np.random.default_rng([int(seed), int(epoch), int(index), int(stream)])


# ---------------------------------------------------------------- images

def decode_image(data: bytes) -> Image.Image:
    """PNG/JPEG/WebP bytes -> an RGB PIL image (grey images get three equal channels)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
                            ) -> tuple[int, int, int, int]:
    """A random box of area fraction in `scale` and aspect ratio (w/h) in `ratio` (log-uniform).

    Ten tries at a box that fits; otherwise the largest centred box whose ratio is clamped to `ratio`.

    Returns:
        (left, top, right, bottom) in pixels.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


@dataclass
class ImageTransform:
    """Random resized crop (bicubic) to `size`, optional horizontal flip, scale to [0, 1], normalise.

    Args:
        size: output height and width in pixels.
        crop_scale: smallest kept area fraction (the largest is 1).
        hflip: flip horizontally with probability 1/2.
        mean, std: per-channel normalisation after scaling to [0, 1].
    """

    size: int
    crop_scale: float
    hflip: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, data: bytes, *, seed: int, epoch: int, index: int) -> torch.Tensor:
        """Encoded image bytes -> float32 [3, size, size], normalised."""
        img = decode_image(data)
        rng = sample_rng(seed, epoch, index, STREAM_CROP)
        box = random_resized_crop_box(img.width, img.height, rng, (self.crop_scale, 1.0))
        img = img.resize((self.size, self.size), Image.BICUBIC, box=box)
        pixels = np.asarray(img, dtype=np.float32) / 255.0        # [H, W, 3]
        if self.hflip and sample_rng(seed, epoch, index, STREAM_FLIP).random() < 0.5:
            pixels = pixels[:, ::-1]
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


# ---------------------------------------------------------------- audio

def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Resample a mono clip by antialiased linear interpolation (good enough for speech features).

    Args:
        wave: float32 [S].
        rate, target: sample rates in Hz.
    Returns:
        float32 [round(S * target / rate)].
    """
    if rate == target:
        return wave
    length = max(1, int(round(len(wave) * target / rate)))
    # A [1, 1, 1, S] image resized along its width: torch's antialiased bilinear filter is a
    # triangle low-pass when downsampling, which keeps aliasing out without a sinc kernel.
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)).view(1, 1, 1, -1)
    y = F.interpolate(x, size=(1, length), mode="bilinear", align_corners=False, antialias=True)
    return y.view(-1).numpy()


def decode_audio(data: bytes, sample_rate: int) -> np.ndarray:
    """FLAC/WAV bytes -> mono float32 [S] at `sample_rate` (channels averaged)."""
    with soundfile.SoundFile(io.BytesIO(data)) as f:
        rate = f.samplerate
        # A file written to a pipe may carry no length (libsndfile then reports a huge one).
        if not 0 < f.frames < 1 << 31:
            raise ValueError(f"audio header gives no usable length ({f.frames} frames)")
        wave = f.read(dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if wave.size == 0:
        raise ValueError("empty audio clip")
    return resample(wave, rate, sample_rate)


def random_crop(wave: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of `length` samples of `wave` [S] (the whole clip when it is not longer)."""
    if len(wave) <= length:
        return wave
    start = int(rng.integers(0, len(wave) - length + 1))
    return wave[start:start + length]


def normalize_audio(wave: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Zero mean, unit variance over the clip (the per-utterance normalisation of wav2vec 2.0)."""
    wave = wave.astype(np.float32, copy=False)
    return (wave - wave.mean()) / math.sqrt(float(wave.var()) + eps)


# ---------------------------------------------------------------- text

class TextEncoder:
    """A `tokenizers` JSON file plus the RoBERTa special ids: text -> `<s> ... </s>` ids.

    Args:
        path: the tokenizer file.
        max_tokens: longest sequence, special tokens included.
    """

    SPECIALS = ("<s>", "<pad>", "</s>", "<mask>")

    def __init__(self, path: str | Path, max_tokens: int):
        from tokenizers import Tokenizer

        self.path = str(path)
        try:
            self.tokenizer = Tokenizer.from_file(self.path)
        except Exception as err:  # tokenizers raises a bare Exception on a bad file
            raise UserError(f"tokenizer '{path}' cannot be loaded ({err}); pass a `tokenizers` "
                            f"JSON file in data.tokenizer.") from None
        ids = {t: self.tokenizer.token_to_id(t) for t in self.SPECIALS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise UserError(f"tokenizer '{path}' lacks the special tokens {', '.join(missing)}; "
                            f"use one with RoBERTa's <s> <pad> </s> <mask> (see `d2v prepare text-corpus`).")
        self.bos, self.pad, self.eos, self.mask_id = (ids[t] for t in self.SPECIALS)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.max_tokens = max_tokens
        self.random_range = self._random_range()

    def _random_range(self) -> tuple[int, int]:
        """Ids a BERT "random token" may take: after the leading specials, before a trailing <mask>."""
        special = {self.bos, self.pad, self.eos, self.mask_id, self.tokenizer.token_to_id("<unk>")}
        low = 0
        while low in special:
            low += 1
        high = self.vocab_size - 1 if self.mask_id == self.vocab_size - 1 else self.vocab_size
        return low, high

    def __call__(self, text: str) -> list[int]:
        """Text -> ids `[<s>, ..., </s>]`, at most `max_tokens` long; empty text is an error."""
        text = text.strip()
        if not text:
            raise ValueError("empty text")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos] + ids[: self.max_tokens - 2] + [self.eos]
