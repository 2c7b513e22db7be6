"""`d2v prepare` on the real offline sources, with small limits, and the reader over the result."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import soundfile
from PIL import Image
from synth_shards import make_cfg
from tokenizers import Tokenizer

import d2v_engine.data.prepare as prepare_mod
from d2v_engine import cli
from d2v_engine.data import build_loader
from d2v_engine.data.prepare import PrepareOptions, prepare, read_idx
from d2v_engine.data.prepare_speech import DIGITS
from d2v_engine.data.shards import is_complete, list_shards, read_manifest
from d2v_engine.data.tarindex import build_index


def members(folder):
    index = build_index(list_shards(folder))
    return [index.read(i) for i in range(len(index))]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    for name, limit in (("fashion-mnist", 24), ("spoken-words", 3), ("text-corpus", 40)):
        prepare(name, out, PrepareOptions(limit=limit, shard_size=10, workers=2))
    return out


def test_fashion_mnist_matches_the_idx_files(prepared):
    root = prepared / "fashion-mnist"
    images = read_idx(prepare_mod.FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(prepare_mod.FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    for split in ("train", "test"):
        manifest = read_manifest(root / split)
        assert manifest["total"] == 24 and [s["count"] for s in manifest["shards"]] == [10, 10, 4]
        assert manifest["modality"] == "image" and len(manifest["classes"]) == 10
    samples = members(root / "test")
    for i in (0, 23):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(samples[i]["png"]))), images[i])
        assert int(samples[i]["cls"]) == labels[i]


def test_spoken_words_splits_and_held_out_voices(prepared):
    root = prepared / "spoken-words"
    heldout = set(read_manifest(root / "train")["heldout_voices"])
    assert heldout and heldout.isdisjoint(read_manifest(root / "train")["train_voices"])
    for split in ("train", "probe_train", "probe_test"):
        assert read_manifest(root / split)["total"] == 3
        for raw in members(root / split):
            wave, rate = soundfile.read(io.BytesIO(raw["flac"]))
            assert rate == 16000 and wave.ndim == 1 and len(wave) > 1600 and np.abs(wave).max() > 0.01
            meta = json.loads(raw["json"])
            assert (meta["voice"].split("+")[1] in heldout) == (split == "probe_test")
            words = meta["text"].split()
            if split == "train":
                assert "cls" not in raw and 2 <= len(words) <= 5
            else:
                assert len(words) == 1 and int(raw["cls"]) == DIGITS.index(words[0])


def test_text_corpus_splits_and_tokenizer(prepared):
    root = prepared / "text-corpus"
    texts = {split: [r["txt"].decode() for r in members(root / split)]
             for split in ("train", "probe_train", "probe_test")}
    assert all(len(t) == 40 for t in texts.values())
    assert not set(texts["probe_test"]) & set(texts["probe_train"])
    labels = [int(r["cls"]) for r in members(root / "probe_test")]
    assert all(0 <= c <= 44 for c in labels) and len(set(labels)) > 3
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert [tokenizer.token_to_id(t) for t in specials] == [0, 1, 2, 3, 4]
    assert tokenizer.decode(tokenizer.encode(texts["train"][0]).ids) == texts["train"][0]


def test_prepare_is_idempotent_and_atomic(tmp_path, capsys):
    opts = PrepareOptions(limit=5)
    root = prepare("fashion-mnist", tmp_path, opts)
    stamp = os.stat(root / "train" / "manifest.json").st_mtime_ns
    # A killed run leaves its temp folder behind: it never counts and is swept up.
    stale = tmp_path / ".fashion-mnist.tmp-999999999"
    (stale / "train").mkdir(parents=True)
    prepare("fashion-mnist", tmp_path, opts)
    assert "nothing to do" in capsys.readouterr().err
    assert os.stat(root / "train" / "manifest.json").st_mtime_ns == stamp
    # Another limit rebuilds in place; an incomplete set is rebuilt too.
    prepare("fashion-mnist", tmp_path, PrepareOptions(limit=7))
    assert read_manifest(root / "train")["total"] == 7 and not stale.exists()
    (root / "test" / "manifest.json").unlink()
    prepare("fashion-mnist", tmp_path, PrepareOptions(limit=7))
    assert is_complete(root / "test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fashion-mnist"]


@pytest.mark.parametrize("model, folder, overrides", [
    ("image_debug", "fashion-mnist/train", ()),
    ("audio_debug", "spoken-words/probe_train", ("train.batch_size=3", "mask.prob=0.65")),
    ("text_debug", "text-corpus/train", ("mask.prob=0.15",)),
])
def test_reader_over_prepared_data(prepared, model, folder, overrides):
    cfg, spec = make_cfg(model, prepared / folder, *overrides)
    stream = build_loader(cfg, spec)
    batch = next(stream)
    assert batch["index"].shape == (stream.batch_size,) and stream.bad_samples == 0
    if model == "image_debug":
        assert batch["images"].shape == (4, 3, 28, 28)
    elif model == "audio_debug":
        assert (batch["labels"] >= 0).all() and batch["mask"].any()
    else:
        assert stream.vocab_size > 261 and (batch["clean"] < stream.vocab_size).all()


def test_cli_prepare_and_user_error(tmp_path, monkeypatch, capsys):
    assert cli.main(["prepare", "fashion-mnist", "--out", str(tmp_path), "--limit", "3"]) == 0
    assert read_manifest(tmp_path / "fashion-mnist" / "test")["total"] == 3
    monkeypatch.setattr(prepare_mod, "FASHION_DIR", tmp_path / "nowhere")
    assert cli.main(["prepare", "fashion-mnist", "--out", str(tmp_path / "x"), "--limit", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("d2v: error: ") and "dataset-fashion-mnist" in err
    with pytest.raises(SystemExit):
        cli.main(["prepare", "imagenet"])


def test_failed_prepare_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    calls = []

    def flaky_png(image):
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return b"png"

    monkeypatch.setattr(prepare_mod, "_png", flaky_png)
    with pytest.raises(KeyboardInterrupt):
        prepare("fashion-mnist", tmp_path, PrepareOptions(limit=8))
    assert list(tmp_path.iterdir()) == []
