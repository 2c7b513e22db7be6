"""Fixtures for the data tests: synthetic shard sets shared by the whole session."""
from __future__ import annotations

from pathlib import Path

import pytest
from synth_shards import write_audio_shards, write_image_shards, write_text_shards


@pytest.fixture(scope="session")
def image_shards(tmp_path_factory) -> Path:
    return write_image_shards(tmp_path_factory.mktemp("img") / "train", 40)


@pytest.fixture(scope="session")
def audio_shards(tmp_path_factory) -> Path:
    return write_audio_shards(tmp_path_factory.mktemp("aud") / "train", 30)


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory) -> Path:
    return write_text_shards(tmp_path_factory.mktemp("txt") / "train", 40)


@pytest.fixture(scope="session")
def shard_sets(image_shards, audio_shards, text_shards) -> dict[str, tuple[str, Path]]:
    """modality -> (debug model name, shard folder)."""
    return {"image": ("image_debug", image_shards), "audio": ("audio_debug", audio_shards),
            "text": ("text_debug", text_shards)}
