"""A few training steps of every base model on one GPU through DeepSpeed: the loss is finite and falls.

On a GPU each configs/base_*.yaml (data2vec 1.0 and 2.0, image, audio, text) trains a few bf16 steps
of its base-sized model with the `auto` kernel backend (the Triton kernels); without one, the debug
image models train a few fp32 steps on the CPU, so that the test keeps working between GPU loans.
Every step sees the same batch (and the same masks), so the student fits the teacher's targets of
that batch and the loss falls within a few steps, unlike on fresh batches where it is noisy. The data
is synthetic shards written by the test (`tests/data/synth_shards.py`): the GPU machine has no data.
Marked `gpu`: `make gpu-check` runs it (`pytest -m gpu`).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from d2v_engine.config import load_config
from tests.data.synth_shards import write_audio_shards, write_image_shards, write_text_shards

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
ON_GPU = torch.cuda.is_available()
if ON_GPU:
    CONFIGS = [f"base_{modality}{version}.yaml" for modality in ("image", "audio", "text")
               for version in ("", "_v2")]
    STEPS, BATCH, PRECISION = 6, 8, "bf16"
else:
    CONFIGS = ["debug_image.yaml", "debug_image_v2.yaml"]
    STEPS, BATCH, PRECISION = 3, 4, "fp32"
# A constant lr (no warm-up, no decay): the base recipes warm up over thousands of steps.
LR = 1e-4 if ON_GPU else 1e-3


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """Synthetic shard sets by modality: 32x32 PNGs, 0.4-1 s clips, sentences with a tokenizer."""
    root = tmp_path_factory.mktemp("base_steps")
    writers = {"image": write_image_shards, "audio": write_audio_shards, "text": write_text_shards}
    return {m: writers[m](root / m / "train", 4 * BATCH) for m in {modality(c) for c in CONFIGS}}


def modality(config: str) -> str:
    """"base_audio_v2.yaml" -> "audio"."""
    return config.split("_")[1].removesuffix(".yaml")


def fixed_batch_losses(cfg, steps: int) -> list[float]:
    """The loss of `steps` optimizer steps (`Trainer.train_step`) that all see the trainer's first batch."""
    from d2v_engine.trainer import Trainer

    trainer = Trainer(cfg)
    stream = trainer.data
    try:
        trainer.data = itertools.repeat(next(stream))
        return [float(trainer.train_step()[0]) for _ in range(steps)]
    finally:
        trainer.data = stream
        trainer.close()


@pytest.mark.parametrize("config", CONFIGS)
def test_a_few_steps_lower_the_loss(config, shards, tmp_path):
    cfg = load_config(ROOT / "configs" / config, [
        f"data.path={shards[modality(config)]}", "data.reader=torch", "data.num_workers=0",
        f"train.batch_size={BATCH}", f"train.steps={STEPS}", "train.warmup_steps=0", f"train.lr={LR}",
        "train.min_lr_ratio=1.0", f"ds.precision={PRECISION}", f"run.dir={tmp_path / 'run'}",
        "train.progress=false"])
    losses = fixed_batch_losses(cfg, STEPS)
    assert all(math.isfinite(loss) for loss in losses), losses
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first, f"{config}: the loss did not fall on a fixed batch: {losses}"
