"""The `dali` reader: NVIDIA DALI pipelines decode and augment, on the GPU when there is one.

Why DALI reads through `fn.external_source` fed by our tar index, and not `fn.readers.webdataset`:
the reader must give the `torch` reader's guarantees, and DALI's webdataset reader cannot.
- Bad input: one undecodable file makes a DALI pipeline raise for the whole batch, after which the
  pipeline is dead. The samples must therefore be checked (`checks`) before they enter a pipeline,
  and a failure that slips through must be traced to its sample and the batch rebuilt without it.
  Both need each sample's bytes, shard and key in Python before DALI sees them.
- Order, exactly once, ranks and resume: `fn.readers.webdataset` shuffles through a buffer and
  splits ranks by sample ranges, with its own epoch boundaries; resuming needs DALI checkpoints of
  its internal state. Here every rank visits the same seeded per-epoch order as the `torch` reader
  (`stream.RankPlan`), a position is a few integers, and the batches, global sample indices (hence
  the masks), crop boxes and flips are those of the `torch` reader; only the filters' arithmetic
  differs (pixels by a fraction of a grey level on average; resampled audio more).
Reading is a `pread` per member from the index, a few microseconds; the decoding and augmenting,
the work that costs, happens in DALI. The `.idx` files that `d2v shards` writes let people read
the same shards with `fn.readers.webdataset` in pipelines of their own.

Images and audio go through the pipelines of `dali_pipelines`; text has nothing for DALI to decode,
so `data.reader=dali` tokenizes text on the `torch` reader's path (one tokenizer path for both).
The reader prepares batch b+2 in Python while DALI works on b+1 in its threads (prefetch depth 2).
"""
from __future__ import annotations

import logging
import re
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from d2v_engine.data.checks import audio_header
from d2v_engine.data.collate import build_batcher, payload
from d2v_engine.data.stream import BatchStream, Step, build_plan, label_of
from d2v_engine.data.webdataset import build_loader as build_torch_loader
from d2v_engine.data.webdataset import open_shards
from d2v_engine.errors import UserError

log = logging.getLogger("d2v_engine.data")


@dataclass
class _Job:
    """One batch handed to DALI: where it lies in the epoch's order and what was consumed for it."""

    start: int                 # order position of the first sample consumed for it
    end: int                   # order position after its last sample
    index: list[int]
    labels: list[int]
    read: int                  # samples consumed, good and bad
    bad: list[tuple[str, str, str]]
    inputs: tuple              # the pipeline's inputs: per-sample lists of arrays


class _Feeder:
    """The pipeline's external source: each call builds the next batch from the epoch's order.

    Every sample is read and checked before DALI sees it; the bad ones are skipped and go into the
    batch's `bad` list. Calls run ahead of the batches consumed (prefetch): `in_flight` holds the
    batches handed out and not yet consumed, and `rewind` discards them.
    """

    def __init__(self, stream: "DaliBatchStream", order: np.ndarray, offset: int, epoch: int):
        self.stream, self.order, self.pos, self.epoch = stream, order, offset, epoch
        self.in_flight: deque[_Job] = deque()
        self.tail: tuple[int, list] = (0, [])  # what the order's last samples (no full batch) cost

    def __call__(self) -> tuple:
        job = self.next_job()
        if job is None:
            raise StopIteration
        self.in_flight.append(job)
        return job.inputs

    def next_job(self) -> _Job | None:
        """The next `batch_size` good samples as a `_Job`, or None when the order has too few left."""
        stream, start = self.stream, self.pos
        good, bad, read = [], [], 0
        while len(good) < stream.batch_size:
            if self.pos >= len(self.order):
                self.tail = (read, bad)
                return None
            i = int(self.order[self.pos])
            self.pos += 1
            read += 1
            try:
                raw = stream.index.read(i)
                good.append((i, raw, stream.check(raw, i)))
            except Exception as err:  # any failure of one sample: skip it, never the batch
                bad.append((*stream.where(i), f"{type(err).__name__}: {err}"))
        index = [g[0] for g in good]
        inputs = stream.inputs([g[1] for g in good], index, [g[2] for g in good], self.epoch)
        return _Job(start, self.pos, index, [label_of(g[1]) for g in good], read, bad, inputs)

    def rewind(self, pos: int) -> None:
        """Drop the batches in flight and build the next one from order position `pos` again."""
        self.pos = pos
        self.in_flight.clear()


class DaliBatchStream(BatchStream):
    """The `dali` reader's stream for images or audio (see `stream.BatchStream`).

    Args (beyond `BatchStream`'s):
        cfg: the run config (data.sample_rate; the image size and normalisation are the batcher's).
        num_threads: DALI CPU threads.
        device_id: CUDA device for decoding and augmenting, or None (CPU pipelines).
    """

    def __init__(self, *args, cfg, num_threads: int, device_id: int | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_threads, self.device_id = num_threads, device_id
        if self.modality == "image":
            t = self.batcher.transform
            self.graph_args = dict(size=t.size, mean=t.mean, std=t.std)
        else:
            self.graph_args = dict(sample_rate=cfg.data.sample_rate)
        self._failed: dict[int, str] = {}  # samples DALI could not decode (the checks passed them)

    # ------------------------------------------------------------------ per-sample preparation
    def check(self, raw: dict[str, bytes], i: int):
        """The header facts a batch needs (image size, clip length); raises when `i` is bad."""
        if i in self._failed:
            raise ValueError(self._failed[i])
        if self.modality == "image":
            return self.batcher.check(raw)[1:]
        length = audio_header(payload(raw, self.batcher.extensions)).length_at(self.batcher.sample_rate)
        self.batcher.check_length(min(length, self.batcher.max_samples) if self.batcher.pad else length)
        return length

    def inputs(self, raws: list[dict], index: list[int], facts: list, epoch: int) -> tuple:
        """The pipeline inputs of a batch: encoded files plus crop boxes (images) or windows (audio).

        Args:
            raws: B raw samples; index: their global indices; facts: what `check` returned for each.
        Returns:
            Per-sample lists: encoded uint8 [bytes]; images: box anchor and shape float32 [2] and
            flip int32 []; audio: window start and length float32 [1].
        """
        encoded = [np.frombuffer(payload(r, self.batcher.extensions), dtype=np.uint8) for r in raws]
        if self.modality == "image":
            boxes, flips = self.batcher.transform.plan(np.array(facts), np.array(index), seed=self.seed,
                                                       epoch=epoch)
            anchors = boxes[:, [1, 0]]                          # (top, left)
            shapes = boxes[:, [3, 2]] - anchors                 # (height, width)
            # One array per sample: DALI refuses rows that are strided views of a larger array.
            return (encoded, [np.array(a, np.float32) for a in anchors],
                    [np.array(s, np.float32) for s in shapes], [np.array(f, np.int32) for f in flips])
        starts, sizes = self.batcher.crop_plan(facts, index, epoch=epoch)
        return (encoded, [np.array([s], np.float32) for s in starts],
                [np.array([n], np.float32) for n in sizes])

    # ------------------------------------------------------------------ the epoch
    def _pipeline(self, source, *, streaming: bool = True):
        from d2v_engine.data.dali_pipelines import build_pipeline

        return build_pipeline(self.modality, source=source, batch_size=self.batch_size,
                              num_threads=self.num_threads, device_id=self.device_id,
                              seed=self.seed, streaming=streaming, **self.graph_args)

    def _steps(self, epoch: int, offset: int) -> Iterator[Step]:
        """Batches from the DALI pipeline; a failed batch is traced to its samples and rebuilt."""
        order = self.order(epoch)
        feeder = _Feeder(self, order, offset, epoch)
        pipe = self._pipeline(feeder)
        while True:
            try:
                outputs = pipe.run()
            except StopIteration:
                break
            except Exception as err:  # DALI raises RuntimeError/IndexError/... and the pipe is dead
                self._trace_failure(list(feeder.in_flight), err)
                feeder.rewind(feeder.in_flight[0].start)
                pipe = self._pipeline(feeder)
                continue
            job = feeder.in_flight.popleft()
            yield Step(outputs, job.index, job.labels, job.end, job.read, job.bad)
        read, bad = feeder.tail
        yield Step(None, [], [], len(order), read, bad)

    def _trace_failure(self, jobs: list[_Job], error: Exception) -> None:
        """Run the samples of the batches in flight one at a time, oldest batch first, until a batch
        holds samples that fail alone; remember those as bad (their checks had passed them).

        Raises:
            The pipeline's error, when every sample decodes alone or none does (then no sample is
            to blame).
        """
        probe = self._pipeline(None, streaming=False)
        for job in jobs:
            failed = {}
            for k, i in enumerate(job.index):
                inputs = {f"input{c}": [column[k]] for c, column in enumerate(job.inputs)}
                try:
                    probe.run(**inputs)
                except Exception as err:
                    failed[i] = f"DALI cannot decode it ({_dali_reason(err)})"
                    probe = self._pipeline(None, streaming=False)
            if len(failed) == len(job.index) > 1:
                raise error  # every sample fails alone: the pipeline is at fault, not the data
            if failed:
                self._failed.update(failed)
                return
        raise error

    def _finish(self, step: Step) -> dict[str, torch.Tensor]:
        from d2v_engine.data.dali_pipelines import to_torch

        outputs, epoch = step.samples, self.epoch
        index = torch.tensor(step.index, dtype=torch.int64)
        labels = torch.tensor(step.labels, dtype=torch.int64)
        if self.modality == "image":
            return self.batcher.finish(to_torch(outputs[0]), index, labels, epoch=epoch)
        audio = to_torch(outputs[0])
        lengths = to_torch(outputs[1]).reshape(-1).cpu()
        return self.batcher.finish(audio, lengths, index, labels, epoch=epoch)


def _dali_reason(err: Exception) -> str:
    """The operator and message of a DALI error, without the pipeline traceback around them."""
    text = str(err)
    op = re.search(r"operator `([^`]+)`", text)
    tail = text.split("encountered:", 1)[-1]
    lines = [line.strip(" :") for line in tail.splitlines()
             if line.strip() and "pipeline object is no longer valid" not in line]
    reason = re.sub(r" #\d+", "", lines[-1]) if lines else type(err).__name__  # the probe's sample 0
    return f"{op.group(1).removeprefix('nvidia.dali.fn.')}: {reason}" if op else reason


def _device_id() -> int | None:
    """The CUDA device of this process (DeepSpeed set it from the local rank), or None on a CPU."""
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def build_loader(cfg, spec, *, rank: int = 0, world_size: int = 1,
                 position: dict | None = None) -> BatchStream:
    """The `dali` reader's batch stream for this rank (arguments as `webdataset.build_loader`).

    Images and audio decode in DALI pipelines, on this process's GPU when there is one
    (`device_id`), else on the CPU with data.num_workers threads; text reads through the `torch`
    reader. Raises UserError for the same mistakes as the `torch` reader, and when DALI is missing.
    """
    if spec.modality == "text":
        if rank == 0:
            log.info("data.reader=dali: text has nothing for DALI to decode; it is tokenized on the "
                     "torch reader's path")
        return build_torch_loader(cfg, spec, rank=rank, world_size=world_size, position=position)
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise UserError("data.reader=dali needs NVIDIA DALI; install it with `pip install "
                        "nvidia-dali-cuda120` (it runs on CPUs too) or use data.reader=torch.") from None
    _, index, batch_size = open_shards(cfg, spec, world_size)
    plan = build_plan(index, rank, world_size, batch_size, cfg.data.rank_split)
    return DaliBatchStream(index, build_batcher(cfg, spec), plan,
                           seed=cfg.seed, batch_size=batch_size, modality=spec.modality,
                           position=position, cfg=cfg,
                           num_threads=max(1, cfg.data.num_workers), device_id=_device_id())
