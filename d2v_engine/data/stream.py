"""What both readers share: each rank's shards, the epoch order, the position, bad-sample accounting.

Ranks (`data.rank_split`): by default the shards are dealt to the ranks (largest first, each to the
rank holding the fewest samples), so each rank reads a disjoint set of shards (and a node's page
cache holds only its ranks' shards), and every rank draws the same number of samples per epoch (the
smallest rank's count). When there are fewer shards than ranks, or they cannot be dealt within 10%
of each other, or with `data.rank_split=samples`, the ranks share the shards and read disjoint
samples: strided slices of one permutation, so that a global batch is the same samples whatever the
number of ranks.

Order: each epoch visits a permutation of the rank's samples seeded by (seed, epoch, rank). A batch
is the next `batch_size` samples of that order that decode; a sample that does not is skipped,
counted and logged (shard and key), never replaced, so every good sample arrives exactly once per
epoch (the last few that do not fill a batch wait for the next epoch's order).

Position: {"epoch", "batch", "offset", "samples_read", "bad_samples"}, where offset is how far into
the epoch's order the last batch reached. A stream started at a position yields exactly what the
uninterrupted stream yields from there, and its counters continue.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from d2v_engine.data.tarindex import ShardIndex
from d2v_engine.errors import UserError

log = logging.getLogger("d2v_engine.data")

_BALANCE = 0.9     # shard dealing is used when the smallest rank holds >= 90% of the largest's samples
_LOG_LIMIT = 1000  # distinct bad samples logged one by one; the rest are counted


@dataclass
class RankPlan:
    """Which samples one rank draws from.

    Attributes:
        samples: int64 [M] global indices of the rank's samples (shard mode) or of all samples.
        per_epoch: samples the rank visits per epoch (equal on every rank).
        shards: the rank's shard numbers, or None when ranks share the shards.
        rank, world_size: this rank and the number of ranks.
    """

    samples: np.ndarray
    per_epoch: int
    shards: list[int] | None
    rank: int
    world_size: int

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """int64 [per_epoch] global sample indices, in the order this rank visits them in `epoch`."""
        if self.shards is None:
            perm = np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(len(self.samples))
            usable = len(perm) - len(perm) % self.world_size
            return self.samples[perm[self.rank:usable:self.world_size]]
        rng = np.random.default_rng([int(seed), int(epoch), self.rank, 0x5EED])
        return self.samples[rng.permutation(len(self.samples))[: self.per_epoch]]


def deal_shards(counts: list[int], world_size: int) -> list[list[int]] | None:
    """Deal shards to ranks, largest first, each to the rank with the fewest samples so far.

    Args:
        counts: samples per shard.
        world_size: number of ranks.
    Returns:
        Per rank its sorted shard numbers, or None when some rank would get no shard or less than 90%
        of the largest rank's samples.
    """
    if len(counts) < world_size:
        return None
    held = [[] for _ in range(world_size)]
    load = [0] * world_size
    for shard in sorted(range(len(counts)), key=lambda s: (-counts[s], s)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        held[rank].append(shard)
        load[rank] += counts[shard]
    if min(load) < _BALANCE * max(load) or min(load) == 0:
        return None
    return [sorted(shards) for shards in held]


def build_plan(index: ShardIndex, rank: int, world_size: int, batch_size: int = 1,
               split: str = "shards") -> RankPlan:
    """This rank's `RankPlan` over the indexed shards (see the module docstring).

    Args:
        index: the shards' index.
        rank, world_size: this rank and the number of ranks.
        batch_size: per-rank micro-batch; shards are dealt only when each rank gets a batch's worth.
        split: "shards" (data.rank_split): deal shards when they deal evenly; "samples": never.
    """
    counts = np.bincount(index.shard_of, minlength=len(index.shards))
    dealt = deal_shards(counts.tolist(), world_size) if split == "shards" else None
    if dealt is not None and min(int(counts[shards].sum()) for shards in dealt) < batch_size:
        dealt = None
    if dealt is None:
        if world_size > 1 and rank == 0 and split == "shards":
            log.info("%d shards cannot be dealt evenly to %d ranks: the ranks share the shards and "
                     "read disjoint samples", len(index.shards), world_size)
        return RankPlan(np.arange(len(index), dtype=np.int64), len(index) // world_size, None,
                        rank, world_size)
    mine = np.flatnonzero(np.isin(index.shard_of, dealt[rank])).astype(np.int64)
    per_epoch = min(int(counts[shards].sum()) for shards in dealt)
    return RankPlan(mine, per_epoch, dealt[rank], rank, world_size)


@dataclass
class Step:
    """What a reader hands its stream: the next batch's decoded samples, or the end of an epoch.

    Attributes:
        samples: the decoded batch (reader-specific), or None when the epoch's order is used up.
        index, labels: B global sample indices and labels (-1 = none).
        offset: position in the epoch's order just after the batch's last sample.
        read: samples consumed since the previous step, good and bad.
        bad: (shard, key, error) of the bad samples among them.
    """

    samples: Any
    index: list[int]
    labels: list[int]
    offset: int
    read: int
    bad: list[tuple[str, str, str]] = field(default_factory=list)


class BatchStream:
    """Infinite iterator over this rank's batches; epochs roll over inside. Readers subclass it.

    A subclass implements `_steps(epoch, offset)` (a generator of `Step`s over the epoch's order
    from `offset`) and may override `_finish(step)` (decoded batch -> batch dict).

    Attributes:
        batch_size: per-rank micro-batch.
        batches_per_epoch: batches per epoch when no sample is bad (an upper bound otherwise).
        num_samples: samples in the shards (all ranks).
        modality: "image", "audio" or "text".
        vocab_size, mask_id, tokenizer: text only (None otherwise): the tokenizer's vocabulary size,
            its `<mask>` id and the `tokenizers.Tokenizer`.
        samples_read, bad_samples: samples consumed and samples that failed, over the whole run.
        bad_by_shard: shard file name -> bad samples counted in it.
    """

    def __init__(self, index: ShardIndex, batcher, plan: RankPlan, *, seed: int, batch_size: int,
                 modality: str, position: dict | None = None):
        self.index, self.batcher, self.plan = index, batcher, plan
        self.seed, self.batch_size, self.modality = seed, batch_size, modality
        self.rank, self.world_size = plan.rank, plan.world_size
        self.num_samples = len(index)
        self.batches_per_epoch = plan.per_epoch // batch_size
        encoder = getattr(batcher, "encoder", None)
        self.vocab_size = encoder.vocab_size if encoder else None
        self.mask_id = encoder.mask_id if encoder else None
        self.tokenizer = encoder.tokenizer if encoder else None
        self.bad_by_shard: Counter[str] = Counter()
        self._logged: set[tuple[str, str]] = set()
        self._restore(position or {})
        self._iter: Iterator[Step] | None = None
        self._from_start = self.offset == 0
        self._epoch_bad = 0

    def _restore(self, position: dict) -> None:
        epoch, batch = int(position.get("epoch", 0)), int(position.get("batch", 0))
        if "offset" not in position:  # a position from before offsets: exact when nothing was bad
            epoch += batch // max(1, self.batches_per_epoch)
            batch %= max(1, self.batches_per_epoch)
        self.epoch, self.batch = epoch, batch
        self.offset = int(position.get("offset", batch * self.batch_size))
        self.samples_read = int(position.get("samples_read", 0))
        self.bad_samples = int(position.get("bad_samples", 0))
        if self.offset + self.batch_size > self.plan.per_epoch:
            # Too few samples left for a batch: the epoch is over whatever they hold.
            self.epoch, self.batch, self.offset = self.epoch + 1, 0, 0

    def state_dict(self) -> dict:
        """The position after the last batch yielded (pass it as `position` to resume there)."""
        return {"epoch": self.epoch, "batch": self.batch, "offset": self.offset,
                "samples_read": self.samples_read, "bad_samples": self.bad_samples}

    def order(self, epoch: int) -> np.ndarray:
        """int64 [per_epoch] global sample indices in this rank's order of `epoch`."""
        return self.plan.order(self.seed, epoch)

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while True:
            if self._iter is None:
                self._from_start = self.offset == 0
                self._iter = self._steps(self.epoch, self.offset)
            step = next(self._iter)
            self._account(step)
            if step.samples is not None:
                self.batch, self.offset = self.batch + 1, step.offset
                return self._finish(step)
            self._end_epoch()

    def _end_epoch(self) -> None:
        """Roll over to the next epoch; a whole epoch without one batch is hopeless."""
        no_batch = self._from_start and self.batch == 0
        self._drop_iter()
        if no_batch:
            raise UserError(f"fewer than {self.batch_size} of the {self.plan.per_epoch} samples that "
                            f"rank {self.rank} reads per epoch from {Path(self.index.shards[0]).parent} "
                            f"could be decoded, too few for one batch; fix or remove the bad files "
                            f"(see the warnings above).")
        if self._epoch_bad:
            shards = ", ".join(f"{name}: {n}" for name, n in sorted(self.bad_by_shard.items()))
            log.warning("epoch %d: %d bad samples skipped on rank %d (bad samples per shard so far: %s)",
                        self.epoch, self._epoch_bad, self.rank, shards)
        self.epoch, self.batch, self.offset, self._epoch_bad = self.epoch + 1, 0, 0, 0

    def _account(self, step: Step) -> None:
        """Count the samples consumed; count each bad one per shard and log it once per run."""
        self.samples_read += step.read
        self.bad_samples += len(step.bad)
        self._epoch_bad += len(step.bad)
        for shard, key, error in step.bad:
            self.bad_by_shard[shard] += 1
            if (shard, key) in self._logged or len(self._logged) > _LOG_LIMIT:
                continue
            self._logged.add((shard, key))
            if len(self._logged) > _LOG_LIMIT:
                log.warning("more than %d distinct bad samples: further ones are counted, not logged",
                            _LOG_LIMIT)
            else:
                log.warning("skipped undecodable sample %s in shard %s (%s)", key, shard, error)

    def _finish(self, step: Step) -> dict[str, torch.Tensor]:
        """Decoded samples -> the batch dict (stack, pad, masks)."""
        return self.batcher.collate(step.samples, torch.tensor(step.index, dtype=torch.int64),
                                    torch.tensor(step.labels, dtype=torch.int64), epoch=self.epoch)

    def decoded(self, epoch: int) -> Iterator[Step]:
        """Epoch `epoch`'s decoded, augmented batches before collation (no masks): for benchmarks.

        Leaves the stream's position alone; close the iterator when done with it.
        """
        return self._steps(epoch, 0)

    def _steps(self, epoch: int, offset: int) -> Iterator[Step]:
        raise NotImplementedError

    def where(self, i: int) -> tuple[str, str]:
        """(shard file name, key) of global sample `i`, for logs."""
        return Path(self.index.shards[self.index.shard_of[i]]).name, self.index.keys[i]

    def _drop_iter(self) -> None:
        """End the epoch's generator (readers may keep their workers for the next epoch)."""
        if self._iter is not None:
            self._iter.close()
        self._iter = None

    def close(self) -> None:
        """Stop decoding (workers, pipelines); the next batch starts afresh."""
        self._drop_iter()


def label_of(raw: dict[str, bytes]) -> int:
    """The `.cls` label as an int, -1 when absent or unreadable (labels are for probes only)."""
    try:
        return int(raw["cls"].decode("utf-8").strip())
    except (KeyError, ValueError, UnicodeDecodeError):
        return -1
