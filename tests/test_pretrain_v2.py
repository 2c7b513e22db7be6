"""A data2vec 2.0 run through the tools around pretraining: export, init_from, eval, Hugging Face."""
from __future__ import annotations

import pytest

from d2v_engine import cli
from d2v_engine.eval import EvalOptions, evaluate
from d2v_engine.export import read_export
from tests.test_pretrain import assert_ok, metrics, pretrain


@pytest.fixture(scope="module")
def v2_run(data_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("v2") / "run"
    assert_ok(pretrain("debug_image_v2.yaml", f"data.path={data_root / 'fashion-mnist' / 'train'}",
                       f"run.dir={run}", "train.steps=8", "train.log_every=1", "train.warmup_steps=2"))
    return run


def test_export_holds_the_decoder_and_starts_runs_of_either_version(v2_run, data_root, tmp_path):
    out = tmp_path / "w.safetensors"
    assert cli.main(["export", "--run", str(v2_run), "--out", str(out)]) == 0
    exported = read_export(out)
    assert exported["head"] == {} and any(k.startswith("blocks.0.conv") for k in exported["decoder"])
    assert "embeddings.position_embeddings" not in exported["student"]    # a fixed table, not saved

    data = f"data.path={data_root / 'fashion-mnist' / 'train'}"
    again = tmp_path / "again"
    assert_ok(pretrain("debug_image_v2.yaml", data, f"run.dir={again}", f"run.init_from={out}",
                       "train.steps=1", "train.log_every=1"))
    assert metrics(again)[0]["loss"] < 0.9 * metrics(v2_run)[0]["loss"]   # trained encoder and decoder

    # A 1.0 run of the same architecture starts from the 2.0 encoder and teacher with a fresh head.
    v1 = tmp_path / "v1"
    assert_ok(pretrain("debug_image.yaml", data, f"run.dir={v1}", "model.name=image_debug_v2",
                       f"run.init_from={out}", "train.steps=1", "train.log_every=1"))


def test_eval_probes_the_v2_student(v2_run):
    results = evaluate(v2_run, EvalOptions(limit_train=200, limit_test=100), echo=lambda *a: None)
    r = results["fashion-mnist"]
    assert 0.1 < r["knn_acc"] <= 1 and 0.1 < r["linear_acc"] <= 1 and r["checkpoint"] == "step00000008"


def test_hf_export_of_a_v2_architecture_is_one_sentence(v2_run, tmp_path, capsys):
    pytest.importorskip("transformers")
    assert cli.main(["hf-export", "--run", str(v2_run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "transformers#23069" in err and "Traceback" not in err
