"""WebDataset tar shards: writing them, their `manifest.json`, and finding them again.

A shard set is a folder of `shard-000000.tar`, `shard-000001.tar`, ... whose members are `KEY.EXT` files
(`KEY.png` + `KEY.cls`, `KEY.flac` + `KEY.cls`, `KEY.txt` + `KEY.cls`, or `KEY.flac` + `KEY.txt` for a
clip with its transcript), a `shard-NNNNNN.idx` beside each shard (the index DALI's
`fn.readers.webdataset` takes, in the format of DALI's `wds2idx`), plus a `manifest.json` that records
the sample count of every shard, the total, the modality and the extensions. The manifest is written
last, so a folder whose manifest says `complete` was finished. Readers never need the manifest or the
`.idx` files (users bring their own shards); the manifest serves `d2v prepare`'s idempotence and tells
people what a folder holds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import braceexpand
import webdataset

from d2v_engine.data.tarindex import write_dali_index

MANIFEST = "manifest.json"

EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image": ("png", "jpg", "jpeg", "webp"),
    "audio": ("flac", "wav", "ogg"),
    "text": ("txt",),
}
"""The payload extensions of each modality, in order of precedence (labels ride along as `.cls`;
a `.txt` beside an image or a clip is its caption or transcript, not a text sample)."""

# Fixed tar mtime, so that the same inputs give byte-identical shards.
_MTIME = 1_700_000_000


def modality_of(extensions) -> str | None:
    """The first modality of EXTENSIONS whose payload extension appears among `extensions`, or None.

    Image and audio come before text: `{"flac", "txt"}` is a transcribed clip, so "audio".

    Args:
        extensions: iterable of extensions without the dot, e.g. `{"png", "cls"}`.
    Returns:
        "image", "audio", "text" or None.
    """
    exts = {e.lower() for e in extensions}
    for modality, payload in EXTENSIONS.items():
        if exts & set(payload):
            return modality
    return None


class ShardSetWriter:
    """Writes samples into numbered tar shards and a manifest, on `webdataset.ShardWriter`.

    Use as a context manager; `close()` (or leaving the block without an error) writes the manifest.

    Args:
        folder: output folder (created).
        modality: "image", "audio" or "text", recorded in the manifest.
        shard_size: most samples per shard.
        max_bytes: most payload bytes per shard (a shard is closed once it passes this).
        extra: more manifest fields (source, classes, voice split, ...).
    """

    def __init__(self, folder: str | Path, *, modality: str, shard_size: int = 5000,
                 max_bytes: float = 1e9, extra: dict[str, Any] | None = None):
        if modality not in EXTENSIONS:
            raise ValueError(f"unknown modality {modality!r}")
        if shard_size <= 0:
            raise ValueError("shard_size must be positive")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.modality = modality
        self.extra = dict(extra or {})
        self.counts: dict[str, int] = {}
        self.extensions: set[str] = set()
        self._writer = webdataset.ShardWriter(
            str(self.folder / "shard-%06d.tar"), maxcount=shard_size, maxsize=max_bytes,
            verbose=0, encoder=False, mtime=_MTIME)

    def write(self, key: str, **fields: bytes | str | int) -> None:
        """Add one sample.

        Args:
            key: sample key, unique in the set, without dots or slashes (webdataset splits there).
            fields: extension -> payload; bytes as is, str as UTF-8, int (a class label) as text.
        """
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and free of '.' and '/'")
        sample: dict[str, Any] = {"__key__": key}
        for ext, value in fields.items():
            if isinstance(value, int):
                value = str(value)
            sample[ext] = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            self.extensions.add(ext)
        self._writer.write(sample)
        name = os.path.basename(self._writer.fname)
        self.counts[name] = self.counts.get(name, 0) + 1

    @property
    def total(self) -> int:
        """Samples written so far."""
        return sum(self.counts.values())

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write the manifest.

        Returns:
            The manifest that was written.
        """
        self._writer.close()
        # ShardWriter opens its first shard eagerly: an empty set leaves an empty tar behind.
        for path in self.folder.glob("shard-*.tar"):
            if path.name not in self.counts:
                path.unlink()
            else:
                write_dali_index(path)
        manifest = {
            "format": "d2v-shards/1",
            "modality": self.modality,
            "extensions": sorted(self.extensions),
            "shards": [{"name": n, "count": c} for n, c in sorted(self.counts.items())],
            "total": self.total,
            **self.extra,
            "complete": True,
        }
        write_manifest(self.folder, manifest)
        return manifest

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # Leave no manifest: the folder must not look complete.
            self._writer.close()


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> None:
    """Write `manifest.json` into `folder` atomically (temp file + rename)."""
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The folder's manifest as a dict, or None when there is none or it is unreadable."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_complete(folder: str | Path) -> bool:
    """True when `folder` has a complete manifest and every shard it names is present."""
    manifest = read_manifest(folder)
    if not manifest or not manifest.get("complete"):
        return False
    shards = manifest.get("shards", [])
    return all((Path(folder) / s["name"]).is_file() for s in shards) and \
        sum(s["count"] for s in shards) == manifest.get("total")


def list_shards(path: str | Path) -> list[Path]:
    """The tar shards of `path`: a folder (its `*.tar`, sorted) or a brace pattern.

    Args:
        path: `dir/` or `dir/shard-{000000..000009}.tar`.
    Returns:
        Existing shard paths in order; empty when there are none.
    """
    text = str(path)
    if "{" in text:
        return [Path(p) for p in braceexpand.braceexpand(text) if Path(p).is_file()]
    folder = Path(text)
    if folder.is_file() and folder.suffix == ".tar":
        return [folder]
    return sorted(p for p in folder.glob("*.tar") if p.is_file())
