"""spoken-words' transcribed splits (ctc_train, ctc_test) and `read_transcribed` over them and user shards."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import soundfile
from synth_shards import audio_bytes, make_cfg, write_samples

from d2v_engine.ctc import CharVocab
from d2v_engine.data import build_loader
from d2v_engine.data.prepare import PrepareOptions, prepare
from d2v_engine.data.prepare_speech import COMMANDS, DIGITS
from d2v_engine.data.shards import list_shards, modality_of, read_manifest
from d2v_engine.data.tarindex import build_index
from d2v_engine.data.transcripts import read_transcribed
from d2v_engine.errors import UserError

LIMIT = 8


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    return prepare("spoken-words", tmp_path_factory.mktemp("prepared"),
                   PrepareOptions(limit=LIMIT, shard_size=5, workers=2))


def members(folder):
    index = build_index(list_shards(folder))
    return [index.read(i) for i in range(len(index))]


def seconds(raw) -> float:
    return soundfile.info(io.BytesIO(raw["flac"])).duration


@pytest.mark.parametrize("split", ["ctc_train", "ctc_test"])
def test_transcribed_splits_keep_the_voice_split(spoken, split):
    manifest = read_manifest(spoken / split)
    voices = set(manifest["heldout_voices" if split == "ctc_test" else "train_voices"])
    assert manifest["total"] == LIMIT and manifest["modality"] == "audio" and voices
    words = set(COMMANDS + DIGITS)
    for raw in members(spoken / split):
        meta, text = json.loads(raw["json"]), raw["txt"].decode()
        assert meta["voice"].split("+")[1] in voices and text == meta["text"]
        assert 2 <= len(text.split()) <= 5 and set(text.split()) <= words and "cls" not in raw
        assert CharVocab().decode(CharVocab().encode(text)) == text
        assert soundfile.info(io.BytesIO(raw["flac"])).samplerate == 16000 and seconds(raw) > 0.3


def test_transcribed_clips_are_new_and_pretrain_as_audio(spoken):
    train = {r["flac"] for r in members(spoken / "train")}
    assert not train & {r["flac"] for r in members(spoken / "ctc_train")}
    # The `.txt` beside each clip does not make it a text sample: the audio reader takes the folder.
    assert modality_of(read_manifest(spoken / "ctc_train")["extensions"]) == "audio"
    assert modality_of({"png", "txt"}) == "image" and modality_of({"txt", "cls"}) == "text"
    cfg, spec = make_cfg("audio_debug", spoken / "ctc_train", "train.batch_size=4", "mask.prob=0.65")
    stream = build_loader(cfg, spec)
    batch = next(stream)
    assert batch["index"].shape == (4,) and stream.bad_samples == 0 and batch["mask"].any()


def test_read_transcribed_stops_at_the_time_limit(spoken):
    raws = members(spoken / "ctc_train")
    durations = np.cumsum([seconds(r) for r in raws])
    every, texts, empty = read_transcribed(spoken / "ctc_train", None, "spoken-words-ctc", "spoken-words")
    assert [r["flac"] for r in every] == [r["flac"] for r in raws] and empty == 0
    assert texts == [r["txt"].decode() for r in raws]
    for n in (1, 3, LIMIT - 1):
        for limit in (durations[n - 1] + 1e-6, durations[n] - 1e-3):
            got, texts, _ = read_transcribed(spoken / "ctc_train", limit, "t", "spoken-words")
            assert len(got) == len(texts) == n and got[-1]["flac"] == raws[n - 1]["flac"]
    with pytest.raises(UserError, match="raise the limit"):
        read_transcribed(spoken / "ctc_train", durations[0] / 2, "t", "spoken-words")


def test_re_prepare_completes_a_set_without_the_transcribed_splits(spoken, tmp_path, capsys):
    old = shutil.copytree(spoken, tmp_path / "spoken-words")
    shutil.rmtree(old / "ctc_train")
    shutil.rmtree(old / "ctc_test")
    again = prepare("spoken-words", tmp_path, PrepareOptions(limit=LIMIT, shard_size=5, workers=2))
    assert "nothing to do" not in capsys.readouterr().err
    for split in ("train", "probe_train", "probe_test", "ctc_train", "ctc_test"):
        files = sorted(p.name for p in (spoken / split).iterdir())
        assert sorted(p.name for p in (again / split).iterdir()) == files and len(files) == 5
        for name in files:
            assert (again / split / name).read_bytes() == (spoken / split / name).read_bytes(), (split, name)


def test_read_transcribed_on_user_shards(tmp_path):
    rng = np.random.default_rng(5)
    clip = [audio_bytes(rng, int(rng.integers(4000, 9000))) for _ in range(5)]
    samples = [{"flac": clip[0], "txt": " Go up  "},
               {"flac": clip[1]},
               {"wav": audio_bytes(rng, 5000, fmt="WAV"), "txt": "left"},
               {"flac": clip[2], "txt": "  "},
               {"flac": clip[3], "txt": ""},
               {"flac": clip[4], "cls": 1},
               {"flac": clip[0], "txt": "stop", "json": "{}"}]
    folder = write_samples(tmp_path / "user", "audio", samples, shard_size=3)
    raws, texts, empty = read_transcribed(folder, None, "custom", "")
    assert texts == ["Go up", "left", "stop"] and empty == 2
    assert [sorted(r) for r in raws] == [["flac", "txt"], ["txt", "wav"], ["flac", "json", "txt"]]


@pytest.mark.parametrize("samples, message", [
    ([{"flac": b"", "txt": b"\xff\xfe"}], "not UTF-8"),
    ([{"txt": "hello"}], "no .flac/.wav/.ogg audio"),
    ([{"flac": b"fLaC broken", "txt": "hello"}], "unreadable audio"),
    ([{"flac": "x", "txt": " "}, {"flac": "y", "cls": 2}], "found none with a non-empty one"),
])
def test_read_transcribed_user_errors(tmp_path, samples, message):
    folder = write_samples(tmp_path / "bad", "audio", samples)
    with pytest.raises(UserError, match=message):
        read_transcribed(folder, None, "custom", "")
    with pytest.raises(UserError, match="d2v prepare spoken-words"):
        read_transcribed(tmp_path / "missing", None, "spoken-words-ctc", "spoken-words")
