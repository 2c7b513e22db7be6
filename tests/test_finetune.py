"""`d2v finetune`: heads, lr groups, schedules, augmentation, bad labels, and the command end to end.

The end-to-end runs fine-tune run directories written in the trainer's layout (`test_eval.fake_run`)
on the real prepared shards (cut down), through DeepSpeed in a subprocess, as a user would.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from d2v_engine.config import load_config
from d2v_engine.ctc import CharVocab
from d2v_engine.data.prepare import PrepareOptions, prepare
from d2v_engine.errors import UserError
from d2v_engine.finetune import FinetuneOptions, finetune_config, finetune_spec, label_budget, recipe_path, run_start
from d2v_engine.finetune_loop import build_scheduler, lr_factor, param_groups
from d2v_engine.finetune_data import LabelledSet, _encode_transcripts, batch_ids, choose_labels, remap_classes
from d2v_engine.heads import FinetuneModel, layer_id, mix_images, random_resized_crop
from d2v_engine.models.registry import build_encoder, get_spec
from tests.test_eval import fake_run, run


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ftdata")
    for name, limit in (("fashion-mnist", 200), ("spoken-words", 16), ("text-corpus", 120)):
        prepare(name, root, PrepareOptions(limit=limit, shard_size=100, workers=2))
    return root


def model_for(name: str, **finetune) -> FinetuneModel:
    cfg = load_config(None, [f"model.name={name}", "target.top_k=2", *(f"finetune.{k}={v}" for k, v in finetune.items())])
    return FinetuneModel(build_encoder(get_spec(name)), "classify", 5, cfg.finetune), cfg


# ------------------------------------------------------------------------------ parts
def test_layer_wise_lr_groups():
    model, cfg = model_for("image_small", layer_decay=0.5)
    cfg.train.weight_decay = 0.05
    depth = model.encoder.num_layers
    groups = param_groups(model, cfg)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert scale_of[id(names["head.linear.weight"])] == 1.0
    assert scale_of[id(names["encoder.embeddings.projection.weight"])] == 0.5 ** (depth + 1)
    for i in range(depth):
        assert scale_of[id(names[f"encoder.encoder.layers.{i}.attention.q_proj.weight"])] == 0.5 ** (depth - i)
    assert scale_of[id(names["encoder.relative_position_bias.relative_position_bias_table"])] == 0.5
    # every trainable parameter is in exactly one group; no decay on norms and biases
    assert sorted(scale_of) == sorted(id(p) for p in model.parameters())
    for g in groups:
        assert all((p.ndim > 1) == (g["weight_decay"] > 0) for p in g["params"] if p.ndim <= 1 or g["weight_decay"])
    assert layer_id("encoder.feature_extractor.conv_layers.0.conv.weight", 4) == 0
    assert layer_id("encoder.pos_conv_embed.layers.3.conv.weight", 4) == 0
    assert layer_id("encoder.layernorm.weight", 4) == 5 == layer_id("head.linear.weight", 4)


def test_schedules_and_frozen_encoder():
    cfg = load_config(None, ["target.top_k=2", "train.steps=100", "train.warmup_steps=10", "finetune.schedule=poly"])
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] < factors[9] < 1 and max(factors) <= 1 and factors[-1] < 0.02
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    cfg = load_config(None, ["target.top_k=2", "train.steps=100", "finetune.schedule=tri_stage", "finetune.final_lr_scale=0.05"])
    assert lr_factor(0, cfg) == pytest.approx(0.01) and lr_factor(10, cfg) == 1.0 == lr_factor(49, cfg)
    assert lr_factor(99, cfg) == pytest.approx(0.05, rel=0.1)
    model, cfg = model_for("image_debug", freeze_steps=3, layer_decay=0.9)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=1e-3)
    sched = build_scheduler(opt, cfg)
    for step in range(5):
        for g in opt.param_groups:
            expected = 0.0 if g["encoder"] and step < 3 else 1e-3 * g["lr_scale"] * lr_factor(step, cfg)
            assert g["lr"] == pytest.approx(expected)
        opt.step()
        sched.step()


def test_head_learns_a_separable_toy_task():
    """Classes are the quadrant that is bright: a random-init encoder + head learns them."""
    model, cfg = model_for("image_debug")
    size = model.encoder.spec.image_size
    gen = torch.Generator().manual_seed(int(np.random.randint(1 << 30)))

    def batch(n):
        labels = torch.randint(0, 4, (n,), generator=gen)
        images = torch.randn(n, 3, size, size, generator=gen) * 0.3
        half = size // 2
        for i, c in enumerate(labels.tolist()):
            images[i, :, (c // 2) * half:(c // 2 + 1) * half, (c % 2) * half:(c % 2 + 1) * half] += 1.5
        return {"images": images, "index": torch.arange(n)}, labels

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(60):
        x, y = batch(32)
        loss = torch.nn.functional.cross_entropy(model(x)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = batch(200)
    with torch.no_grad():
        acc = (model(x)[0].argmax(-1) == y).float().mean().item()
    assert acc > 0.9


def test_ctc_head_and_audio_masks():
    cfg = load_config(None, ["model.name=audio_debug", "target.top_k=2", "finetune.mask_time_prob=0.5", "finetune.mask_channel_prob=0.3",
                             "finetune.mask_channel_length=4"])
    encoder = build_encoder(get_spec("audio_debug"))
    model = FinetuneModel(encoder, "ctc", len(CharVocab()), cfg.finetune)
    audio = torch.randn(3, 8000)
    pad = torch.zeros(3, 8000, dtype=torch.bool)
    pad[1, 5000:] = True
    batch = {"audio": audio, "padding_mask": pad, "index": torch.arange(3)}
    model.eval()
    logp, frames = model(batch)
    assert logp.shape[:2] == (3, int(frames.max())) and logp.shape[2] == len(CharVocab())
    assert frames[1] < frames[0] and torch.allclose(logp.exp().sum(-1), torch.ones(()), atol=1e-5)
    # masks only in training, and deterministic in (seed, step, index)
    model.train()
    model.encoder.encoder.layerdrop = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    a, _ = model(batch)
    b, _ = model(batch)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, logp)
    assert encoder.feature_extractor.conv_layers[0].conv.weight.requires_grad is False


def test_augmentations():
    gen = torch.Generator().manual_seed(int(np.random.randint(1 << 30)))
    images = torch.randn(6, 3, 16, 16)
    assert torch.equal(random_resized_crop(images, gen, 1.0, False), images)
    flipped = random_resized_crop(images, torch.Generator().manual_seed(1), 1.0, True)
    for a, b in zip(flipped, images):   # each image is itself or its mirror
        assert torch.allclose(a, b, atol=1e-5) or torch.allclose(a, b.flip(-1), atol=1e-5)
    cropped = random_resized_crop(images, gen, 0.3, False)
    assert cropped.shape == images.shape and not torch.allclose(cropped, images)
    targets = torch.nn.functional.one_hot(torch.arange(6) % 3, 3).float()   # rows 0 and 5 differ
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        mixed, soft = mix_images(images, targets, gen, mixup, cutmix)
        torch.testing.assert_close(soft.sum(-1), torch.ones(6))
        lam = soft[0, 0].item()   # row 0's own class; the rest is row 5's
        if mixup:
            torch.testing.assert_close(mixed[0], lam * images[0] + (1 - lam) * images[5])
        else:   # the weights are the pasted area
            pasted = (mixed[0] != images[0]).any(0).float().mean().item()
            assert pasted == pytest.approx(1 - lam, abs=1e-6)


def test_label_budget_batches_and_bad_labels():
    keep = choose_labels(1000, 600, seed=3)
    assert len(keep) == 600 == len(set(keep.tolist())) and np.array_equal(keep, choose_labels(1000, 600, 3))
    assert len(choose_labels(1000, 0.25, 0)) == 250 and len(choose_labels(1000, 0, 0)) == 1000
    with pytest.raises(UserError, match="at most 1000"):
        choose_labels(1000, 5000, 0)
    # --labels: a count, a fraction, or an amount of transcribed audio
    assert label_budget("600") == ("labels", 600) and label_budget("0.01") == ("labels", 0.01)
    assert label_budget("10min") == ("label_seconds", 600) and label_budget("1h") == ("label_seconds", 3600)
    assert label_budget("90s") == ("label_seconds", 90)
    for bad in ("ten", "5days", "0", "-3"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a label budget"):
            label_budget(bad)
    # every sample once per epoch, split over ranks and micro-batches without overlap
    n, bs = 50, 10
    seen = np.concatenate([batch_ids(s, m, n, bs, r, 2, 1, 0) for s in range(5) for m in range(1) for r in range(2)])
    assert sorted(seen.tolist()) == list(range(n))
    train = LabelledSet([0] * 4, np.array([3, 7, 3, 7]), None)
    test = LabelledSet([0] * 3, np.array([7, 3, 9]), None)
    lines = []
    assert remap_classes(train, test, "t", lines.append) == [3, 7, 9]
    assert test.labels.tolist() == [1, 0, 2] and train.labels.tolist() == [0, 1, 0, 1]
    assert "1 test sample(s) are of 1 class(es)" in lines[0]
    lines = []
    raws, texts, ids = _encode_transcripts([{}, {}, {}], ["go left", "caf\u00e9 now", "stop"], CharVocab(),
                                           Path("x"), lines.append)
    assert texts == ["go left", "stop"] and len(ids) == 2 and "skipped 1 transcript" in lines[0]


# ------------------------------------------------------------------------------ the command
def finetune(run_dir: Path, *args: str) -> dict:
    run("d2v_engine/finetune.py", "--run", str(run_dir), *args, "train.progress=false", timeout=300)
    return json.loads((run_dir / "finetune" / "finetune.json").read_text())


def test_image_finetune_against_random_init_and_exact_resume(data_root, tmp_path):
    run_dir = fake_run(tmp_path / "run", "debug_image.yaml", data_root / "fashion-mnist" / "train")
    common = ("--task", "fashion-mnist", "--labels", "120", "train.steps=8", "train.batch_size=16",
              "train.warmup_steps=2", "finetune.eval_every=4", "train.log_every=2", "finetune.test_limit=64")
    results = finetune(run_dir, "--compare", "random-init", *common, "train.save_every=4",
                       "train.keep_checkpoints=2")
    r = results["fashion-mnist"]
    assert r["metric"] == "accuracy" and r["labels"] == 120 and r["steps"] == 8 and r["wall_s"] > 0
    assert 0 <= r["pretrained"] <= 1 and 0 <= r["random_init"] <= 1
    out = run_dir / "finetune" / "fashion-mnist"
    assert (out / "curve.png").is_file() and any((out / "tensorboard").iterdir())
    curve = [json.loads(x) for x in (out / "test.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [4, 8] and curve[-1]["accuracy"] == r["pretrained"]
    with safe_open(out / "model.safetensors", "pt") as f:
        meta = f.metadata()
        first = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "d2v-finetune-1" and meta["kind"] == "classify" and int(meta["outputs"]) == 10
    assert any(k.startswith("head.") for k in first) and any(k.startswith("encoder.") for k in first)
    assert (out / "random_init" / "model.safetensors").is_file()
    # resume from step 4: the same weights at step 8, bit for bit
    (out / "checkpoints" / "latest").write_text("step00000004")
    finetune(run_dir, *common, "train.save_every=4", "run.resume=true")
    with safe_open(out / "model.safetensors", "pt") as f:
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), first[k]), k


def test_audio_ctc_and_text_finetune(data_root, tmp_path):
    from tokenizers import Tokenizer

    audio = fake_run(tmp_path / "audio", "debug_audio.yaml", data_root / "spoken-words" / "train")
    r = finetune(audio, "--task", "spoken-words-ctc", "--labels", "3", "train.steps=3",
                 "train.batch_size=4", "finetune.freeze_steps=1", "ds.zero_stage=2")["spoken-words-ctc"]
    assert r["metric"] == "cer" and set(r["pretrained_scores"]) == {"wer", "cer"}
    assert r["pretrained"] >= 0 and r["labels"] == 3
    text_data = data_root / "text-corpus"
    vocab = Tokenizer.from_file(str(text_data / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    text = fake_run(tmp_path / "text", "debug_text.yaml", text_data / "train", vocab)
    r = finetune(text, "--task", "wordnet", "--labels", "60", "train.steps=3", "train.batch_size=4",
                 "ds.precision=bf16")["wordnet"]
    assert r["metric"] == "accuracy" and 0 <= r["pretrained"] <= 1 and math.isfinite(r["pretrained"])


def test_recipe_dropouts_reach_the_encoder(data_root, tmp_path):
    """The recipe's drop path (and an override's layerdrop) shape the encoder, not only config.yaml."""
    image = run_start(fake_run(tmp_path / "image", "debug_image.yaml", data_root / "fashion-mnist" / "train"))
    cfg = finetune_config(image.base, "image", FinetuneOptions(task="fashion-mnist"), tmp_path / "ft")
    assert cfg.model.drop_path > 0 and image.spec.transformer.drop_path != cfg.model.drop_path
    assert finetune_spec(image, cfg).transformer.drop_path == cfg.model.drop_path
    audio = run_start(fake_run(tmp_path / "audio", "debug_audio.yaml", data_root / "spoken-words" / "train"))
    cfg = finetune_config(audio.base, "audio", FinetuneOptions(task="spoken-digits", overrides=["model.layerdrop=0.3"]),
                          tmp_path / "ft2")
    assert finetune_spec(audio, cfg).transformer.layerdrop == 0.3
    # CTC has its own recipe; --config replaces either
    opts = FinetuneOptions(task="spoken-words-ctc")
    assert recipe_path("audio", "ctc", opts).name == "finetune_audio_ctc.yaml"
    assert recipe_path("audio", "classify", opts).name == "finetune_audio.yaml"
    assert recipe_path("image", "ctc", FinetuneOptions(task="t", config="my.yaml")) == Path("my.yaml")


def test_user_errors(data_root, tmp_path, capsys):
    from d2v_engine import cli

    run_dir = fake_run(tmp_path / "run", "debug_image.yaml", data_root / "fashion-mnist" / "train")
    assert cli.main(["finetune", "--run", str(run_dir), "--task", "wordnet"]) == 2
    assert "fine-tunes text models" in capsys.readouterr().err
    assert cli.main(["finetune", "--run", str(run_dir), "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert cli.main(["finetune", "--run", str(run_dir), "--task", "fashion-mnist", "--labels", "10min"]) == 2
    assert "budgets transcribed audio" in capsys.readouterr().err


def test_two_ranks_match_one(data_root, tmp_path):
    """ZeRO-2 over two ranks deals each global batch out in halves: the same losses as one rank."""
    import os
    import subprocess
    import sys

    from tests.test_distributed import free_port

    run_dir = fake_run(tmp_path / "run", "debug_image.yaml", data_root / "fashion-mnist" / "train")
    args = ["--run", str(run_dir), "--task", "fashion-mnist", "--labels", "64", "train.steps=4",
            "train.batch_size=16", "train.warmup_steps=1", "train.log_every=1", "finetune.test_limit=32",
            "train.progress=false", "ds.zero_stage=2", "model.drop_path=0.0", "finetune.crop_scale=1.0",
            "finetune.flip=false"]
    finetune(run_dir, *args, "run.dir=" + str(tmp_path / "one"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                           str(free_port()), "d2v_engine/finetune.py", *args, "run.dir=" + str(tmp_path / "two")],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    scores = [json.loads((tmp_path / d / "test.jsonl").read_text().splitlines()[-1])["accuracy"]
              for d in ("one", "two")]
    assert scores[0] == pytest.approx(scores[1], abs=1 / 32 + 1e-9)


# ------------------------------------------------------------------------------ preemption, fresh runs
def test_sigterm_stops_with_a_checkpoint_and_the_resume_is_bit_exact(data_root, tmp_path, monkeypatch, capsys):
    """SIGTERM at a fresh random step: exit 3 after that step's checkpoint; `run.resume=true` ends
    with the uninterrupted run's weights, losses and test records. A fresh run in the same folder
    then starts over, and a `run.dir` override gets the curve."""
    import os
    import random
    import signal

    from d2v_engine import finetune as ft
    from d2v_engine.preemption import PREEMPTED
    from tests.test_preemption import single_rank

    run_dir = fake_run(tmp_path / "run", "debug_image.yaml", data_root / "fashion-mnist" / "train")
    args = ["--run", str(run_dir), "--task", "fashion-mnist", "--labels", "48", "train.steps=6", "train.batch_size=8",
            "train.warmup_steps=1", "train.log_every=1", "finetune.eval_every=2", "finetune.test_limit=32",
            "train.progress=false", "ds.zero_stage=0"]
    out, ref = run_dir / "finetune" / "fashion-mnist", tmp_path / "reference"

    def outputs(folder: Path):
        with safe_open(folder / "model.safetensors", "pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}
        records = [{k: v for k, v in json.loads(x).items() if k not in ("samples_per_s", "step_ms", "seconds")}
                   for name in ("metrics.jsonl", "test.jsonl") for x in (folder / name).read_text().splitlines()]
        return weights, records

    stop_at = random.Random().randrange(1, 6)
    train_step = ft.Finetuner.train_step

    def signalled_step(self):
        result = train_step(self)
        if self.step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    handler = signal.getsignal(signal.SIGTERM)
    with single_rank():
        assert ft.main([*args, f"run.dir={ref}"]) == 0
        assert (ref / "curve.png").is_file() and not (out / "curve.png").exists()   # the override's folder
        results = (run_dir / "finetune" / "finetune.json").read_text()
        monkeypatch.setattr(ft.Finetuner, "train_step", signalled_step)
        assert ft.main(args) == PREEMPTED, stop_at
        assert signal.getsignal(signal.SIGTERM) is handler
        assert (out / "checkpoints" / "latest").read_text() == f"step{stop_at:08d}"
        assert f"finetune: SIGTERM during step {stop_at}: stopped after step {stop_at} of 6" in capsys.readouterr().out
        assert (run_dir / "finetune" / "finetune.json").read_text() == results   # no figure of a stopped run
        monkeypatch.setattr(ft.Finetuner, "train_step", train_step)
        assert ft.main([*args, "run.resume=true"]) == 0
        (w_ref, r_ref), (w, r) = outputs(ref), outputs(out)
        assert r == r_ref, stop_at
        assert w.keys() == w_ref.keys() and all(torch.equal(w[k], w_ref[k]) for k in w), stop_at
        # a fresh run in the used folder: its own records and checkpoints only
        capsys.readouterr()
        assert ft.main([*args, "train.steps=4"]) == 0
        assert "removed the earlier run's metrics.jsonl, test.jsonl, tensorboard, checkpoints" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in (out / "test.jsonl").read_text().splitlines()] == [2, 4]
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step00000004"]


def test_save_every_minutes_saves_by_the_clock(data_root, tmp_path, monkeypatch):
    """A clock that moves 40 s per step with saves every minute: steps 2 and 4, then the end."""
    from d2v_engine import finetune as ft
    from tests.test_preemption import single_rank

    now = [1000.0]
    train_step = ft.Finetuner.train_step

    def slow_step(self):
        now[0] += 40.0
        return train_step(self)

    monkeypatch.setattr(ft.Finetuner, "train_step", slow_step)
    monkeypatch.setattr("d2v_engine.finetune.time.monotonic", lambda: now[0])
    run_dir = fake_run(tmp_path / "run", "debug_image.yaml", data_root / "fashion-mnist" / "train")
    with single_rank():
        assert ft.main(["--run", str(run_dir), "--task", "fashion-mnist", "--labels", "32", "train.steps=5",
                        "train.batch_size=4", "train.warmup_steps=1", "finetune.test_limit=8", "train.progress=false",
                        "train.save_every_minutes=1", "train.keep_checkpoints=5", "ds.zero_stage=0"]) == 0
    ckpts = run_dir / "finetune" / "fashion-mnist" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000002", "step00000004", "step00000005"]
