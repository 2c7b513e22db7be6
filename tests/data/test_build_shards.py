"""`d2v shards`: shards from a folder of the user's own images, audio or text, read by both readers."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import soundfile
from synth_shards import audio_bytes, encoded, jpeg_bytes, make_cfg, png_bytes

from d2v_engine.cli import main
from d2v_engine.data import build_loader
from d2v_engine.data.shards import list_shards, read_manifest


def shards(modality: str, src, out, *args: str) -> int:
    """`d2v shards` through the CLI's entry point; returns the exit status."""
    return main(["shards", "--modality", modality, "--src", str(src), "--out", str(out), *args])


def members(folder) -> list[tuple[str, bytes]]:
    """(name, payload) of every member of every shard, in shard order."""
    out = []
    for shard in list_shards(folder):
        with tarfile.open(shard) as tar:
            out += [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    return out


@pytest.fixture
def image_tree(tmp_path):
    """cats/ and dogs/ in assorted formats (BMP, GIF, TIFF convert to PNG), two unreadable files."""
    rng = np.random.default_rng(7)
    src = tmp_path / "photos"
    files = {"cats/a.jpg": jpeg_bytes(rng), "cats/b.png": png_bytes(rng), "cats/c.bmp": encoded(rng, "BMP"),
             "cats/d.gif": encoded(rng, "GIF"), "dogs/e.webp": encoded(rng, "WEBP"),
             "dogs/f.tiff": encoded(rng, "TIFF"), "dogs/deep/g.JPEG": jpeg_bytes(rng),
             "dogs/h.jpg": png_bytes(rng),                     # a PNG under the wrong name: kept as .png
             "dogs/broken.jpg": jpeg_bytes(rng)[:200], "cats/notes.txt": b"not an image"}
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    return src


def test_image_folder_becomes_labelled_shards_for_both_readers(image_tree, tmp_path, capsys):
    out = tmp_path / "shards"
    assert shards("image", image_tree, out, "--shard-size", "3") == 0
    assert "8 image samples in 3 shard(s)" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["total"] == 8 and [s["count"] for s in manifest["shards"]] == [3, 3, 2]
    assert manifest["classes"] == ["cats", "dogs"] and manifest["skipped"]["count"] == 2
    assert any("broken.jpg" in f for f in manifest["skipped"]["files"])
    assert sorted(p.name for p in out.glob("*.idx")) == [s["name"][:-4] + ".idx" for s in manifest["shards"]]
    found = members(out)
    exts = sorted(name.split(".", 1)[1] for name, _ in found if not name.endswith(".cls"))
    assert exts == ["jpg", "jpg", "png", "png", "png", "png", "png", "webp"]
    labels = [int(data) for name, data in found if name.endswith(".cls")]
    assert sorted(labels) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert labels != sorted(labels)                          # shuffled, not in folder order
    for reader in ("torch", "dali"):
        cfg, spec = make_cfg("image_debug", out, f"data.reader={reader}", "train.batch_size=8")
        batch = next(build_loader(cfg, spec))
        assert sorted(batch["labels"].tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_same_seed_same_shards_and_no_overwrite(image_tree, tmp_path):
    for name in ("a", "b"):
        assert shards("image", image_tree, tmp_path / name, "--seed", "3") == 0
    assert members(tmp_path / "a") == members(tmp_path / "b")
    assert shards("image", image_tree, tmp_path / "a") == 2


def test_audio_folder_keeps_wav_flac_ogg_and_converts_mp3(tmp_path):
    rng = np.random.default_rng(8)
    src = tmp_path / "clips"
    (src / "yes").mkdir(parents=True)
    (src / "no").mkdir()
    mp3 = io.BytesIO()
    soundfile.write(mp3, (0.2 * rng.standard_normal(12000)).astype(np.float32), 16000, format="MP3")
    files = {"yes/1.wav": audio_bytes(rng, 9000, fmt="WAV"), "yes/2.flac": audio_bytes(rng, 9000),
             "no/3.ogg": audio_bytes(rng, 12000, fmt="OGG"), "no/4.mp3": mp3.getvalue(),
             "no/5.wav": b"RIFF broken"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    out = tmp_path / "shards"
    assert shards("audio", src, out, "--no-shuffle") == 0
    manifest = read_manifest(out)
    assert manifest["total"] == 4 and manifest["skipped"]["count"] == 1
    exts = [n.split(".", 1)[1] for n, _ in members(out) if not n.endswith(".cls")]
    assert exts == ["ogg", "flac", "wav", "flac"]
    for reader in ("torch", "dali"):
        cfg, spec = make_cfg("audio_debug", out, f"data.reader={reader}")
        assert sorted(next(build_loader(cfg, spec))["labels"].tolist()) == [0, 0, 1, 1]


def test_text_lines_and_json_lines(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_bytes(b"first line of text\n\nsecond line\n\xff\xfe broken line\n")
    records = [{"text": "a json sample", "label": 2}, {"text": "another one", "label": 5},
               {"body": "no text"}]
    (src / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    out = tmp_path / "text" / "train"
    assert shards("text", src, out, "--no-shuffle", "--tokenizer-vocab", "300") == 0
    manifest = read_manifest(out)
    texts = [data.decode() for name, data in members(out) if name.endswith(".txt")]
    assert texts == ["first line of text", "second line", "a json sample", "another one"]
    assert manifest["skipped"]["count"] == 3 and manifest["classes"] is None
    assert [int(d) for n, d in members(out) if n.endswith(".cls")] == [2, 5]
    cfg, spec = make_cfg("text_debug", out, "train.batch_size=4")      # finds out/tokenizer.json
    stream = build_loader(cfg, spec)
    assert next(stream)["tokens"].shape[0] == 4 and stream.vocab_size <= 300


def test_user_errors(tmp_path, capsys):
    assert shards("text", tmp_path / "none", tmp_path / "o") == 2
    (tmp_path / "empty").mkdir()
    assert shards("image", tmp_path / "empty", tmp_path / "o") == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0].startswith("d2v: error: --src") and "no readable image sample" in errors[1]
    assert not (tmp_path / "o").exists()
