"""The `torch` reader: batch layout per modality, value ranges, determinism, exact resume, ranks.

Bad input (both readers) is tested in test_bad_input.py, the `dali` reader in test_dali.py.
"""
from __future__ import annotations

import itertools
import multiprocessing

import numpy as np
import pytest
import torch
from synth_shards import make_cfg

from d2v_engine.data import build_loader
from d2v_engine.data.stream import RankPlan, deal_shards
from d2v_engine.models.audio import conv_output_length

KEYS = {
    "image": {"images", "mask", "index", "labels"},
    "audio": {"audio", "padding_mask", "mask", "index", "labels"},
    "text": {"tokens", "clean", "padding_mask", "mask", "index", "labels"},
}
MODALITIES = ("image", "audio", "text")


def take(stream, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(stream, n))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def stream_for(shard_sets, modality, *overrides, **kw):
    model, path = shard_sets[modality]
    cfg, spec = make_cfg(model, path, *overrides)
    return build_loader(cfg, spec, **kw), cfg, spec


def test_image_batch_layout_and_ranges(shard_sets):
    stream, cfg, spec = stream_for(shard_sets, "image", "data.mean=[0.5,0.5,0.5]",
                                   "data.std=[0.25,0.25,0.25]")
    batch = next(stream)
    assert set(batch) == KEYS["image"]
    assert batch["images"].dtype == torch.float32 and batch["images"].shape == (4, 3, 28, 28)
    grid = 28 // spec.patch_size
    assert batch["mask"].dtype == torch.bool and batch["mask"].shape == (4, grid * grid)
    assert batch["index"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
    # Pixels in [0, 1] normalised by (0.5, 0.25) land in [-2, 2], and random pixels fill it.
    assert batch["images"].min() >= -2 - 1e-5 and batch["images"].max() <= 2 + 1e-5
    assert batch["images"].std() > 0.5
    assert (batch["mask"].sum(1) >= round(cfg.mask.prob * grid * grid)).all()
    assert torch.equal(batch["labels"], batch["index"] % 10)


@pytest.mark.parametrize("batching", ["crop", "pad"])
def test_audio_batch_layout_and_ranges(shard_sets, batching):
    stream, cfg, spec = stream_for(shard_sets, "audio", f"data.audio_batching={batching}", "mask.prob=0.65")
    batch = next(stream)
    assert set(batch) == KEYS["audio"]
    audio, pad = batch["audio"], batch["padding_mask"]
    assert audio.dtype == torch.float32 and audio.dim() == 2 and audio.shape[0] == 4
    assert pad.dtype == torch.bool and pad.shape == audio.shape
    frames = conv_output_length(spec.conv_layers, audio.shape[1])
    assert batch["mask"].dtype == torch.bool and batch["mask"].shape == (4, frames)
    if batching == "crop":
        assert not pad.any()
    else:
        assert pad.any() and not pad[:, 0].any()
        assert (audio[pad] == 0).all()
        valid_frames = conv_output_length(spec.conv_layers, (~pad).sum(1))
        beyond = torch.arange(frames)[None, :] >= valid_frames[:, None]
        assert not (batch["mask"] & beyond).any()
    for row in range(4):
        valid = audio[row][~pad[row]]
        assert abs(valid.mean().item()) < 1e-4 and abs(valid.std(unbiased=False).item() - 1) < 1e-3
    counts = batch["mask"].sum(1)
    assert (counts == counts[0]).all() and counts[0] > 0
    assert torch.equal(batch["labels"], batch["index"] % 10)


def test_text_batch_layout_and_ranges(shard_sets):
    stream, cfg, spec = stream_for(shard_sets, "text", "mask.prob=0.3")
    batch = next(stream)
    assert set(batch) == KEYS["text"]
    tokens, clean, pad, mask = (batch[k] for k in ("tokens", "clean", "padding_mask", "mask"))
    for t in (tokens, clean):
        assert t.dtype == torch.int64 and t.shape == pad.shape == mask.shape
        assert t.min() >= 0 and t.max() < stream.vocab_size
    assert stream.mask_id == 4 and stream.vocab_size <= 300
    lengths = (~pad).sum(1)
    assert (clean[:, 0] == 0).all()                                      # <s>
    assert (clean[torch.arange(4), lengths - 1] == 2).all()              # </s>
    assert (clean[pad] == 1).all() and (tokens[pad] == 1).all()          # <pad>
    assert not (mask & pad).any() and not mask[:, 0].any()
    assert torch.equal(tokens[~mask], clean[~mask])
    assert mask.sum() > 0 and (tokens[mask] == stream.mask_id).any()
    assert torch.equal(batch["labels"], batch["index"] % 3)


V2 = ("method.version=2", "method.clones=3")


@pytest.mark.parametrize("modality, extra", [("image", ("mask.prob=0.8", "mask.length=2", "mask.inverse=true")),
                                             ("audio", ("mask.prob=0.5", "mask.length=5")),
                                             ("text", ("mask.prob=0.48", "mask.length=1"))])
def test_v2_batches_carry_one_exact_mask_per_copy(shard_sets, modality, extra):
    """2.0: masks [B, M, T], exact counts, never on padding or special tokens; text keeps clean ids.
    The same batches with data-loader workers (which draw image and text masks) as without."""
    stream, cfg, spec = stream_for(shard_sets, modality, *V2, *extra)
    batch = next(stream)
    assert set(batch) == KEYS[modality]
    mask = batch["mask"]
    assert mask.dtype == torch.bool and mask.dim() == 3 and mask.shape[:2] == (4, 3)
    counts = mask.sum(-1)
    if modality == "image":
        assert (counts == mask.shape[-1] - int(mask.shape[-1] * 0.2)).all()   # 1 - 0.8 of 49: 9 kept
    else:
        assert (counts == counts[:, :1]).all() and (counts > 0).all()
    if modality == "text":
        pad = batch["padding_mask"]
        assert torch.equal(batch["tokens"], batch["clean"])
        assert not (mask & pad[:, None]).any() and not mask[..., 0].any()
        ordinary = (~pad).sum(1) - 2
        assert torch.equal(counts[:, 0], ordinary - (ordinary * 0.52).floor().long())
    if modality != "audio":
        workers = take(stream_for(shard_sets, modality, *V2, *extra, "data.num_workers=2")[0], 1)
        assert_same_batches([batch], workers)


@pytest.mark.parametrize("modality", MODALITIES)
def test_same_seed_same_batches_other_seed_other_batches(shard_sets, modality):
    first = take(stream_for(shard_sets, modality)[0], 3)
    assert_same_batches(first, take(stream_for(shard_sets, modality)[0], 3))
    other = take(stream_for(shard_sets, modality, "seed=1")[0], 1)
    assert not torch.equal(first[0]["index"], other[0]["index"])


@pytest.mark.parametrize("modality", MODALITIES)
def test_resume_from_position_matches_uninterrupted_stream(shard_sets, modality):
    stream = stream_for(shard_sets, modality)[0]
    per_epoch = stream.batches_per_epoch
    states = []
    for _ in range(per_epoch + 3):                                 # crosses an epoch boundary
        next(stream)
        states.append(stream.state_dict())
    # The last samples of epoch 0 that fill no batch are read too (and wait for the next order).
    assert states[-1] == {"epoch": 1, "batch": 3, "offset": 12, "samples_read": stream.plan.per_epoch + 12,
                          "bad_samples": 0}
    batches = take(stream_for(shard_sets, modality)[0], per_epoch + 3)
    cut = per_epoch - 2
    resumed = stream_for(shard_sets, modality, position=states[cut - 1])[0]
    assert_same_batches(batches[cut:], take(resumed, len(batches) - cut))
    assert resumed.state_dict() == stream.state_dict()


def test_position_at_epoch_end_rolls_over(shard_sets):
    stream = stream_for(shard_sets, "image")[0]
    # A position without an offset (older checkpoints) counts whole batches.
    rolled = stream_for(shard_sets, "image", position={"epoch": 0, "batch": stream.batches_per_epoch})[0]
    assert rolled.state_dict()["epoch"] == 1 and rolled.state_dict()["offset"] == 0
    fresh = stream_for(shard_sets, "image", position={"epoch": 1, "batch": 0})[0]
    assert_same_batches(take(rolled, 2), take(fresh, 2))


def test_workers_give_the_same_batches(shard_sets):
    serial = take(stream_for(shard_sets, "image")[0], 4)
    parallel = take(stream_for(shard_sets, "image", "data.num_workers=2")[0], 4)
    assert_same_batches(serial, parallel)


def test_workers_live_across_epochs_and_restart_after_close(shard_sets):
    """One set of workers reads epoch after epoch (a worker forked later, from a grown training
    process, holds more private memory); the batches are those of the serial reader."""
    others = {p.pid for p in multiprocessing.active_children()}      # earlier tests' streams

    def workers() -> set[int]:
        return {p.pid for p in multiprocessing.active_children()} - others

    stream = stream_for(shard_sets, "image", "data.num_workers=2")[0]
    n = 2 * stream.batches_per_epoch + 2                            # crosses two epoch boundaries
    seen = []
    for _ in range(n):
        next(stream)
        seen.append(workers())
    assert len(seen[0]) == 2 and all(w == seen[0] for w in seen)
    assert stream.state_dict()["epoch"] == 2
    stream.close()                                                  # its workers stop
    assert not workers()
    serial = take(stream_for(shard_sets, "image")[0], n + 1)
    again = stream_for(shard_sets, "image", "data.num_workers=2")[0]
    assert_same_batches(serial[:n], take(again, n))
    first = workers()
    again.close()                                                   # the next batch starts new workers
    assert_same_batches(serial[n:], take(again, 1))
    assert len(first) == 2 and len(workers()) == 2 and not first & workers()


def test_ranks_read_disjoint_shards(shard_sets):
    seen, shards = [], []
    for rank in range(2):
        stream = stream_for(shard_sets, "image", "train.batch_size=8", rank=rank, world_size=2)[0]
        assert stream.batch_size == 4 and stream.plan.shards is not None
        shards.append(set(stream.plan.shards))
        seen.append(torch.cat([b["index"] for b in take(stream, stream.batches_per_epoch)]))
    assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == 2
    assert len(set(seen[0].tolist()) & set(seen[1].tolist())) == 0
    assert len(set(seen[0].tolist())) == len(seen[0]) == 20
    for rank in range(2):        # shard s holds samples 10s .. 10s + 9
        assert {i // 10 for i in seen[rank].tolist()} == shards[rank]


def test_shards_are_dealt_evenly_or_not_at_all():
    assert deal_shards([10, 10, 10, 10], 2) == [[0, 2], [1, 3]]
    assert deal_shards([50, 10, 10, 10, 10, 10], 2) == [[0], [1, 2, 3, 4, 5]]
    assert deal_shards([10, 10, 10], 2) is None          # 20 against 10 samples
    assert deal_shards([10], 2) is None                  # fewer shards than ranks


@pytest.mark.parametrize("dealt", [True, False])
def test_epoch_orders_cover_each_sample_once(dealt):
    world = 3
    if dealt:
        held = [[0, 3], [1, 4], [2, 5]]                   # 6 shards of 17 samples
        plans = [RankPlan(np.concatenate([np.arange(17 * s, 17 * s + 17) for s in held[r]]), 34,
                          held[r], r, world) for r in range(world)]
    else:
        plans = [RankPlan(np.arange(103), 34, None, r, world) for r in range(world)]
    orders = [p.order(seed=3, epoch=5) for p in plans]
    flat = np.concatenate(orders).tolist()
    assert all(len(o) == 34 for o in orders) and len(flat) == len(set(flat)) == 102
    assert not (plans[1].order(seed=3, epoch=6) == orders[1]).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_reading_leaves_the_global_rng_alone(shard_sets, workers):
    # The trainer's dropout draws from the global RNG: a resumed run must find it where it left it.
    state = torch.get_rng_state()
    take(stream_for(shard_sets, "image", f"data.num_workers={workers}")[0], 3)
    assert torch.equal(state, torch.get_rng_state())
