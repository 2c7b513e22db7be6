"""The `torch` reader: WebDataset tar shards -> batches, deterministic and exactly resumable.

Map-style on purpose: the shards are indexed once (`tarindex`), each epoch visits a permutation seeded
by (seed, epoch), rank r takes the strided slice perm[r::world_size] (disjoint across ranks), and
batch b of an epoch is a fixed list of global sample indices. A DataLoader worker builds a whole
batch (read, decode, augment, collate, mask), and every random choice in it is a function of (seed,
epoch, sample index), so the batches do not depend on the worker count, and a stream started at
position {epoch, batch} yields exactly what an uninterrupted stream yields from there, without
decoding the samples it skips.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from d2v_engine.data.collate import build_batcher
from d2v_engine.data.shards import EXTENSIONS, list_shards, modality_of
from d2v_engine.data.tarindex import ShardIndex, build_index
from d2v_engine.data.transforms import STREAM_REPLACE, sample_rng
from d2v_engine.errors import UserError

log = logging.getLogger(__name__)

_REPLACE_TRIES = 8
"""Other samples tried in place of one that fails to decode, before the batch gives up."""

_PREPARE_HINT = {"image": "fashion-mnist", "audio": "spoken-words", "text": "text-corpus"}


def epoch_batches(num_samples: int, *, seed: int, epoch: int, rank: int, world_size: int,
                  batch_size: int) -> np.ndarray:
    """The global sample indices of every batch that `rank` reads in `epoch`.

    Args:
        num_samples: N samples in the data set.
        seed, epoch: the permutation is seeded by both.
        rank, world_size: rank r takes perm[r::world_size] of the first N - N % world_size entries,
            so every rank gets the same number of samples and no sample is read twice.
        batch_size: per-rank micro-batch; the last partial batch is dropped.
    Returns:
        int64 [num_batches, batch_size].
    """
    perm = np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(num_samples)
    usable = num_samples - num_samples % world_size
    mine = perm[rank:usable:world_size]
    num_batches = len(mine) // batch_size
    return mine[: num_batches * batch_size].reshape(num_batches, batch_size).astype(np.int64)


class EpochBatches(Dataset):
    """Batch b of one epoch for one rank, built in a DataLoader worker.

    Returns `(batch, report)` per item; the report says how many samples were read and which failed
    to decode (`bad`: (shard, key, error) tuples), so the main process counts and logs them.
    """

    def __init__(self, index: ShardIndex, batcher, plan: np.ndarray, *, seed: int, epoch: int):
        self.index, self.batcher, self.plan = index, batcher, plan
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, b: int):
        samples, indices, labels, bad = [], [], [], []
        for i in self.plan[b].tolist():
            got = self._sample(i, bad)
            if got is None:
                fatal = (f"sample {i} and {_REPLACE_TRIES} stand-ins for it all fail to decode; "
                         f"check the shards of data.path (see the warnings above).")
                return None, {"read": len(self.plan[b]), "bad": bad, "fatal": fatal}
            samples.append(got[0])
            indices.append(got[1])
            labels.append(got[2])
        try:
            batch = self.batcher.collate(samples, torch.tensor(indices, dtype=torch.int64),
                                         torch.tensor(labels, dtype=torch.int64), epoch=self.epoch)
        except UserError as err:
            # Raised in a worker, the DataLoader would re-raise it wrapped in a traceback text.
            return None, {"read": len(indices), "bad": bad, "fatal": str(err)}
        return batch, {"read": len(indices), "bad": bad}

    def _sample(self, i: int, bad: list) -> tuple | None:
        """Decode sample `i`, or the first decodable of a few seeded stand-ins for it.

        Returns:
            (decoded sample, global index actually used, label), or None when every try failed.
        """
        stand_ins = sample_rng(self.seed, self.epoch, i, STREAM_REPLACE).integers(
            0, len(self.index), _REPLACE_TRIES)
        for j in [i] + stand_ins.tolist():
            try:
                raw = self.index.read(j)
                sample = self.batcher.decode(raw, epoch=self.epoch, index=j)
            except Exception as err:  # any decoder's failure on one file: skip it, never crash
                shard = Path(self.index.shards[self.index.shard_of[j]]).name
                bad.append((shard, self.index.keys[j], f"{type(err).__name__}: {err}"))
                continue
            return sample, j, _label(raw)
        return None


def _label(raw: dict[str, bytes]) -> int:
    """The `.cls` label as an int, -1 when absent or unreadable (labels are for probes only)."""
    try:
        return int(raw["cls"].decode("utf-8").strip())
    except (KeyError, ValueError, UnicodeDecodeError):
        return -1


def _unbatched(item):
    """DataLoader collate for items that are already batches: pass them through."""
    return item


class BatchStream:
    """Infinite iterator over this rank's batches; epochs roll over inside.

    Attributes:
        batch_size: per-rank micro-batch.
        batches_per_epoch: batches this rank reads per epoch.
        num_samples: samples in the shards (all ranks).
        modality: "image", "audio" or "text".
        vocab_size, mask_id, tokenizer: text only (None otherwise): the tokenizer's vocabulary size,
            its `<mask>` id and the `tokenizers.Tokenizer`.
        samples_read, bad_samples: samples decoded and samples that failed, since this stream started.
    """

    def __init__(self, index: ShardIndex, batcher, *, seed: int, rank: int, world_size: int,
                 batch_size: int, num_workers: int, modality: str, position: dict | None = None):
        self.index, self.batcher = index, batcher
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_size, self.num_workers, self.modality = batch_size, num_workers, modality
        self.num_samples = len(index)
        self.batches_per_epoch = (self.num_samples // world_size) // batch_size
        encoder = getattr(batcher, "encoder", None)
        self.vocab_size = encoder.vocab_size if encoder else None
        self.mask_id = encoder.mask_id if encoder else None
        self.tokenizer = encoder.tokenizer if encoder else None
        self.samples_read = self.bad_samples = 0
        self._logged_shards: set[str] = set()
        position = position or {"epoch": 0, "batch": 0}
        self.epoch, self.batch = self._normalise(int(position["epoch"]), int(position["batch"]))
        self._iter = None

    def _normalise(self, epoch: int, batch: int) -> tuple[int, int]:
        epoch += batch // self.batches_per_epoch
        return epoch, batch % self.batches_per_epoch

    def state_dict(self) -> dict:
        """{"epoch", "batch"}: the position after the last batch yielded (pass it as `position`)."""
        return {"epoch": self.epoch, "batch": self.batch}

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = iter(self._epoch_loader(self.epoch, self.batch))
        batch, report = next(self._iter)
        self._account(report)
        self.epoch, self.batch = self._normalise(self.epoch, self.batch + 1)
        if self.batch == 0:
            self.close()
        return batch

    def _epoch_loader(self, epoch: int, start: int) -> DataLoader:
        """A DataLoader over batches start.. of `epoch` (workers live for the rest of the epoch)."""
        plan = epoch_batches(self.num_samples, seed=self.seed, epoch=epoch, rank=self.rank,
                             world_size=self.world_size, batch_size=self.batch_size)
        dataset = EpochBatches(self.index, self.batcher, plan, seed=self.seed, epoch=epoch)
        # An explicit generator: otherwise creating the loader draws from the global torch RNG, and
        # a resumed run would see different dropout than an uninterrupted one.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return DataLoader(dataset, batch_size=None, sampler=range(start, len(plan)),
                          num_workers=self.num_workers, collate_fn=_unbatched, generator=generator,
                          prefetch_factor=2 if self.num_workers else None)

    def _account(self, report: dict) -> None:
        """Count the samples read, log each shard's first bad sample, stop on a hopeless batch."""
        self.samples_read += report["read"]
        self.bad_samples += len(report["bad"])
        for shard, key, error in report["bad"]:
            if shard not in self._logged_shards:
                self._logged_shards.add(shard)
                log.warning("skipped undecodable sample %s in shard %s (%s); further bad samples "
                            "of this shard are counted, not logged", key, shard, error)
        if "fatal" in report:
            self.close()
            raise UserError(report["fatal"])

    def close(self) -> None:
        """Stop this epoch's workers (the next batch starts new ones)."""
        self._iter = None


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


def build_loader(cfg, spec, *, rank: int = 0, world_size: int = 1,
                 position: dict | None = None) -> BatchStream:
    """The `torch` reader's batch stream for this rank.

    Args:
        cfg: the run config (data.*, mask.*, train.batch_size, train.grad_accum, seed).
        spec: the model spec (modality, image/patch size, conv layers, max positions).
        rank, world_size: this process's data-parallel rank and the number of ranks.
        position: {"epoch", "batch"} to start at (a checkpoint's `state_dict()`); None = the start.
    Returns:
        A `BatchStream` of per-rank micro-batches of train.batch_size // (world_size * grad_accum).
    Raises:
        UserError: missing path, no shards, wrong modality, no tokenizer, batch larger than the data.
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
    tokenizer = find_tokenizer(cfg, shards) if spec.modality == "text" else None
    batcher = build_batcher(cfg, spec, tokenizer)
    return BatchStream(index, batcher, seed=cfg.seed, rank=rank, world_size=world_size,
                       batch_size=batch_size, num_workers=cfg.data.num_workers,
                       modality=spec.modality, position=position)
