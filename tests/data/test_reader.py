"""The `torch` reader: batch layout per modality, value ranges, determinism, exact resume, ranks."""
from __future__ import annotations

import itertools
import logging

import pytest
import torch
from synth_shards import make_cfg, write_image_shards

from d2v_engine.data import build_loader
from d2v_engine.data.webdataset import epoch_batches
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
    batches = take(stream, per_epoch + 3)                          # crosses an epoch boundary
    assert stream.state_dict() == {"epoch": 1, "batch": 3}
    cut = per_epoch - 2
    resumed = stream_for(shard_sets, modality, position={"epoch": 0, "batch": cut})[0]
    assert_same_batches(batches[cut:], take(resumed, len(batches) - cut))
    assert resumed.state_dict() == stream.state_dict()


def test_position_at_epoch_end_rolls_over(shard_sets):
    stream = stream_for(shard_sets, "image")[0]
    rolled = stream_for(shard_sets, "image", position={"epoch": 0, "batch": stream.batches_per_epoch})[0]
    assert rolled.state_dict() == {"epoch": 1, "batch": 0}
    fresh = stream_for(shard_sets, "image", position={"epoch": 1, "batch": 0})[0]
    assert_same_batches(take(rolled, 2), take(fresh, 2))


def test_workers_give_the_same_batches(shard_sets):
    serial = take(stream_for(shard_sets, "image")[0], 4)
    parallel = take(stream_for(shard_sets, "image", "data.num_workers=2")[0], 4)
    assert_same_batches(serial, parallel)


def test_ranks_read_disjoint_slices(shard_sets):
    seen = []
    for rank in range(2):
        stream = stream_for(shard_sets, "image", "train.batch_size=8", rank=rank, world_size=2)[0]
        assert stream.batch_size == 4
        seen.append(torch.cat([b["index"] for b in take(stream, stream.batches_per_epoch)]))
    assert len(set(seen[0].tolist()) & set(seen[1].tolist())) == 0
    assert len(set(seen[0].tolist())) == len(seen[0]) == 20


def test_epoch_permutation_covers_each_sample_once():
    plan = epoch_batches(103, seed=3, epoch=5, rank=1, world_size=3, batch_size=7)
    assert plan.shape == (34 // 7, 7)
    everything = [epoch_batches(103, seed=3, epoch=5, rank=r, world_size=3, batch_size=1).ravel()
                  for r in range(3)]
    flat = [i for part in everything for i in part.tolist()]
    assert len(flat) == len(set(flat)) == 102
    other = epoch_batches(103, seed=3, epoch=6, rank=1, world_size=3, batch_size=7)
    assert not (plan == other).all()


def test_corrupt_sample_is_skipped_and_counted(tmp_path, caplog):
    path = write_image_shards(tmp_path / "train", 24, corrupt={3, 17})
    cfg, spec = make_cfg("image_debug", path)
    stream = build_loader(cfg, spec)
    with caplog.at_level(logging.WARNING, logger="d2v_engine.data.webdataset"):
        batches = take(stream, stream.batches_per_epoch)
    indices = torch.cat([b["index"] for b in batches]).tolist()
    assert 3 not in indices and 17 not in indices
    assert all(b["images"].shape[0] == 4 for b in batches)
    assert stream.bad_samples >= 2 and stream.samples_read == 24
    logged = [r.getMessage() for r in caplog.records]
    # Key 00003 lies in shard 0 and 00017 in shard 1: one warning for each shard.
    assert any("00003" in m and "shard-000000.tar" in m for m in logged)
    assert any("shard-000001.tar" in m for m in logged)


@pytest.mark.parametrize("workers", [0, 2])
def test_reading_leaves_the_global_rng_alone(shard_sets, workers):
    # The trainer's dropout draws from the global RNG: a resumed run must find it where it left it.
    state = torch.get_rng_state()
    take(stream_for(shard_sets, "image", f"data.num_workers={workers}")[0], 3)
    assert torch.equal(state, torch.get_rng_state())
