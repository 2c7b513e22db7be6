"""The `dali` reader against the `torch` reader: same batch layout, same samples, masks, crops and
flips, nearly the same pixels; exact resume, disjoint ranks, and the `.idx` files DALI's own
webdataset reader takes. Bad input in both readers is tested in test_bad_input.py.
"""
from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from asserts import assert_close
from PIL import Image
from synth_shards import make_cfg, pretrain_in_process, write_audio_shards, write_samples

from d2v_engine.data import build_loader
from d2v_engine.data.dali import DaliBatchStream
from d2v_engine.data.shards import list_shards

pytest.importorskip("nvidia.dali")


def smooth_image(rng: np.random.Generator, width: int, height: int, fmt: str) -> bytes:
    """A photo-like image: a few random low-frequency waves per channel (interpolation-friendly)."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [sum(np.sin(2 * np.pi * (rng.uniform(0.5, 2.5) * x + rng.uniform(0.5, 2.5) * y)
                           + rng.uniform(0, 6)) for _ in range(3)) for _ in range(3)]
    pixels = (127.5 + 40 * np.stack(channels, axis=-1)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    """32 photo-like images of assorted sizes and formats, 4 shards."""
    rng = np.random.default_rng(21)
    samples = []
    for i in range(32):
        fmt, ext = (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"))[i % 3]
        size = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
        samples.append({ext: smooth_image(rng, *size, fmt), "cls": i % 10})
    return write_samples(tmp_path_factory.mktemp("photos") / "train", "image", samples, shard_size=8)


def both(model, path, *overrides, **kw):
    """(torch stream, dali stream) over the same shards and config."""
    streams = []
    for reader in ("torch", "dali"):
        cfg, spec = make_cfg(model, path, f"data.reader={reader}", *overrides)
        streams.append(build_loader(cfg, spec, **kw))
    assert isinstance(streams[1], DaliBatchStream)
    return streams


def assert_same_layout(x: dict, y: dict, exact=("mask", "index", "labels", "padding_mask")) -> None:
    """Same keys, shapes and dtypes; the integer and boolean parts identical."""
    assert x.keys() == y.keys()
    for key in x:
        assert x[key].shape == y[key].shape and x[key].dtype == y[key].dtype, key
        if key in exact:
            assert torch.equal(x[key], y[key]), key


def test_image_batches_agree_with_the_torch_reader(photo_shards):
    torch_stream, dali_stream = both("image_debug", photo_shards, "data.mean=[0.5,0.5,0.5]",
                                     "data.std=[0.25,0.25,0.25]")
    for x, y in zip(itertools.islice(torch_stream, 8), itertools.islice(dali_stream, 8)):
        assert_same_layout(x, y)
        images = y["images"]
        assert images.min() >= -2 - 1e-5 and images.max() <= 2 + 1e-5 and images.std() > 0.2
        # Same crop boxes and flips; the bicubic filters (and JPEG decoding of a box only, which
        # upsamples chroma at its edges differently) differ by less than a grey level on average.
        diff = (x["images"] - images).abs() * 0.25 * 255
        assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())
    assert torch_stream.state_dict() == dali_stream.state_dict()


@pytest.mark.parametrize("model, modality", [("image_debug_v2", "image"), ("audio_debug_v2", "audio")])
def test_v2_masks_agree_with_the_torch_reader(photo_shards, shard_sets, model, modality):
    """data2vec 2.0 batches: the same [B, M, T] masks (M copies, exact counts) from both readers."""
    path = photo_shards if modality == "image" else shard_sets["audio"][1]
    torch_stream, dali_stream = both(model, path, "method.version=2", "method.clones=3",
                                     f"mask.length={2 if modality == 'image' else 5}",
                                     *(["mask.inverse=true", "mask.prob=0.8"] if modality == "image" else
                                       ["mask.prob=0.5"]))
    for x, y in zip(itertools.islice(torch_stream, 3), itertools.islice(dali_stream, 3)):
        assert_same_layout(x, y)
        assert x["mask"].dim() == 3 and x["mask"].shape[1] == 3
        counts = x["mask"].sum(-1)
        assert (counts == counts[0, 0]).all() if modality == "image" else (counts == counts[:, :1]).all()


def test_image_pipeline_flips_and_crops_like_pil(photo_shards):
    """Full-image crops without normalisation: DALI's pixels match PIL's, flipped or not."""
    for flip in ("true", "false"):
        torch_stream, dali_stream = both("image_debug", photo_shards, "data.crop_scale=1.0",
                                         f"data.hflip={flip}", "data.mean=[0,0,0]", "data.std=[1,1,1]")
        x, y = next(torch_stream), next(dali_stream)
        assert_close(y["images"], x["images"], rtol=0, atol=2.01 / 255)


@pytest.mark.parametrize("batching", ["crop", "pad"])
def test_audio_batches_agree_with_the_torch_reader(shard_sets, batching):
    torch_stream, dali_stream = both("audio_debug", shard_sets["audio"][1], f"data.audio_batching={batching}")
    for x, y in zip(itertools.islice(torch_stream, 9), itertools.islice(dali_stream, 9)):
        assert_same_layout(x, y)
        audio, pad = y["audio"], y["padding_mask"]
        assert (audio[pad] == 0).all() and (batching == "pad" or not pad.any())
        for row in range(len(audio)):
            valid = audio[row][~pad[row]]
            assert abs(valid.mean().item()) < 1e-4 and abs(valid.std(unbiased=False).item() - 1) < 1e-3
            # 16 kHz clips decode to the same samples; every fifth clip is resampled from 22.05 kHz,
            # where DALI's windowed-sinc and our antialiased linear resampler differ.
            if int(y["index"][row]) % 5 != 4:
                assert_close(audio[row], x["audio"][row], rtol=0, atol=1e-4)


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_resume_from_position_matches_uninterrupted_stream(shard_sets, modality):
    model, path = shard_sets[modality]
    cfg, spec = make_cfg(model, path, "data.reader=dali")
    stream = build_loader(cfg, spec)
    states, batches = [], []
    for batch in itertools.islice(stream, stream.batches_per_epoch + 2):
        batches.append(batch)
        states.append(stream.state_dict())
    cut = stream.batches_per_epoch - 2
    resumed = build_loader(cfg, spec, position=states[cut - 1])
    key = "images" if modality == "image" else "audio"
    for expected, got in zip(batches[cut:], itertools.islice(resumed, len(batches) - cut)):
        assert torch.equal(expected["index"], got["index"]) and torch.equal(expected["mask"], got["mask"])
        assert torch.equal(expected[key], got[key])
    assert resumed.state_dict() == stream.state_dict()


def test_ranks_read_disjoint_shards(shard_sets):
    seen = []
    for rank in range(2):
        cfg, spec = make_cfg("image_debug", shard_sets["image"][1], "data.reader=dali", "train.batch_size=8")
        stream = build_loader(cfg, spec, rank=rank, world_size=2)
        seen.append({i // 10 for b in itertools.islice(stream, stream.batches_per_epoch)
                     for i in b["index"].tolist()})
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 2


def test_text_reads_through_the_torch_path(shard_sets):
    cfg, spec = make_cfg("text_debug", shard_sets["text"][1], "data.reader=dali")
    stream = build_loader(cfg, spec)
    reference = build_loader(*make_cfg("text_debug", shard_sets["text"][1]))
    assert stream.vocab_size == reference.vocab_size
    for x, y in zip(itertools.islice(stream, 3), itertools.islice(reference, 3)):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_dali_webdataset_reader_takes_the_idx_files(shard_sets):
    from nvidia.dali import fn, pipeline_def

    shards = [str(p) for p in list_shards(shard_sets["image"][1])]
    index_paths = [p[: -len(".tar")] + ".idx" for p in shards]

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def read():
        images, labels = fn.readers.webdataset(paths=shards, index_paths=index_paths, ext=["png", "cls"],
                                               missing_component_behavior="error")
        return fn.decoders.image(images), labels

    pipe = read()
    pipe.build()
    labels = []
    for _ in range(5):
        images, cls = pipe.run()
        assert images.as_array().shape == (8, 32, 32, 3)
        labels += [int(bytes(np.array(cls[k])).decode()) for k in range(8)]
    assert labels == [i % 10 for i in range(40)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pipelines_match_the_cpu_pipelines(photo_shards, shard_sets):
    for model, path in (("image_debug", photo_shards), ("audio_debug", shard_sets["audio"][1])):
        cfg, spec = make_cfg(model, path, "data.reader=dali")
        gpu = build_loader(cfg, spec)
        cpu = DaliBatchStream(gpu.index, gpu.batcher, gpu.plan, seed=cfg.seed, batch_size=gpu.batch_size,
                              modality=gpu.modality, cfg=cfg, num_threads=1, device_id=None)
        key = "images" if model == "image_debug" else "audio"
        for x, y in zip(itertools.islice(gpu, 3), itertools.islice(cpu, 3)):
            assert x[key].is_cuda and not y[key].is_cuda
            assert_same_layout(x, {k: v.to(x[k].device) for k, v in y.items()})
            assert_close(x[key].cpu(), y[key], rtol=0, atol=0.05)


@pytest.mark.parametrize("batching", ["crop", "pad"])
def test_audio_model_pretrains_on_dali_batches(tmp_path, monkeypatch, batching):
    path = write_audio_shards(tmp_path / "train", 24, lengths=(8000, 16000))
    records = pretrain_in_process(monkeypatch, "debug_audio.yaml", tmp_path / "run", f"data.path={path}",
                                  "data.reader=dali", f"data.audio_batching={batching}", "train.steps=6",
                                  "train.batch_size=4", "train.log_every=3", "train.warmup_steps=2")
    assert [r["step"] for r in records] == [3, 6]
    assert all(r["loss"] == r["loss"] and r["bad_samples"] == 0 for r in records)
