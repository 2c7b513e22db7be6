"""Frozen-feature probes: deterministic eval inputs, mean-pooled encoder features, k-NN and linear.

Eval inputs never augment: images are resized (shorter side) and centre-cropped to the model's size
and normalised with the run's mean and std; audio is decoded at the run's rate, optionally mixed with
seeded white noise at a given SNR, centre-cropped to `data.max_sample_size` and normalised per clip;
text is tokenized as in pretraining, without masking. Samples are encoded in batches of similar
length (less padding), and each sample's feature is its encoder output averaged over valid positions.
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from d2v_engine.data.transforms import TextEncoder, decode_audio, decode_image, normalize_audio

MIN_AUDIO = 400
"""Shortest clip in samples the wav2vec CNN turns into one frame (receptive field 400 at 16 kHz)."""


def _payload(raw: dict[str, bytes], extensions: tuple[str, ...]) -> bytes:
    """The sample's payload: the first of `extensions` it has."""
    for ext in extensions:
        if ext in raw:
            return raw[ext]
    raise ValueError(f"sample has none of the extensions {', '.join(extensions)}")


class ImageInputs:
    """Images -> [3, S, S] normalised pixels: shorter side resized to S (bicubic), centre crop."""

    payload = ("png", "jpg", "jpeg", "webp")

    def __init__(self, size: int, mean: list[float], std: list[float]):
        self.size = size
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def decode(self, raw: dict[str, bytes], index: int) -> Tensor:
        img = decode_image(_payload(raw, self.payload))
        if img.size != (self.size, self.size):
            scale = self.size / min(img.size)
            w, h = max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))
            img = img.resize((w, h), Image.BICUBIC)
            left, top = (w - self.size) // 2, (h - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        pixels = (np.asarray(img, dtype=np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def collate(self, items: list[Tensor]) -> dict[str, Tensor]:
        """B x [3, S, S] -> {"images": [B, 3, S, S]}."""
        return {"images": torch.stack(items)}


class AudioInputs:
    """Clips -> normalised float32 waveforms, with optional white noise at `snr_db`.

    Args:
        sample_rate: the model's rate; max_samples: longer clips are centre-cropped.
        snr_db: signal-to-noise ratio of the added noise in dB, or None for clean audio.
        seed: the noise of sample i is drawn from a generator seeded by (seed, i).
    """

    payload = ("flac", "wav")

    def __init__(self, sample_rate: int, max_samples: int, snr_db: float | None = None, seed: int = 0):
        self.sample_rate, self.max_samples, self.snr_db, self.seed = sample_rate, max_samples, snr_db, seed

    def decode(self, raw: dict[str, bytes], index: int) -> np.ndarray:
        wave = decode_audio(_payload(raw, self.payload), self.sample_rate)
        if len(wave) > self.max_samples:
            start = (len(wave) - self.max_samples) // 2
            wave = wave[start:start + self.max_samples]
        if self.snr_db is not None:
            # Noise power from the clip's mean power (silence included), so the SNR is per clip.
            power = float(np.mean(wave.astype(np.float64) ** 2)) / 10 ** (self.snr_db / 10)
            rng = np.random.default_rng([self.seed, index, 0x5D8])
            wave = wave + rng.normal(0.0, np.sqrt(power), len(wave)).astype(np.float32)
        if len(wave) < MIN_AUDIO:
            wave = np.pad(wave, (0, MIN_AUDIO - len(wave)))
        return normalize_audio(wave)

    def collate(self, items: list[np.ndarray]) -> dict[str, Tensor]:
        """B clips -> {"audio": [B, S] zero-padded, "padding_mask": [B, S] bool, True = padding}."""
        lengths = torch.tensor([len(w) for w in items])
        audio = torch.zeros(len(items), int(lengths.max()))
        for row, wave in enumerate(items):
            audio[row, : len(wave)] = torch.from_numpy(wave)
        return {"audio": audio, "padding_mask": torch.arange(audio.shape[1])[None] >= lengths[:, None]}


class TextInputs:
    """Texts -> `<s> ... </s>` token ids (the run's tokenizer and length limit), padded per batch."""

    payload = ("txt",)

    def __init__(self, tokenizer: str, max_tokens: int):
        self.encoder = TextEncoder(tokenizer, max_tokens)

    def decode(self, raw: dict[str, bytes], index: int) -> list[int]:
        return self.encoder(_payload(raw, self.payload).decode("utf-8", errors="replace") or " ")

    def collate(self, items: list[list[int]]) -> dict[str, Tensor]:
        """B id lists -> {"tokens": [B, T] int64 padded with <pad>, "padding_mask": [B, T] bool}."""
        lengths = torch.tensor([len(ids) for ids in items])
        tokens = torch.full((len(items), int(lengths.max())), self.encoder.pad, dtype=torch.int64)
        for row, ids in enumerate(items):
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return {"tokens": tokens, "padding_mask": torch.arange(tokens.shape[1])[None] >= lengths[:, None]}


def masked_mean(x: Tensor, padding_mask: Tensor | None) -> Tensor:
    """x: [B, T, C], padding_mask: [B, T] bool (True = padding) or None -> [B, C] mean over valid T."""
    if padding_mask is None:
        return x.mean(dim=1)
    valid = (~padding_mask).unsqueeze(-1).to(x.dtype)
    return (x * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)


def pooled_features(encoder: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The encoder's final output averaged over valid positions.

    Args:
        encoder: an image, audio or text encoder in eval mode.
        batch: what the modality's `*Inputs.collate` returns.
    Returns:
        [B, C] fp32 features.
    """
    if encoder.modality == "image":
        out = encoder(batch["images"])
    elif encoder.modality == "audio":
        feats, frame_pad = encoder.local_features(batch["audio"], batch["padding_mask"])
        out = encoder(feats, padding_mask=frame_pad)
    else:
        out = encoder(batch["tokens"], padding_mask=batch["padding_mask"])
    return masked_mean(out.x.float(), out.padding_mask)


@torch.no_grad()
def extract(encoders: dict[str, nn.Module], items: list, collate: Callable, batch_size: int,
            extra: dict[str, Callable[[dict], Tensor]] | None = None,
            device: torch.device = torch.device("cpu")) -> dict[str, np.ndarray]:
    """Features of every item under every encoder, one pass over the inputs.

    Args:
        encoders: name -> encoder (on `device`).
        items: decoded samples (as a `*Inputs.decode` returns them).
        collate: the `*Inputs.collate` that batches them.
        batch_size: samples per forward pass.
        extra: name -> function of a batch giving [B, D] features (e.g. raw pixels).
        device: where the batches go.
    Returns:
        name -> float32 [N, C] features in the order of `items`.
    """
    # Similar lengths share a batch (less padding); features go back to the input order below.
    order = sorted(range(len(items)), key=lambda i: _length(items[i]))
    fns = {name: (lambda b, e=enc: pooled_features(e, b)) for name, enc in encoders.items()}
    fns.update(extra or {})
    chunks: dict[str, list[Tensor]] = {name: [] for name in fns}
    for start in range(0, len(order), batch_size):
        batch = collate([items[i] for i in order[start:start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        for name, fn in fns.items():
            chunks[name].append(fn(batch).float().cpu())
    inverse = np.argsort(np.asarray(order))
    return {name: torch.cat(c).numpy()[inverse] for name, c in chunks.items()}


def _length(item) -> int:
    return len(item) if isinstance(item, (list, np.ndarray)) else 0


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 k: int = 20, chunk: int = 1024) -> float:
    """Accuracy of a majority vote among the k nearest training features by cosine similarity.

    Ties between classes go to the one whose tied neighbours are more similar in sum.

    Args:
        train_x: [N, C]; train_y: [N] int labels; test_x: [M, C]; test_y: [M].
        k: neighbours (at most N).
        chunk: test rows per similarity block (memory: chunk x N floats).
    Returns:
        The fraction of test samples classified correctly.
    """
    train = nn.functional.normalize(torch.from_numpy(train_x).float(), dim=1)
    test = nn.functional.normalize(torch.from_numpy(test_x).float(), dim=1)
    labels = torch.from_numpy(train_y).long()
    classes, k = int(labels.max()) + 1, min(k, len(labels))
    correct = 0
    for start in range(0, len(test), chunk):
        sim, idx = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        # Each neighbour adds 2k + its similarity: with at most k neighbours the similarities (|sum| <= k)
        # can never outweigh one vote (2k - 1 > 0), so they only break ties.
        votes = torch.zeros(len(sim), classes).scatter_add_(1, labels[idx], 2.0 * k + sim)
        correct += int((votes.argmax(dim=1).numpy() == test_y[start:start + chunk]).sum())
    return correct / len(test)


def linear_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                    max_iter: int = 1000) -> float:
    """Accuracy of multinomial logistic regression (L2, C = 1) on standardised features.

    Args:
        train_x: [N, C]; train_y: [N] int labels (at least two classes); test_x: [M, C]; test_y: [M].
        max_iter: L-BFGS iterations.
    Returns:
        The fraction of test samples classified correctly.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=max_iter)
    with warnings.catch_warnings():
        # At max_iter the fit is close enough for a probe; the warning would only be noise.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(test_x)) == test_y).mean())
