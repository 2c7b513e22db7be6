"""`d2v shards`: WebDataset shards of a folder of the user's own data, for either reader.

- image: every file under `src` that PIL opens. JPEG, PNG and WebP are stored as they are, under the
  extension of their content; other formats (BMP, TIFF, GIF, ...) are converted to PNG (lossless).
- audio: WAV, FLAC and Ogg are stored as they are; other formats that soundfile reads (MP3, AIFF,
  ...) are converted to 16-bit FLAC.
- text: `.txt` files give one sample per non-empty line (or per file, `text_per_file`); JSON lines
  files (`.jsonl`) one sample per line, from the field `text_field`; `tokenizer_vocab` also trains
  a byte-level BPE `tokenizer.json` on them.

Labels: a file in a sub-folder of `src` gets the class of that first-level folder (classes numbered
in sorted order, listed in the manifest), as image-folder data sets are laid out; JSON lines take
theirs from `label_field` when present. Files that cannot be read are skipped and listed in the
manifest with the reason. Samples are shuffled (seeded) before they are written, keys are their
8-digit positions, and the set is written into a temporary folder that becomes `out` only when it is
complete (`shards.ShardSetWriter` adds the manifest and DALI's `.idx` files).
"""
from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import soundfile
from PIL import Image

from d2v_engine.data.checks import AUDIO_MAGIC, IMAGE_FORMATS, audio_header, image_header
from d2v_engine.data.shards import ShardSetWriter
from d2v_engine.errors import UserError

_SKIPPED_LISTED = 50  # skipped files named in the manifest (the count covers all of them)


@dataclass
class ShardOptions:
    """Options of `d2v shards`.

    Attributes:
        shard_size: most samples per shard.
        max_bytes: most payload bytes per shard.
        seed: seed of the shuffle.
        shuffle: shuffle the samples (otherwise the sorted file order is kept).
        text_per_file: text: one sample per `.txt` file instead of per line.
        text_field, label_field: JSON lines: the fields holding the text and the label.
        tokenizer_vocab: text: also train a byte-level BPE of this size into `tokenizer.json` beside
            the shards (0 = bring your own, as `data.tokenizer`).
    """

    shard_size: int = 5000
    max_bytes: float = 1e9
    seed: int = 0
    shuffle: bool = True
    text_per_file: bool = False
    text_field: str = "text"
    label_field: str = "label"
    tokenizer_vocab: int = 0


def _label_of(path: Path, src: Path) -> str | None:
    """The first-level sub-folder of `src` holding `path`, or None for a file directly in `src`."""
    parts = path.relative_to(src).parts
    return parts[0] if len(parts) > 1 else None


def image_sample(path: Path) -> dict[str, bytes]:
    """One image file as shard members: stored as is when both readers decode it, else as PNG."""
    data = path.read_bytes()
    try:
        kind = image_header(data)[0]
        return {"jpg" if kind == "jpeg" else kind: data}
    except ValueError:
        pass
    with Image.open(io.BytesIO(data)) as img:  # raises on anything PIL cannot read
        if img.format in IMAGE_FORMATS:
            raise ValueError(f"damaged {img.format} file")
        img.seek(0)  # the first frame of an animation
        rgb = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return {"png": buf.getvalue()}


def audio_sample(path: Path) -> dict[str, bytes]:
    """One audio file as shard members: WAV/FLAC/Ogg as is (extension by content), else FLAC."""
    data = path.read_bytes()
    try:
        return {audio_header(data).format: data}
    except ValueError:
        if any(data[o:o + len(m)] == m for m, o, _ in AUDIO_MAGIC):
            raise  # a damaged file of a format we store as is
    wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    if wave.size == 0:
        raise ValueError("empty audio clip")
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format="FLAC", subtype="PCM_16")
    return {"flac": buf.getvalue()}


def text_samples(path: Path, opts: ShardOptions, skipped: list[str]) -> Iterator[tuple[str, Any]]:
    """(text, label or None) of a `.txt` or `.jsonl` file; bad lines go to `skipped`."""
    data = path.read_bytes()
    if path.suffix.lower() == ".txt" and opts.text_per_file:
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            skipped.append(f"{path}: invalid UTF-8 ({err.reason})")
            return
        if text:
            yield text, None
        return
    for number, line in enumerate(data.splitlines(), 1):
        try:
            line = line.decode("utf-8").strip()
            if not line:
                continue
            if path.suffix.lower() != ".jsonl":
                yield line, None
                continue
            record = json.loads(line)
            text = record[opts.text_field]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"field '{opts.text_field}' holds no text")
            yield text.strip(), record.get(opts.label_field)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
            skipped.append(f"{path}:{number}: {type(err).__name__}: {err}")


_TEXT_SUFFIXES = (".txt", ".jsonl")


def _jobs(modality: str, src: Path, opts: ShardOptions, skipped: list[str]) -> list[tuple[Any, Any]]:
    """(file path or text, label) of every sample under `src`, in sorted file order."""
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    if modality != "text":
        return [(p, _label_of(p, src)) for p in files]
    jobs = []
    for path in files:
        if path.suffix.lower() not in _TEXT_SUFFIXES:
            continue
        folder = _label_of(path, src)
        jobs += [(text, folder if label is None else label)
                 for text, label in text_samples(path, opts, skipped)]
    return jobs


def write_shards(modality: str, src: str | Path, out: str | Path,
                 opts: ShardOptions | None = None) -> dict[str, Any]:
    """Write the samples under `src` as a shard set in `out` (see the module docstring).

    Args:
        modality: "image", "audio" or "text".
        src: the folder of the user's files.
        out: the shard folder to create (it must not exist or be empty).
        opts: shard size, shuffle seed, text options.
    Returns:
        The manifest written.
    Raises:
        UserError: `src` missing, `out` not empty, or no usable sample found.
    """
    opts = opts or ShardOptions()
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UserError(f"--src '{src}' is not a folder; point it at the folder of your {modality} files.")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out '{out}' already holds files; choose a new folder or remove it.")
    # A temporary folder beside `out` becomes `out` only once complete: no half set looks finished.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifest = _write_set(modality, src, tmp, opts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return manifest


def _write_set(modality: str, src: Path, folder: Path, opts: ShardOptions) -> dict[str, Any]:
    """Find, shuffle, read and write every sample into `folder`; returns the manifest."""
    skipped: list[str] = []
    jobs = _jobs(modality, src, opts, skipped)
    order = np.random.default_rng(opts.seed).permutation(len(jobs)) if opts.shuffle else range(len(jobs))
    classes, class_id = _classes([label for _, label in jobs if label is not None])
    extra = {"source": str(src.resolve()), "seed": opts.seed, "shuffled": opts.shuffle,
             "classes": classes or None}
    with ShardSetWriter(folder, modality=modality, shard_size=opts.shard_size, max_bytes=opts.max_bytes,
                        extra=extra) as writer:
        _write_all(writer, modality, [jobs[k] for k in order], class_id, skipped)
        if writer.total == 0:
            raise UserError(f"--src '{src}' holds no readable {modality} sample"
                            f"{f' ({skipped[0]})' if skipped else ''}.")
        writer.extra["skipped"] = {"count": len(skipped), "files": skipped[:_SKIPPED_LISTED]}
    if modality == "text" and opts.tokenizer_vocab:
        from d2v_engine.data.prepare_text import train_tokenizer

        # Beside the shards, where the readers look for it (`webdataset.find_tokenizer`).
        train_tokenizer([text for text, _ in jobs], folder / "tokenizer.json", opts.tokenizer_vocab)
    return json.loads((folder / "manifest.json").read_text())


def _classes(labels: list) -> tuple[list[str], dict[Any, int]]:
    """Class names and label -> id: integer labels (JSON lines) keep their values, names are
    numbered in sorted order."""
    if labels and all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        return [], {v: v for v in set(labels)}
    names = sorted({str(v) for v in labels})
    ids = {name: k for k, name in enumerate(names)}
    return names, {v: ids[str(v)] for v in set(map(_hashable, labels))}


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) else str(value)


def _write_all(writer: ShardSetWriter, modality: str, jobs: list[tuple[Any, Any]],
               class_id: dict[str, int], skipped: list[str]) -> None:
    """Read, convert and write each job; unreadable files go to `skipped` with the reason."""
    load = {"image": image_sample, "audio": audio_sample}.get(modality)
    for what, label in jobs:
        if load is None:
            fields: dict[str, Any] = {"txt": what}
        else:
            try:
                fields = load(what)
            except Exception as err:  # any unreadable file is skipped, never the whole set
                skipped.append(f"{what}: {type(err).__name__}: {err}")
                continue
        if label is not None:
            fields["cls"] = class_id[_hashable(label)]
        writer.write(f"{writer.total:08d}", **fields)
