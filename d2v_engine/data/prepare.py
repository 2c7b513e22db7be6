"""`d2v prepare`: build the offline data sets of DATASETS.md as WebDataset shards.

Every data set is written into a hidden temporary folder beside its destination and renamed into
place only when all of its splits are complete, so a killed run never leaves a half set that looks
finished, and a second run with the same options finds the complete set and does nothing. A set that
lacks a split added since it was built is built again (the seeded splits come out the same).

- fashion-mnist: `OUT/fashion-mnist/{train,test}/` (60k + 10k grey 28x28 PNGs with `.cls` labels),
  from the IDX files of the `dataset-fashion-mnist` package.
- spoken-words: `OUT/spoken-words/{train,probe_train,probe_test,ctc_train,ctc_test}/`
  (`prepare_speech`).
- text-corpus: `OUT/text-corpus/{train,probe_train,probe_test}/` + `tokenizer.json` (`prepare_text`).
"""
from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from d2v_engine.data.shards import ShardSetWriter, is_complete, read_manifest
from d2v_engine.errors import UserError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot"]


@dataclass
class PrepareOptions:
    """Options shared by every data set.

    Attributes:
        limit: most samples per split (None = the full set); small values make test-sized sets.
        seed: seed of every random choice (splits, voices, shuffles).
        shard_size: most samples per shard.
        workers: processes for the slow steps (speech synthesis); 0 = one per CPU.
    """

    limit: int | None = None
    seed: int = 0
    shard_size: int = 5000
    workers: int = 0

    def cap(self, n: int) -> int:
        """`n`, or the limit when it is smaller."""
        return n if self.limit is None else min(n, self.limit)

    def num_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))


def say(message: str) -> None:
    """Progress for people, on stderr (stdout stays free for scripts)."""
    print(f"d2v prepare: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- fashion-mnist

def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or not; the MNIST format) -> uint8 array of the shape its header gives."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise UserError(f"'{path}' is not an IDX file of unsigned bytes.")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def prepare_fashion_mnist(out: Path, opts: PrepareOptions) -> dict[str, int]:
    """Write `out/train/` and `out/test/` (PNG + `.cls`), keeping the official split.

    Args:
        out: the data set's (temporary) folder.
        opts: `limit` keeps the first N images of each split.
    Returns:
        Samples per split.
    """
    if not FASHION_DIR.is_dir():
        raise UserError(f"{FASHION_DIR} does not exist; install it with `apt-get install -y "
                        f"--no-install-recommends dataset-fashion-mnist`.")
    counts = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        images = read_idx(FASHION_DIR / f"{stem}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION_DIR / f"{stem}-labels-idx1-ubyte.gz")
        n = opts.cap(len(images))
        extra = {"source": "fashion-mnist", "split": split, "classes": FASHION_CLASSES,
                 "limit": opts.limit}
        with ShardSetWriter(out / split, modality="image", shard_size=opts.shard_size,
                            extra=extra) as writer:
            for i in range(n):
                writer.write(f"{i:06d}", png=_png(images[i]), cls=int(labels[i]))
        counts[split] = n
    return counts


# ---------------------------------------------------------------- driver

def _builders() -> dict[str, tuple[Callable, tuple[str, ...], tuple[str, ...]]]:
    """name -> (builder, split folders, other files the finished set must hold)."""
    from d2v_engine.data.prepare_speech import SIZES, prepare_spoken_words
    from d2v_engine.data.prepare_text import prepare_text_corpus

    probes = ("train", "probe_train", "probe_test")
    return {
        "fashion-mnist": (prepare_fashion_mnist, ("train", "test"), ()),
        "spoken-words": (prepare_spoken_words, tuple(SIZES), ()),
        "text-corpus": (prepare_text_corpus, probes, ("tokenizer.json",)),
    }


DATASETS = ("fashion-mnist", "spoken-words", "text-corpus")


def is_prepared(folder: Path, splits: tuple[str, ...], files: tuple[str, ...],
                opts: PrepareOptions) -> bool:
    """True when every split of `folder` is complete and was built with the same limit and seed."""
    if not all((folder / f).is_file() for f in files):
        return False
    for split in splits:
        manifest = read_manifest(folder / split)
        if not is_complete(folder / split) or manifest.get("limit") != opts.limit \
                or manifest.get("seed", opts.seed) != opts.seed:
            return False
    return True


def prepare(name: str, out: str | Path, opts: PrepareOptions | None = None) -> Path:
    """Build data set `name` under `out/name/` unless a complete copy is already there.

    Args:
        name: one of `DATASETS`.
        out: parent folder (created).
        opts: limit, seed, shard size, workers.
    Returns:
        The data set's folder.
    """
    opts = opts or PrepareOptions()
    builders = _builders()
    if name not in builders:
        raise UserError(f"unknown data set '{name}'; choose one of {', '.join(DATASETS)}.")
    build, splits, files = builders[name]
    final = Path(out) / name
    if is_prepared(final, splits, files, opts):
        say(f"{final} is complete; nothing to do")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    tmp = final.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    try:
        counts = build(tmp, opts)
    except BaseException:
        # Interrupted or failed: the half-built copy goes (a killed run's is swept up next time).
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_into_place(tmp, final)
    sizes = ", ".join(f"{n} {split}" for split, n in counts.items())
    say(f"{name}: wrote {sizes} samples to {final} in {time.perf_counter() - start:.1f} s")
    return final


def _remove_stale_temps(final: Path) -> None:
    """Delete the temporary folders of killed runs (their process no longer exists)."""
    for tmp in final.parent.glob(f".{final.name}.*-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an older (incomplete or different) copy is moved aside first."""
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
