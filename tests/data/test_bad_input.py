"""Bad input in both readers: undecodable samples are skipped, counted per shard and logged with their
shard and key; every good sample still arrives exactly once per epoch; the readers agree; a run over
shards with 1% corrupt samples finishes and reports the count in metrics.jsonl.
"""
from __future__ import annotations

import io
import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile
from synth_shards import (audio_bytes, broken_png, encoded, jpeg_bytes, make_cfg, png_bytes,
                          pretrain_in_process, train_tokenizer_for, write_image_shards, write_samples)

from d2v_engine.data import build_loader
from d2v_engine.data.checks import UnsupportedFormat, audio_format, image_header

READERS = ("torch", "dali")


def image_samples() -> tuple[list[dict], dict[int, str]]:
    """40 images in 4 shards: good ones (some under the wrong extension) and 8 bad ones.

    Returns:
        (samples, bad): bad maps a sample index to a fragment of the error it must be logged with.
    """
    rng = np.random.default_rng(11)
    jpeg, png = jpeg_bytes(rng), png_bytes(rng)
    bad = {1: "runcated", 7: "truncated PNG", 12: "not an image format", 18: "empty",
           23: "GIF", 26: "", 31: "not an image format", 38: "none of the extensions"}
    payloads = {1: {"jpg": jpeg[: len(jpeg) // 2]}, 7: {"png": png[:-30]}, 12: {"png": b"\x00" * 64},
                18: {"png": b""}, 23: {"png": encoded(rng, "GIF")}, 26: {"png": broken_png(rng)},
                31: {"jpg": b"plain text, not a picture"}, 38: {"bmp": encoded(rng, "BMP")},
                # wrong extensions that decode: not bad
                3: {"jpg": png_bytes(rng)}, 14: {"png": jpeg_bytes(rng)}, 20: {"webp": encoded(rng, "WEBP")}}
    samples = []
    for i in range(40):
        good = {"png": png_bytes(rng)} if i % 2 else {"jpg": jpeg_bytes(rng)}
        fields = dict(payloads.get(i) or good)
        samples.append({**fields, "cls": i % 10})
    return samples, bad


def audio_samples() -> tuple[list[dict], dict[int, str]]:
    """30 clips in 3 shards: FLAC, WAV (16 and 22.05 kHz), Ogg, a WAV named .flac, and 6 bad ones."""
    rng = np.random.default_rng(12)
    flac = audio_bytes(rng, 9000)
    mp3 = io.BytesIO()
    soundfile.write(mp3, rng.standard_normal(8000).astype(np.float32) * 0.1, 16000, format="MP3")
    bad = {2: "empty audio clip", 9: "unknown format", 13: "MP3", 17: "", 22: "shorter than one CNN frame",
           28: "unknown format"}
    payloads = {2: {"wav": audio_bytes(rng, 0, fmt="WAV")}, 9: {"flac": b"\x01" * 300},
                13: {"wav": mp3.getvalue()}, 17: {"flac": flac[: len(flac) // 2]},
                22: {"flac": audio_bytes(rng, 200)}, 28: {"wav": "RIFF but not really".encode()},
                5: {"flac": audio_bytes(rng, 8000, fmt="WAV")},
                11: {"wav": audio_bytes(rng, 9000, 22050, "WAV")},
                19: {"ogg": audio_bytes(rng, 12000, fmt="OGG")}}
    samples = [{**(payloads.get(i) or {"flac": audio_bytes(rng, int(rng.integers(6000, 16000)))}),
                "cls": i % 10} for i in range(30)]
    return samples, bad


@pytest.fixture(scope="module")
def bad_sets(tmp_path_factory) -> dict[str, tuple[str, Path, dict[int, str]]]:
    """modality -> (debug model, shard folder, bad samples)."""
    root = tmp_path_factory.mktemp("bad")
    images, bad_images = image_samples()
    clips, bad_clips = audio_samples()
    texts = ["alpha bravo charlie", b"\xff\xfe not utf-8", "   ", "delta echo foxtrot golf"] * 6
    path = write_samples(root / "text" / "train", "text",
                         [{"txt": t, "cls": i % 3} for i, t in enumerate(texts)])
    train_tokenizer_for(path)
    return {"image": ("image_debug", write_samples(root / "image", "image", images), bad_images),
            "audio": ("audio_debug", write_samples(root / "audio", "audio", clips), bad_clips),
            "text": ("text_debug", path, {i: "UnicodeDecodeError" if i % 4 == 1 else "empty text"
                                          for i in range(24) if i % 4 in (1, 2)})}


def epoch_outcome(stream, epoch: int) -> tuple[list[int], list[tuple[str, str, str]]]:
    """The good sample indices in batch order and the (shard, key, error) of the bad ones."""
    steps = stream.decoded(epoch)
    good, bad = [], []
    for step in steps:
        good += step.index
        bad += step.bad
    return good, bad


@pytest.mark.parametrize("modality", ["image", "audio", "text"])
def test_readers_skip_and_count_the_same_bad_samples(bad_sets, modality):
    model, path, bad = bad_sets[modality]
    n = {"image": 40, "audio": 30, "text": 24}[modality]   # good samples fill whole batches of 4
    outcomes = {}
    for reader in READERS:
        cfg, spec = make_cfg(model, path, f"data.reader={reader}")
        stream = build_loader(cfg, spec)
        for epoch in (0, 1):
            good, skipped = epoch_outcome(stream, epoch)
            assert sorted(good) == sorted(set(range(n)) - set(bad)), (reader, epoch)   # exactly once
            keys = {key: (shard, error) for shard, key, error in skipped}
            assert sorted(keys) == [f"{i:05d}" for i in sorted(bad)], (reader, epoch)
            for i, fragment in bad.items():
                shard, error = keys[f"{i:05d}"]
                assert shard == f"shard-{i // 10:06d}.tar" and fragment in error, (reader, i, error)
            outcomes[reader, epoch] = good
    assert outcomes["torch", 0] == outcomes["dali", 0] and outcomes["torch", 1] == outcomes["dali", 1]
    assert outcomes["torch", 0] != outcomes["torch", 1]


@pytest.mark.parametrize("reader", READERS)
def test_stream_counts_per_shard_logs_once_and_resumes(bad_sets, reader, caplog):
    model, path, bad = bad_sets["image"]
    cfg, spec = make_cfg(model, path, f"data.reader={reader}")
    stream = build_loader(cfg, spec)
    with caplog.at_level(logging.WARNING, logger="d2v_engine.data"):
        first = list(itertools.islice(stream, 8))          # epoch 0: 32 good samples
        state = stream.state_dict()
        later = list(itertools.islice(stream, 9))          # epoch 1 and the first batch of epoch 2
    order = stream.order(0)
    assert state["offset"] == 1 + max(np.flatnonzero(~np.isin(order, list(bad))))
    assert state["bad_samples"] == int(np.isin(order[: state["offset"]], list(bad)).sum())
    assert state["samples_read"] == state["offset"] and stream.state_dict()["epoch"] == 2
    assert sum(stream.bad_by_shard.values()) == stream.bad_samples >= 16
    assert stream.bad_by_shard["shard-000000.tar"] >= 4 and stream.bad_by_shard["shard-000003.tar"] >= 4
    skipped = [r.getMessage() for r in caplog.records if "skipped undecodable" in r.getMessage()]
    assert len(skipped) == len(bad)                        # each bad sample is logged once
    assert any("00023 in shard shard-000002.tar" in m and "GIF" in m for m in skipped)
    assert any("epoch 0: 8 bad samples" in r.getMessage() for r in caplog.records)
    resumed = build_loader(cfg, spec, position=state)
    for expected, got in zip(later, itertools.islice(resumed, len(later))):
        assert expected["index"].tolist() == got["index"].tolist()
    assert resumed.state_dict() == stream.state_dict()


@pytest.mark.parametrize("reader", READERS)
def test_truncated_tar_counts_the_cut_sample(tmp_path, reader, caplog):
    path = write_image_shards(tmp_path / "train", 30)
    shard = path / "shard-000002.tar"
    data = shard.read_bytes()
    # Cut inside the payload of sample 00024 (the 5th sample of the shard).
    cut = data.find(b"00024.png") + 512 + 100
    shard.write_bytes(data[:cut])
    cfg, spec = make_cfg("image_debug", path, f"data.reader={reader}")
    with caplog.at_level(logging.WARNING, logger="d2v_engine.data"):
        stream = build_loader(cfg, spec)
        good, skipped = epoch_outcome(stream, 0)
    assert sorted(good) == list(range(24))
    assert [(s, k) for s, k, _ in skipped] == [("shard-000002.tar", "00024")]
    assert "short read" in skipped[0][2]
    assert any("shard-000002.tar is truncated" in r.getMessage() for r in caplog.records)


def test_checks_go_by_content_not_extension():
    rng = np.random.default_rng(5)
    assert image_header(png_bytes(rng, size=20))[0] == "png"
    assert image_header(jpeg_bytes(rng, size=24)) == ("jpeg", 24, 24)
    assert image_header(encoded(rng, "WEBP", size=16)) == ("webp", 16, 16)
    for data, match in ((encoded(rng, "GIF"), "GIF"), (encoded(rng, "BMP"), "BMP"), (b"", "empty")):
        with pytest.raises(ValueError, match=match):
            image_header(data)
    with pytest.raises(UnsupportedFormat):
        image_header(b"<html>no image</html>")
    assert audio_format(audio_bytes(rng, 500, fmt="WAV")) == "wav"
    assert audio_format(audio_bytes(rng, 500, fmt="OGG")) == "ogg"
    with pytest.raises(UnsupportedFormat, match="MP3"):
        audio_format(b"ID3\x04" + bytes(100))


def test_run_over_one_percent_corrupt_samples_finishes_and_reports_them(tmp_path, monkeypatch, capsys):
    path = write_image_shards(tmp_path / "train", 200, shard_size=50, corrupt={17, 140})
    records = pretrain_in_process(monkeypatch, "debug_image.yaml", tmp_path / "run", f"data.path={path}",
                                  "data.reader=dali", "data.max_bad_fraction=0.02", "data.num_workers=1",
                                  "train.steps=14", "train.batch_size=16", "train.log_every=7",
                                  "train.warmup_steps=2")
    assert [r["step"] for r in records] == [7, 14]
    # 14 batches of 16 pass the 198 good samples of epoch 0: both corrupt ones were met and counted.
    assert records[-1]["bad_samples"] >= 2 and records[0]["bad_samples"] <= records[-1]["bad_samples"]
    assert records[-1]["loss"] == records[-1]["loss"]
    out = capsys.readouterr()
    assert "bad samples" in out.out + out.err
