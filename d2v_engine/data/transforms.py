"""Per-sample decoding and augmentation for the three modalities (PIL, soundfile, tokenizers).

Every random choice is a pure function of (seed, epoch, sample index, stream): image crops and flips
come from `counter_uniforms` (a counter hash, vectorised over a batch), audio crops from
`sample_rng`. A resumed run, another worker count, another rank order or the other reader sees the
same crops and flips for the same sample in the same epoch.
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

from d2v_engine.data.checks import audio_format, check_audio_length, check_image_format, image_header
from d2v_engine.errors import UserError

# Streams of the random draws: one per kind of choice, so adding one never shifts another
# (STREAM_FLIP and STREAM_REPLACE are retired: flips share the crop draws, bad samples are skipped).
STREAM_CROP, STREAM_FLIP, STREAM_AUDIO_CROP, STREAM_BATCH_CROP, STREAM_REPLACE = range(5)


def sample_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """A numpy generator seeded by (seed, epoch, sample index, stream) alone."""
    return np.random.default_rng([int(seed), int(epoch), int(index), int(stream)])


# ---------------------------------------------------------------- images

def decode_image(data: bytes) -> Image.Image:
    """JPEG/PNG/WebP bytes -> an RGB PIL image (grey images get three equal channels).

    Raises:
        ValueError: the checks of `checks.check_image_format` fail (unsupported or truncated), or
            PIL cannot decode the file.
    """
    with Image.open(io.BytesIO(data)) as img:
        check_image_format(img.format, data)
        img.load()
        return img.convert("RGB")


def counter_uniforms(seed: int, epoch: int, index: np.ndarray, n: int, stream: int) -> np.ndarray:
    """Uniform numbers in [0, 1), a pure function of (seed, epoch, index[i], j, stream).

    A splitmix64 hash of a per-sample key plus a Weyl counter: vectorised over samples in numpy, so
    that a whole batch's augmentation draws cost a few array operations.

    Args:
        index: [N] global sample indices.
        n: draws per sample.
    Returns:
        float64 [N, n].
    """
    words = [int(v) & _M64 for v in (seed, epoch, stream)]
    key = _splitmix(np.array(words, dtype=np.uint64) * np.uint64(_GOLDEN))
    key = _splitmix(key[0] ^ _splitmix(key[1] ^ _splitmix(key[2:3])))
    sample = _splitmix(np.asarray(index, dtype=np.int64).astype(np.uint64) ^ key)
    counter = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
    bits = _splitmix(sample[:, None] + counter[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


_GOLDEN = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def _splitmix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrap-around arithmetic is intended)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_CROP_TRIES = 10  # torchvision's RandomResizedCrop tries this many boxes before a centre crop


def random_resized_crop_boxes(width: np.ndarray, height: np.ndarray, u: np.ndarray,
                              scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
                              ) -> np.ndarray:
    """Random boxes of area fraction in `scale` and aspect ratio (w/h) in `ratio` (log-uniform).

    Ten tries per image at a box that fits; otherwise the largest centred box whose ratio is clamped
    to `ratio`.

    Args:
        width, height: [N] image sizes in pixels.
        u: [N, 40] uniforms in [0, 1): per try (area, ratio, left, top).
    Returns:
        int64 [N, 4] (left, top, right, bottom) in pixels.
    """
    width, height = np.asarray(width, np.int64), np.asarray(height, np.int64)
    u = u[:, : 4 * _CROP_TRIES].reshape(-1, _CROP_TRIES, 4)
    area = (width * height)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = np.round(np.sqrt(area * aspect)).astype(np.int64)
    h = np.round(np.sqrt(area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    left = (u[..., 2] * (width[:, None] - w + 1)).astype(np.int64)
    top = (u[..., 3] * (height[:, None] - h + 1)).astype(np.int64)
    first = np.argmax(fits, axis=1)  # the first try that fits (0 when none does)
    rows = np.arange(len(width))
    boxes = np.stack([left[rows, first], top[rows, first], w[rows, first], h[rows, first]], axis=1)
    centre = _centre_boxes(width, height, ratio)
    boxes = np.where(fits.any(axis=1)[:, None], boxes, centre)
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def _centre_boxes(width: np.ndarray, height: np.ndarray, ratio: tuple[float, float]) -> np.ndarray:
    """[N, 4] (left, top, w, h): the largest centred box with its ratio clamped to `ratio`."""
    aspect = width / height
    w = np.where(aspect > ratio[1], np.round(height * ratio[1]), width).astype(np.int64)
    h = np.where(aspect < ratio[0], np.round(width / ratio[0]), height).astype(np.int64)
    return np.stack([(width - w) // 2, (height - h) // 2, w, h], axis=1)


@dataclass
class ImageTransform:
    """Random resized crop (bicubic) to `size`, optional horizontal flip, scale to [0, 1], normalise.

    The crop boxes and flips of a batch are drawn at once (`plan`), from the image sizes in the
    headers, so the `dali` reader uses the same boxes as this PIL path.

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

    def plan(self, sizes: np.ndarray, index: np.ndarray, *, seed: int, epoch: int
             ) -> tuple[np.ndarray, np.ndarray]:
        """Crop boxes and flips of N images.

        Args:
            sizes: [N, 2] (width, height) in pixels.
            index: [N] global sample indices.
        Returns:
            (boxes int64 [N, 4] (left, top, right, bottom), flips bool [N]).
        """
        sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        u = counter_uniforms(seed, epoch, index, 4 * _CROP_TRIES + 1, STREAM_CROP)
        boxes = random_resized_crop_boxes(sizes[:, 0], sizes[:, 1], u, (self.crop_scale, 1.0))
        flips = (u[:, -1] < 0.5) & self.hflip
        return boxes, flips

    def apply(self, data: bytes, box, flip: bool) -> torch.Tensor:
        """Encoded image bytes -> float32 [3, size, size], cropped to `box`, flipped, normalised."""
        img = decode_image(data)
        img = img.resize((self.size, self.size), Image.BICUBIC, box=tuple(int(v) for v in box))
        pixels = np.asarray(img, dtype=np.float32) / 255.0        # [H, W, 3]
        if flip:
            pixels = pixels[:, ::-1]
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def __call__(self, data: bytes, *, seed: int, epoch: int, index: int) -> torch.Tensor:
        """Encoded image bytes -> float32 [3, size, size], normalised (one image: `plan` + `apply`)."""
        _, width, height = image_header(data)
        boxes, flips = self.plan(np.array([[width, height]]), np.array([index]), seed=seed, epoch=epoch)
        return self.apply(data, boxes[0], bool(flips[0]))


# ---------------------------------------------------------------- audio

def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Resample a mono clip by antialiased linear interpolation (good enough for speech features).

    Args:
        wave: float32 [S].
        rate, target: sample rates in Hz.
    Returns:
        float32 [ceil(S * target / rate)].
    """
    if rate == target:
        return wave
    # ceil(S * target / rate): the length DALI's resampler gives, so both readers agree.
    length = max(1, -(-len(wave) * target // rate))
    # A [1, 1, 1, S] image resized along its width: torch's antialiased bilinear filter is a
    # triangle low-pass when downsampling, which keeps aliasing out without a sinc kernel.
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)).view(1, 1, 1, -1)
    y = F.interpolate(x, size=(1, length), mode="bilinear", align_corners=False, antialias=True)
    return y.view(-1).numpy()


def decode_audio(data: bytes, sample_rate: int) -> np.ndarray:
    """WAV/FLAC/Ogg bytes -> mono float32 [S] at `sample_rate` (channels averaged).

    Raises:
        ValueError: unsupported format (by content: MP3 is refused), no usable length, empty clip,
            or libsndfile cannot decode the file.
    """
    audio_format(data)
    with soundfile.SoundFile(io.BytesIO(data)) as f:
        rate = f.samplerate
        check_audio_length(f.frames)
        wave = f.read(dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if wave.size == 0:
        raise ValueError("empty audio clip")
    return resample(wave, rate, sample_rate)


def crop_start(total: int, length: int, rng: np.random.Generator) -> int:
    """Start of a random window of `length` samples in a clip of `total` (0 when it is not longer)."""
    if total <= length:
        return 0
    return int(rng.integers(0, total - length + 1))


def random_crop(wave: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of `length` samples of `wave` [S] (the whole clip when it is not longer)."""
    if len(wave) <= length:
        return wave
    start = crop_start(len(wave), length, rng)
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
