"""User errors of the `torch` reader: one sentence that says what to do, never a traceback."""
from __future__ import annotations

import shutil

import pytest
import torch
from synth_shards import make_cfg, write_image_shards, write_text_shards

from d2v_engine.data import build_loader
from d2v_engine.errors import UserError


def loader(model, path, *overrides, **kw):
    cfg, spec = make_cfg(model, path, *overrides)
    return build_loader(cfg, spec, **kw)


def assert_one_sentence(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message.endswith(".")
    return message


def test_missing_path(tmp_path):
    with pytest.raises(UserError) as err:
        loader("image_debug", tmp_path / "nowhere")
    message = assert_one_sentence(err)
    assert "does not exist" in message and "d2v prepare fashion-mnist" in message


def test_folder_without_shards(tmp_path):
    (tmp_path / "notes.txt").write_text("no shards here")
    with pytest.raises(UserError, match="holds no .tar shards") as err:
        loader("text_debug", tmp_path)
    assert "d2v prepare text-corpus" in assert_one_sentence(err)


@pytest.mark.parametrize("model, other", [("image_debug", "audio"), ("audio_debug", "image"),
                                          ("text_debug", "image"), ("image_debug", "text")])
def test_shards_of_another_modality(shard_sets, model, other):
    with pytest.raises(UserError) as err:
        loader(model, shard_sets[other][1])
    message = assert_one_sentence(err)
    assert f"holds {other} samples" in message and model in message


def test_text_without_tokenizer(tmp_path):
    path = write_text_shards(tmp_path / "train", 12, tokenizer=False)
    with pytest.raises(UserError, match="needs a tokenizer") as err:
        loader("text_debug", path)
    assert "d2v prepare text-corpus" in assert_one_sentence(err)
    with pytest.raises(UserError, match="data.tokenizer .* does not exist"):
        loader("text_debug", path, f"data.tokenizer={tmp_path / 'missing.json'}")


def test_explicit_tokenizer_is_used(tmp_path, text_shards):
    path = write_text_shards(tmp_path / "train", 12, tokenizer=False)
    tokenizer = tmp_path / "elsewhere.json"
    shutil.copy(text_shards.parent / "tokenizer.json", tokenizer)
    batch = next(loader("text_debug", path, f"data.tokenizer={tokenizer}"))
    assert batch["tokens"].dtype == torch.int64


def test_max_tokens_too_small(text_shards):
    with pytest.raises(UserError, match="data.max_tokens=2"):
        loader("text_debug", text_shards, "data.max_tokens=2")


def test_batch_larger_than_the_data(image_shards):
    with pytest.raises(UserError, match="train.batch_size=64") as err:
        loader("image_debug", image_shards, "train.batch_size=64")
    assert_one_sentence(err)
    with pytest.raises(UserError, match="train.batch_size=4"):
        loader("image_debug", image_shards, "train.batch_size=4", world_size=8)


def test_all_samples_bad_stops_with_a_user_error(tmp_path):
    path = write_image_shards(tmp_path / "train", 8, corrupt=set(range(8)))
    stream = loader("image_debug", path)
    with pytest.raises(UserError, match="could be decoded, too few for one batch") as err:
        next(stream)
    assert_one_sentence(err)


@pytest.mark.parametrize("workers", [0, 2])
def test_user_error_from_the_collate_stays_one_sentence(image_shards, workers):
    stream = loader("image_debug", image_shards, "mask.min_aspect=1.5", f"data.num_workers={workers}")
    with pytest.raises(UserError, match="^mask.min_aspect must lie in") as err:
        next(stream)
    assert_one_sentence(err)


def test_brace_pattern_and_single_shard(image_shards):
    pattern = str(image_shards / "shard-{000000..000001}.tar")
    stream = loader("image_debug", pattern)
    assert stream.num_samples == 20
    assert loader("image_debug", image_shards / "shard-000003.tar").num_samples == 10
