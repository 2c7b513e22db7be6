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

import math
from pathlib import Path
from typing import Iterator

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


class EpochChunks(Dataset):
    """Chunk c of one epoch's order (from a start offset), decoded in a DataLoader worker.

    Each item is a list of (offset, global index, decoded sample or None, label, error or None)
    per sample of the chunk, in order; or the message of a `UserError` (a config the masks refuse).
    """

    def __init__(self, index: ShardIndex, batcher, order: np.ndarray, *, start: int, chunk: int,
                 epoch: int):
        self.index, self.batcher, self.order = index, batcher, order
        self.start, self.chunk, self.epoch = start, chunk, epoch

    def __len__(self) -> int:
        return math.ceil((len(self.order) - self.start) / self.chunk)

    def __getitem__(self, c: int) -> list[tuple] | str:
        lo = self.start + c * self.chunk
        ids = self.order[lo:lo + self.chunk].tolist()
        raws, errors = [], {}
        for k, i in enumerate(ids):
            try:
                raws.append(self.index.read(i))
            except OSError as err:  # a shard cut short under this sample
                raws.append({})
                errors[k] = err
        try:
            decoded = self.batcher.decode_many(raws, ids, epoch=self.epoch)
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


def _unbatched(item):
    """DataLoader collate for items that are already lists of samples: pass them through."""
    return item


class TorchBatchStream(BatchStream):
    """The `torch` reader's stream (see `stream.BatchStream`); `num_workers` DataLoader processes."""

    def __init__(self, *args, num_workers: int, **kwargs):
        self.num_workers = num_workers
        super().__init__(*args, **kwargs)

    def _steps(self, epoch: int, offset: int) -> Iterator[Step]:
        """Batches of the next `batch_size` decodable samples of the epoch's order, then the end."""
        order = self.order(epoch)
        chunks = EpochChunks(self.index, self.batcher, order, start=offset, chunk=self.batch_size,
                             epoch=epoch)
        # An explicit generator: otherwise creating the loader draws from the global torch RNG, and
        # a resumed run would see different dropout than an uninterrupted one.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        loader = DataLoader(chunks, batch_size=None, sampler=range(len(chunks)),
                            num_workers=self.num_workers, collate_fn=_unbatched, generator=generator,
                            prefetch_factor=2 if self.num_workers else None,
                            # SIGTERM and SIGINT are the trainer's: it finishes its step and saves
                            worker_init_fn=ignore_stop_signals)
        good, read, bad = [], 0, []
        for chunk in loader:
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
        yield Step(None, [], [], len(order), read, bad)


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
