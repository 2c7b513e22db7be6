"""Small synthetic shard sets and configs for the data tests (each built in well under a second)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

from d2v_engine.config import load_config
from d2v_engine.data.prepare_text import train_tokenizer
from d2v_engine.data.shards import ShardSetWriter
from d2v_engine.models.registry import get_spec

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
         "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def png_bytes(rng: np.random.Generator, size: int = 32, mode: str = "RGB") -> bytes:
    """A PNG of random pixels (never constant)."""
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(1, 255, shape, dtype=np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def audio_bytes(rng: np.random.Generator, samples: int, rate: int = 16000, fmt: str = "FLAC") -> bytes:
    """A clip: a random tone plus noise, offset from zero (so normalisation has work to do)."""
    t = np.arange(samples) / rate
    wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) + 0.05 * rng.standard_normal(samples) + 0.1
    buf = io.BytesIO()
    soundfile.write(buf, wave.astype(np.float32), rate, format=fmt,
                    subtype="VORBIS" if fmt == "OGG" else "PCM_16")
    return buf.getvalue()


def sentence(rng: np.random.Generator) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(3, 20))))


def write_image_shards(folder: Path, n: int, *, shard_size: int = 10, corrupt=(), mode="RGB") -> Path:
    """n random PNGs with labels i % 10; the keys in `corrupt` get garbage bytes instead."""
    rng = np.random.default_rng(1)
    with ShardSetWriter(folder, modality="image", shard_size=shard_size) as w:
        for i in range(n):
            data = b"this is not a png" * 3 if i in corrupt else png_bytes(rng, mode=mode)
            w.write(f"{i:05d}", png=data, cls=i % 10)
    return folder


def write_audio_shards(folder: Path, n: int, *, shard_size: int = 10, lengths=(6000, 16000)) -> Path:
    """n clips of random length; every fifth is a 22.05 kHz WAV (exercises the resampler)."""
    rng = np.random.default_rng(2)
    with ShardSetWriter(folder, modality="audio", shard_size=shard_size) as w:
        for i in range(n):
            samples = int(rng.integers(*lengths))
            if i % 5 == 4:
                w.write(f"{i:05d}", wav=audio_bytes(rng, int(samples * 22050 / 16000), 22050, "WAV"),
                        cls=i % 10)
            else:
                w.write(f"{i:05d}", flac=audio_bytes(rng, samples), cls=i % 10)
    return folder


def write_text_shards(folder: Path, n: int, *, shard_size: int = 10, tokenizer: bool = True) -> Path:
    """n random sentences; a tokenizer.json one folder up (as `d2v prepare text-corpus` lays out)."""
    rng = np.random.default_rng(3)
    texts = [sentence(rng) for _ in range(n)]
    with ShardSetWriter(folder, modality="text", shard_size=shard_size) as w:
        for i, text in enumerate(texts):
            w.write(f"{i:05d}", txt=text, cls=i % 3)
    if tokenizer:
        train_tokenizer(texts * 3, folder.parent / "tokenizer.json", vocab_size=300)
    return folder


def make_cfg(model: str, path: Path | str, *overrides: str):
    """A validated config for `model` reading `path` (top_k fits the debug models)."""
    cfg = load_config(None, [f"model.name={model}", f"data.path={path}", "target.top_k=2",
                             "data.num_workers=0", "train.batch_size=4", *overrides])
    return cfg, get_spec(model)


def jpeg_bytes(rng: np.random.Generator, size: int = 32) -> bytes:
    """A JPEG of random pixels."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(1, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def encoded(rng: np.random.Generator, fmt: str, size: int = 32) -> bytes:
    """A random image in PIL format `fmt` (GIF, BMP, WEBP, ...)."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(1, 255, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def broken_png(rng: np.random.Generator) -> bytes:
    """A PNG whose headers and end are intact but whose compressed pixels are damaged: it passes the
    readers' checks and fails in the decoder (DALI then fails the whole batch)."""
    data = bytearray(png_bytes(rng))
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def write_samples(folder: Path, modality: str, samples: list[dict], shard_size: int = 10) -> Path:
    """Write `samples` (extension -> payload, in key order) as a shard set."""
    with ShardSetWriter(folder, modality=modality, shard_size=shard_size) as w:
        for i, fields in enumerate(samples):
            w.write(f"{i:05d}", **fields)
    return folder


def train_tokenizer_for(folder: Path) -> None:
    """A small BPE tokenizer.json one folder above `folder`, trained on the NATO alphabet."""
    rng = np.random.default_rng(4)
    train_tokenizer([sentence(rng) for _ in range(60)], folder.parent / "tokenizer.json", vocab_size=300)


def pretrain_in_process(monkeypatch, config: str, run_dir: Path, *overrides: str) -> list[dict]:
    """Train configs/`config` in this process (one thread); returns the metrics.jsonl records."""
    import torch

    from d2v_engine.config import load_config
    from d2v_engine.metrics import read_metrics
    from d2v_engine.trainer import Trainer

    for key, value in (("MASTER_PORT", "29741"), ("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / config,
                          [f"run.dir={run_dir}", "train.progress=false", *overrides])
        trainer = Trainer(cfg)
        try:
            trainer.train()
        finally:
            trainer.close()
    finally:
        torch.set_num_threads(threads)
    return read_metrics(run_dir)
