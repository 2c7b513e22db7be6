"""Shard writing, manifests, shard lists and the tar index (fast header scan and its fallbacks)."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from synth_shards import png_bytes

from d2v_engine.data.shards import (ShardSetWriter, is_complete, list_shards, modality_of,
                                    read_manifest)
from d2v_engine.data.tarindex import _scan_ustar, _scan_with_tarfile, build_index


def write_set(folder, n, shard_size=3):
    rng = np.random.default_rng(0)
    payloads = [png_bytes(rng, size=8) for _ in range(n)]
    with ShardSetWriter(folder, modality="image", shard_size=shard_size, extra={"source": "test"}) as w:
        for i, data in enumerate(payloads):
            w.write(f"k{i:03d}", png=data, cls=i % 4)
    return payloads


def test_writer_splits_into_shards_and_writes_a_manifest(tmp_path):
    write_set(tmp_path, 10)
    manifest = read_manifest(tmp_path)
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 3, 1]
    assert manifest["total"] == 10 and manifest["modality"] == "image"
    assert manifest["extensions"] == ["cls", "png"] and manifest["source"] == "test"
    assert manifest["complete"] and is_complete(tmp_path)
    assert [p.name for p in list_shards(tmp_path)] == [s["name"] for s in manifest["shards"]]
    (tmp_path / "shard-000001.tar").unlink()
    assert not is_complete(tmp_path)


def test_shards_are_byte_identical_across_runs(tmp_path):
    write_set(tmp_path / "a", 5)
    write_set(tmp_path / "b", 5)
    for a, b in zip(list_shards(tmp_path / "a"), list_shards(tmp_path / "b")):
        assert a.read_bytes() == b.read_bytes()


def test_failed_write_leaves_no_manifest(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardSetWriter(tmp_path, modality="text") as w:
            w.write("a", txt="hello")
            raise RuntimeError("killed")
    assert read_manifest(tmp_path) is None and not is_complete(tmp_path)


def test_empty_set_and_bad_keys(tmp_path):
    with ShardSetWriter(tmp_path, modality="audio") as w:
        with pytest.raises(ValueError):
            w.write("a.b", flac=b"x")
    assert read_manifest(tmp_path)["total"] == 0 and list_shards(tmp_path) == []


def test_modality_of():
    assert modality_of({"PNG", "cls"}) == "image" and modality_of({"flac"}) == "audio"
    assert modality_of({"txt", "cls"}) == "text" and modality_of({"cls", "json"}) is None


def test_list_shards_brace_pattern(tmp_path):
    write_set(tmp_path, 10)
    assert len(list_shards(tmp_path / "shard-{000000..000002}.tar")) == 3
    assert list_shards(tmp_path / "shard-{000007..000009}.tar") == []
    assert list_shards(tmp_path / "missing") == []


def test_index_reads_back_every_member(tmp_path):
    payloads = write_set(tmp_path, 10)
    index = build_index(list_shards(tmp_path))
    assert len(index) == 10 and index.keys[4] == "k004" and index.shard_of[4] == 1
    for i, data in enumerate(payloads):
        raw = index.read(i)
        assert raw["png"] == data and raw["cls"] == str(i % 4).encode()
    shard = str(list_shards(tmp_path)[0])
    assert _scan_ustar(shard) == _scan_with_tarfile(shard)


@pytest.mark.parametrize("cut", [2500, 2600, 1024 * 3])
def test_index_of_a_truncated_shard_keeps_the_intact_samples(tmp_path, cut):
    write_set(tmp_path, 3, shard_size=10)
    shard = list_shards(tmp_path)[0]
    shard.write_bytes(shard.read_bytes()[:cut])
    index = build_index([shard])
    assert 0 < len(index) < 3
    for i in range(len(index) - 1):
        assert set(index.read(i)) == {"png", "cls"}
    # The sample the cut runs through stays indexed, so that readers count it as bad.
    members, complete = _scan_ustar(str(shard))
    assert not complete and _scan_with_tarfile(str(shard))[1] is False
    if members[-1][1] + members[-1][2] > cut:
        with pytest.raises(OSError, match="short read"):
            index.read(len(index) - 1)


def test_index_of_a_gnu_tar_with_long_names(tmp_path):
    path = tmp_path / "long.tar"
    stem = "d" * 120
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(3):
            for ext, data in (("txt", f"text {i}".encode()), ("cls", b"1")):
                info = tarfile.TarInfo(f"{stem}/s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert _scan_ustar(str(path)) is None                   # long names: the tarfile fallback
    index = build_index([path])
    assert len(index) == 3 and index.read(2)["txt"] == b"text 2"
    assert index.keys[0] == f"{stem}/s0"
