"""The `torch` reader: WebDataset tar shards -> batches in DataLoader workers (PIL, soundfile).

Map-style on purpose: the shards are indexed once (`tarindex`), and each epoch visits this rank's
order (`stream.RankPlan`). DataLoader workers decode consecutive chunks of that order (read,
check, decode, augment, and the image and text masks, which depend on the sample alone); the main
process takes the next `batch_size` samples that decoded and collates them (stack or pad; audio
masks). Every random choice is a function of (seed, epoch, sample index), so the batches do not
depend on the worker count, and a stream started at a position yields exactly what an
uninterrupted stream yields from there, without decoding what it skips.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from d2v_engine.data.collate import build_batcher
from d2v_engine.data.shards import EXTENSIONS, list_shards, modality_of
from d2v_engine.data.stream import BatchStream, Step, build_plan, label_of
from d2v_engine.data.tarindex import ShardIndex, build_index
from d2v_engine.errors import UserError
from d2v_engine.preemption import ignore_stop_signals

_PREPARE_HINT = {"image": "fashion-mnist", "audio": "spoken-words", "text": "text-corpus"}


class RunChunks(Dataset):
    """Chunks of a run's epoch orders, decoded in a DataLoader worker; item `(epoch, start, c)` holds
    the samples `start + c * chunk` onwards of the epoch's order.

    Each item is a list of (offset, global index, decoded sample or None, label, error or None)
    per sample of the chunk, in order; or the message of a `UserError` (a config the masks refuse).
    One dataset serves every epoch, so that the workers are forked once per run: a worker forked
    later, from a training process that has grown, holds more private memory (copy-on-write pages
    the child touches), which the soak measured as a one-time step at the second epoch.
    """

    def __init__(self, index: ShardIndex, batcher, order_of: Callable[[int], np.ndarray], *, chunk: int):
        self.index, self.batcher, self.order_of, self.chunk = index, batcher, order_of, chunk
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's order, computed once per epoch in each worker."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.order_of(epoch))
        return self._order[1]

    def __getitem__(self, key: tuple[int, int, int]) -> list[tuple] | str:
        epoch, start, c = key
        lo = start + c * self.chunk
        ids = self.order(epoch)[lo:lo + self.chunk].tolist()
        raws, errors = [], {}
        for k, i in enumerate(ids):
            try:
                raws.append(self.index.read(i))
            except OSError as err:  # a shard cut short under this sample
                raws.append({})
                errors[k] = err
        try:
            decoded = self.batcher.decode_many(raws, ids, epoch=epoch)
        except UserError as err:
            # Raised in a worker, the DataLoader would re-raise it wrapped in a traceback text.
            return str(err)
        out = []
        for k, (i, raw, sample) in enumerate(zip(ids, raws, decoded)):
            error = errors.get(k, sample if isinstance(sample, Exception) else None)
            if error is not None:
                out.append((lo + k, i, None, -1, f"{type(error).__name__}: {error}"))
            else:
                out.append((lo + k, i, sample, label_of(raw), None))
        return out


@dataclass
class ChunkKeys:
    """The `RunChunks` keys from `offset` of `epoch` on, through every later epoch (the sampler)."""
    per_epoch: int
    chunk: int
    epoch: int
    offset: int

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch, offset = self.epoch, self.offset
        while True:
            yield from ((epoch, offset, c) for c in range(chunks_left(self.per_epoch, offset, self.chunk)))
            epoch, offset = epoch + 1, 0


def chunks_left(per_epoch: int, offset: int, chunk: int) -> int:
    """Chunks of `chunk` samples from `offset` to the end of an epoch of `per_epoch` samples."""
    return math.ceil((per_epoch - offset) / chunk)


def _unbatched(item):
    """DataLoader collate for items that are already lists of samples: pass them through."""
    return item


class TorchBatchStream(BatchStream):
    """The `torch` reader's stream (see `stream.BatchStream`); `num_workers` DataLoader processes."""

    def __init__(self, *args, num_workers: int, **kwargs):
        self.num_workers = num_workers
        self._chunks: Iterator[list[tuple] | str] | None = None
        self._next: tuple[int, int] | None = None  # (epoch, offset) the loader's next chunk starts at
        super().__init__(*args, **kwargs)

    def _loader(self, epoch: int, offset: int) -> Iterator[list[tuple] | str]:
        """Decoded chunks from `offset` of `epoch` on, epoch after epoch, from fresh workers."""
        chunks = RunChunks(self.index, self.batcher, functools.partial(self.plan.order, self.seed),
                           chunk=self.batch_size)
        # An explicit generator: otherwise creating the loader draws from the global torch RNG, and
        # a resumed run would see different dropout than an uninterrupted one.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        loader = DataLoader(chunks, batch_size=None,
                            sampler=ChunkKeys(self.plan.per_epoch, self.batch_size, epoch, offset),
                            num_workers=self.num_workers, collate_fn=_unbatched, generator=generator,
                            prefetch_factor=2 if self.num_workers else None,
                            # SIGTERM and SIGINT are the trainer's: it finishes its step and saves
                            worker_init_fn=ignore_stop_signals)
        return iter(loader)

    def _steps(self, epoch: int, offset: int) -> Iterator[Step]:
        """The run's steps: one loader (one set of workers) carries on from epoch to epoch, and is
        replaced only when the stream is asked for another place (after `close`, or a stop mid-epoch)."""
        if self._chunks is None or self._next != (epoch, offset):
            self._chunks = None  # its workers stop as the iterator is dropped
            self._chunks = self._loader(epoch, offset)
        self._next = None  # mid-epoch until the epoch's last chunk is taken
        read, bad = yield from self._epoch_steps(self._chunks, chunks_left(self.plan.per_epoch, offset,
                                                                           self.batch_size))
        self._next = (epoch + 1, 0)
        yield Step(None, [], [], self.plan.per_epoch, read, bad)

    def decoded(self, epoch: int) -> Iterator[Step]:
        """As `BatchStream.decoded`, from a loader of its own (the run's keeps its place)."""
        read, bad = yield from self._epoch_steps(self._loader(epoch, 0),
                                                 chunks_left(self.plan.per_epoch, 0, self.batch_size))
        yield Step(None, [], [], self.plan.per_epoch, read, bad)

    def _epoch_steps(self, chunks: Iterator[list[tuple] | str], n: int):
        """Batches of the next `batch_size` decodable samples of `n` chunks; returns what is left
        over (samples read and bad samples that no batch took)."""
        good, read, bad = [], 0, []
        for _ in range(n):
            chunk = next(chunks)
            if isinstance(chunk, str):  # a user error (a config the masks refuse) met in a worker
                raise UserError(chunk)
            for k, i, sample, label, error in chunk:
                read += 1
                if error is not None:
                    bad.append((*self.where(i), error))
                    continue
                good.append((i, sample, label))
                if len(good) == self.batch_size:
                    index, samples, labels = zip(*good)
                    yield Step(list(samples), list(index), list(labels), k + 1, read, bad)
                    good, read, bad = [], 0, []
        return read, bad

    def close(self) -> None:
        """Stop decoding: the workers exit; the next batch starts a fresh loader."""
        super().close()
        self._chunks, self._next = None, None


def find_tokenizer(cfg, shards: list[Path]) -> str:
    """data.tokenizer, else `tokenizer.json` beside the shards or one folder up.

    Raises:
        UserError: no tokenizer file found.
    """
    if cfg.data.tokenizer:
        if not Path(cfg.data.tokenizer).is_file():
            raise UserError(f"data.tokenizer '{cfg.data.tokenizer}' does not exist; point it at a "
                            f"`tokenizers` JSON file.")
        return cfg.data.tokenizer
    folder = shards[0].parent
    for candidate in (folder / "tokenizer.json", folder.parent / "tokenizer.json"):
        if candidate.is_file():
            return str(candidate)
    raise UserError(f"text model '{cfg.model.name}' needs a tokenizer, but there is no tokenizer.json "
                    f"beside data.path '{cfg.data.path}' or one folder up; set data.tokenizer or run "
                    f"`d2v prepare text-corpus`.")


def _check_shards(cfg, spec, index: ShardIndex) -> None:
    """UserError when the shards hold nothing or another modality than the model's."""
    path = cfg.data.path
    if len(index) == 0:
        raise UserError(f"the shards of data.path '{path}' hold no readable samples; "
                        f"rebuild them (see `d2v prepare`).")
    found = index.extensions(0)
    modality = modality_of(found)
    if modality != spec.modality:
        what = f"{modality} samples" if modality else "samples with no known payload"
        raise UserError(
            f"data.path '{path}' holds {what} (.{', .'.join(sorted(found))}) but model "
            f"'{cfg.model.name}' reads {spec.modality} (.{', .'.join(EXTENSIONS[spec.modality])}); "
            f"point data.path at {spec.modality} shards, e.g. from "
            f"`d2v prepare {_PREPARE_HINT[spec.modality]}`.")


def open_shards(cfg, spec, world_size: int) -> tuple[list[Path], ShardIndex, int]:
    """Find and index the shards of data.path and size this rank's micro-batch (both readers).

    Returns:
        (shard paths, their index, per-rank micro-batch).
    Raises:
        UserError: missing path, no shards, wrong modality, batch larger than the data.
    """
    path = cfg.data.path
    if "{" not in path and not Path(path).exists():
        raise UserError(f"data.path '{path}' does not exist; run `d2v prepare "
                        f"{_PREPARE_HINT[spec.modality]}` or point data.path at a folder of .tar shards.")
    shards = list_shards(path)
    if not shards:
        raise UserError(f"data.path '{path}' holds no .tar shards; run `d2v prepare "
                        f"{_PREPARE_HINT[spec.modality]}` or point data.path at a folder of .tar shards.")
    index = build_index(shards)
    _check_shards(cfg, spec, index)
    batch_size = cfg.train.batch_size // (world_size * cfg.train.grad_accum)
    per_rank = len(index) // world_size
    if batch_size < 1 or per_rank < batch_size:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} over {world_size} rank(s) x "
            f"{cfg.train.grad_accum} accumulation step(s) needs micro-batches of at least one sample "
            f"and at most the {per_rank} samples per rank that data.path '{path}' holds; "
            f"change train.batch_size or use more data.")
    return shards, index, batch_size


def build_loader(cfg, spec, *, rank: int = 0, world_size: int = 1,
                 position: dict | None = None) -> TorchBatchStream:
    """The `torch` reader's batch stream for this rank.

    Args:
        cfg: the run config (data.*, mask.*, train.batch_size, train.grad_accum, seed).
        spec: the model spec (modality, image/patch size, conv layers, max positions).
        rank, world_size: this process's data-parallel rank and the number of ranks.
        position: a stream's `state_dict()` to start at (from a checkpoint); None = the start.
    Returns:
        A stream of per-rank micro-batches of train.batch_size // (world_size * grad_accum).
    Raises:
        UserError: missing path, no shards, wrong modality, no tokenizer, batch larger than the data.
    """
    shards, index, batch_size = open_shards(cfg, spec, world_size)
    tokenizer = find_tokenizer(cfg, shards) if spec.modality == "text" else None
    batcher = build_batcher(cfg, spec, tokenizer)
    plan = build_plan(index, rank, world_size, batch_size, cfg.data.rank_split)
    return TorchBatchStream(index, batcher, plan, seed=cfg.seed,
                            batch_size=batch_size, num_workers=cfg.data.num_workers,
                            modality=spec.modality, position=position)
