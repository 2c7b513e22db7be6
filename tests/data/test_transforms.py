"""Per-sample decoding and augmentation: crops, normalisation, resampling, tokenization."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from synth_shards import audio_bytes, png_bytes

from d2v_engine.data.transforms import (ImageTransform, TextEncoder, counter_uniforms, decode_audio,
                                        normalize_audio, random_crop, random_resized_crop_boxes,
                                        resample, sample_rng)
from d2v_engine.errors import UserError


@pytest.mark.parametrize("width, height", [(28, 28), (64, 20), (5, 300), (1, 1)])
def test_crop_box_fits_and_respects_scale(width, height):
    n = 200
    u = counter_uniforms(0, 0, np.arange(n), 41, 0)
    boxes = random_resized_crop_boxes(np.full(n, width), np.full(n, height), u, (0.35, 1.0))
    left, top, right, bottom = boxes.T
    assert (0 <= left).all() and (left < right).all() and (right <= width).all()
    assert (0 <= top).all() and (top < bottom).all() and (bottom <= height).all()
    w, h = right - left, bottom - top
    if (width, height) == (28, 28):
        # Rounding of w and h can move the area a little below the requested fraction.
        assert (0.25 <= w * h / (width * height)).all() and (w * h <= width * height).all()
        assert (3 / 4 - 0.15 <= w / h).all() and (w / h <= 4 / 3 + 0.15).all()
        assert len(set(map(tuple, boxes.tolist()))) > n // 2      # the boxes vary


def test_counter_uniforms_are_uniform_and_pure():
    u = counter_uniforms(7, 2, np.arange(5000), 6, 1)
    assert u.shape == (5000, 6) and 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 12 ** -0.5) < 0.01
    # Row i depends on index[i] alone, not on the other samples of the call.
    assert np.array_equal(counter_uniforms(7, 2, np.array([4321]), 6, 1)[0], u[4321])
    for seed, epoch, stream in ((8, 2, 1), (7, 3, 1), (7, 2, 2)):
        other = counter_uniforms(seed, epoch, np.arange(5000), 6, stream)
        assert np.abs(other - u).mean() > 0.2


def test_image_transform_shape_normalisation_and_seeding():
    transform = ImageTransform(24, 0.35, True, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    data = png_bytes(np.random.default_rng(0), size=40)
    x = transform(data, seed=0, epoch=0, index=7)
    assert x.dtype == torch.float32 and x.shape == (3, 24, 24)
    assert x.min() >= -2 - 1e-5 and x.max() <= 2 + 1e-5
    assert torch.equal(x, transform(data, seed=0, epoch=0, index=7))
    others = [transform(data, seed=0, epoch=e, index=7) for e in range(1, 4)]
    assert not all(torch.equal(x, o) for o in others)


def test_grey_image_becomes_three_equal_channels():
    transform = ImageTransform(16, 1.0, False, (0.2, 0.2, 0.2), (0.3, 0.3, 0.3))
    x = transform(png_bytes(np.random.default_rng(1), size=16, mode="L"), seed=0, epoch=0, index=0)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_full_crop_without_flip_is_the_image():
    rng = np.random.default_rng(2)
    pixels = rng.integers(1, 255, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    # Scale (1, 1) and a square image: the only box with a ratio in [3/4, 4/3] is the whole image.
    transform = ImageTransform(16, 1.0, False, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    x = transform(buf.getvalue(), seed=0, epoch=0, index=0)
    expected = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.allclose(x, expected, atol=1e-6)


def test_resample_keeps_a_tone():
    rate, target, freq = 22050, 16000, 440.0
    wave = np.sin(2 * np.pi * freq * np.arange(rate) / rate).astype(np.float32)
    out = resample(wave, rate, target)
    assert out.dtype == np.float32 and len(out) == target
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * target / len(out) - freq) <= 2
    assert resample(wave, rate, rate) is wave


def test_decode_audio_mixes_channels_and_resamples():
    rng = np.random.default_rng(3)
    stereo = rng.standard_normal((22050, 2)).astype(np.float32) * 0.1
    buf = io.BytesIO()
    soundfile.write(buf, stereo, 22050, format="WAV", subtype="FLOAT")
    wave = decode_audio(buf.getvalue(), 16000)
    assert wave.dtype == np.float32 and wave.shape == (16000,)
    mono = decode_audio(audio_bytes(rng, 8000), 16000)
    assert mono.shape == (8000,)


def test_decode_audio_rejects_garbage_and_empty_clips():
    with pytest.raises(Exception):
        decode_audio(b"RIFF nonsense that is not audio", 16000)
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(0, np.float32), 16000, format="WAV")
    with pytest.raises(ValueError):
        decode_audio(buf.getvalue(), 16000)


def test_random_crop_and_normalisation():
    wave = np.random.default_rng(4).standard_normal(1000).astype(np.float32) * 3 + 2
    crop = random_crop(wave, 300, sample_rng(0, 0, 0, 0))
    assert len(crop) == 300 and np.isin(crop, wave).all()
    assert random_crop(wave, 2000, sample_rng(0, 0, 0, 0)) is wave
    norm = normalize_audio(crop)
    assert abs(norm.mean()) < 1e-5 and abs(norm.std() - 1) < 1e-3


def test_text_encoder_specials_and_truncation(text_shards):
    encoder = TextEncoder(text_shards.parent / "tokenizer.json", max_tokens=8)
    assert (encoder.bos, encoder.pad, encoder.eos, encoder.mask_id) == (0, 1, 2, 4)
    assert encoder.random_range == (5, encoder.vocab_size)
    ids = encoder("alpha bravo charlie delta echo foxtrot golf hotel india")
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) == 8
    short = encoder("alpha")
    assert short[0] == 0 and short[-1] == 2 and 3 <= len(short) < 8
    with pytest.raises(ValueError):
        encoder("   ")


def test_text_encoder_needs_roberta_specials(tmp_path, text_shards):
    tree = json.loads((text_shards.parent / "tokenizer.json").read_text())
    tree["added_tokens"] = [t for t in tree["added_tokens"] if t["content"] != "<mask>"]
    tree["model"]["vocab"].pop("<mask>")
    path = tmp_path / "no_mask.json"
    path.write_text(json.dumps(tree))
    with pytest.raises(UserError, match="<mask>"):
        TextEncoder(path, 16)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot be loaded"):
        TextEncoder(tmp_path / "broken.json", 16)
