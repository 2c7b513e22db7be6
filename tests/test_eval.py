"""`d2v eval` and its parts: probes, checkpoint loading, the command on a real (tiny) run.

The image run is a real 10-step DeepSpeed run on a few hundred prepared Fashion-MNIST images; the
audio and text tasks probe a run directory written here in DeepSpeed's layout (one model-states
file), which keeps them to seconds while `d2v prepare` provides the real probe shards.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v_engine import cli
from d2v_engine.checkpoint import build_run_encoder, load_run_config, load_run_weights
from d2v_engine.config import dump_config, load_config
from d2v_engine.data.prepare import PrepareOptions, prepare
from d2v_engine.eval import EvalOptions, evaluate
from d2v_engine.models.registry import build_encoder, get_spec
from d2v_engine.probes import knn_accuracy, linear_accuracy, masked_mean

ROOT = Path(__file__).resolve().parents[1]
# One thread per process: the suite shares 2 cores, and oversubscribed OpenMP threads spin-wait.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaldata")
    for name, limit in (("fashion-mnist", 256), ("spoken-words", 12), ("text-corpus", 120)):
        prepare(name, root, PrepareOptions(limit=limit, shard_size=100, workers=2))
    return root


@pytest.fixture(scope="module")
def image_run(data_root, tmp_path_factory) -> Path:
    """A real 10-step debug_image run (DeepSpeed ZeRO-1 checkpoint)."""
    run_dir = tmp_path_factory.mktemp("imagerun") / "run"
    run("d2v_engine/pretrain.py", "--config", "configs/debug_image.yaml", "train.progress=false",
        f"data.path={data_root / 'fashion-mnist' / 'train'}", f"run.dir={run_dir}", "train.steps=10",
        "train.warmup_steps=2", "train.log_every=5")
    return run_dir


def fake_run(folder: Path, config: str, data_path: Path, vocab: int | None = None) -> Path:
    """A run directory in the trainer's layout, with a random encoder as `step00000001`."""
    cfg = load_config(ROOT / "configs" / config, [f"data.path={data_path}", f"run.dir={folder}"])
    spec = get_spec(cfg.model.name)
    if vocab:
        spec = dataclasses.replace(spec, vocab_size=vocab)
    torch.manual_seed(123)
    encoder = build_encoder(spec)
    tag = folder / "checkpoints" / "step00000001"
    tag.mkdir(parents=True)
    dump_config(cfg, folder / "config.yaml")
    module = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    teacher = {k: v + 1 for k, v in encoder.state_dict().items() if not k.startswith("feature_")}
    torch.save({"module": module, "step": 1, "teacher": teacher}, tag / "mp_rank_00_model_states.pt")
    (tag / "d2v.json").write_text(json.dumps({"step": 1, "world_size": 1, "zero_stage": 0,
                                              "precision": "fp32", "model": cfg.model.name}))
    (folder / "checkpoints" / "latest").write_text("step00000001")
    return folder


def check_result(result: dict) -> None:
    for scores in (result, result["random_init"]):
        assert set(scores) >= {"knn_acc", "linear_acc"}
        assert 0.0 <= scores["knn_acc"] <= 1.0 and 0.0 <= scores["linear_acc"] <= 1.0


def test_knn_and_linear_probes_on_separable_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    y = np.arange(300) % 3
    x = centres[y] + rng.normal(size=(300, 16))
    assert knn_accuracy(x[:200], y[:200], x[200:], y[200:], k=20) == 1.0
    assert linear_accuracy(x[:200], y[:200], x[200:], y[200:]) == 1.0
    shuffled = rng.permutation(y[:200])        # labels unrelated to the features: about chance
    assert knn_accuracy(x[:200], shuffled, x[200:], y[200:]) < 0.6


def test_knn_ties_go_to_the_more_similar_class():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -0.1]])
    test = np.array([[1.0, 0.2], [0.2, 1.0]])
    # k = 2: one neighbour per class in both cases; the nearer one decides.
    assert knn_accuracy(train, np.array([0, 1, 2]), test, np.array([0, 1]), k=2) == 1.0


def test_masked_mean_ignores_padding():
    x = torch.randn(2, 5, 3)
    pad = torch.tensor([[False] * 5, [False, False, True, True, True]])
    out = masked_mean(x, pad)
    torch.testing.assert_close(out[0], x[0].mean(0))
    torch.testing.assert_close(out[1], x[1, :2].mean(0))


def test_eval_command_on_a_real_run(image_run, data_root, tmp_path):
    out = tmp_path / "eval.json"
    proc = run("-m", "d2v_engine.cli", "eval", "--run", str(image_run), "--json", str(out),
               "--limit-train", "200", "--limit-test", "100", "--raw")
    results = json.loads(out.read_text())
    assert list(results) == ["fashion-mnist"]
    r = results["fashion-mnist"]
    check_result(r)
    assert r["n_train"] == 200 and r["n_test"] == 100 and r["checkpoint"] == "step00000010"
    assert r["raw_input"]["knn_acc"] > 0.5      # raw pixels of Fashion-MNIST are far above chance
    assert "fashion-mnist" in proc.stdout and "random" in proc.stdout
    assert (image_run / "plots" / "eval.png").is_file()
    assert json.loads((image_run / "eval.json").read_text()) == results


def test_checkpoint_weights_and_random_init(image_run):
    cfg = load_run_config(image_run)
    weights = load_run_weights(image_run)
    assert weights.step == 10 and weights.zero_stage == 1
    student = build_run_encoder(cfg, weights, "student")
    for name, tensor in student.state_dict().items():
        if name in weights.student:
            torch.testing.assert_close(tensor, weights.student[name])
    a, b = build_run_encoder(cfg, weights, "random"), build_run_encoder(cfg, weights, "random")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y)       # the same seed gives the same initialisation
    moved = [n for n, x in a.state_dict().items() if not torch.equal(x, student.state_dict()[n])]
    assert moved, "training changed no weight"


def test_zero2_checkpoint_is_gathered(data_root, tmp_path):
    """Under ZeRO-2/3 the fp32 weights are spread over optimizer states: DeepSpeed's zero_to_fp32
    gathers them (ZeRO-3 takes the same path; its CPU start-up is too slow for this suite)."""
    run_dir = tmp_path / "z2"
    run("d2v_engine/pretrain.py", "--config", "configs/debug_image.yaml", "train.progress=false",
        f"data.path={data_root / 'fashion-mnist' / 'train'}", f"run.dir={run_dir}", "train.steps=2",
        "train.warmup_steps=1", "ds.zero_stage=2")
    weights = load_run_weights(run_dir)
    assert weights.zero_stage == 2 and weights.step == 2
    states = torch.load(run_dir / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    encoder = build_run_encoder(load_run_config(run_dir), weights, "student")
    for name, tensor in encoder.state_dict().items():
        if f"encoder.{name}" in states:
            torch.testing.assert_close(tensor, states[f"encoder.{name}"].float())


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_eval_audio_and_text_tasks(modality, data_root, tmp_path):
    data = {"audio": data_root / "spoken-words", "text": data_root / "text-corpus"}[modality]
    vocab = None
    if modality == "text":
        from tokenizers import Tokenizer
        vocab = Tokenizer.from_file(str(data / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    run_dir = fake_run(tmp_path / "run", f"debug_{modality}.yaml", data / "train", vocab)
    results = evaluate(run_dir, EvalOptions(weights="teacher", batch_size=8), echo=lambda *a: None)
    expected = ["spoken-digits", "spoken-digits-5db"] if modality == "audio" else ["wordnet"]
    assert list(results) == expected
    for r in results.values():
        check_result(r)
    custom = evaluate(run_dir, EvalOptions(probe_train=str(data / "probe_train"),
                                           probe_test=str(data / "probe_test"), limit_test=6),
                      echo=lambda *a: None)
    assert list(custom) == ["custom"] and custom["custom"]["n_test"] == 6


def test_user_errors_are_one_sentence(image_run, tmp_path, capsys):
    assert cli.main(["eval", "--run", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert cli.main(["eval", "--config", "configs/debug_image.yaml", f"run.dir={tmp_path}"]) == 2
    assert f"'{tmp_path}' is not a run directory" in capsys.readouterr().err
    assert cli.main(["eval", "--run", str(image_run), "--task", "wordnet"]) == 2
    assert "probes text models" in capsys.readouterr().err
    assert cli.main(["eval", "--run", str(image_run), "--probe-train", str(tmp_path)]) == 2
    assert "go together" in capsys.readouterr().err
