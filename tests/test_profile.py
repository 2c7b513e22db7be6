"""`d2v profile`: the phase table tiles the step, the outputs have their fields, the FLOP count holds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from d2v_engine import cli
from d2v_engine.config import load_config
from d2v_engine.data.prepare import PrepareOptions, prepare
from d2v_engine.flops import step_flops_per_sample
from d2v_engine.models.data2vec import Data2Vec
from d2v_engine.models.data2vec2 import Data2Vec2
from d2v_engine.models.registry import build_encoder, get_spec
from d2v_engine.profile import PHASES, PhaseClock
from d2v_engine.teacher import EMATeacher

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"rows", "step_ms", "samples_per_s", "flops_per_sample", "mfu", "peak_mem_bytes", "device"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("profile")
    prepare("fashion-mnist", root / "data", PrepareOptions(limit=256, shard_size=128))
    return root / "data" / "fashion-mnist" / "train"


def run_profile(config: str, images: Path, out: Path, *args: str) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # the suite shares 2 cores: no spin-waiting threads
    proc = subprocess.run(
        [sys.executable, "-m", "d2v_engine.cli", "profile", "--config", f"configs/{config}",
         f"data.path={images}", "--warmup", "2", "--steps", "4", "--out", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (out / "stdout.txt").write_text(proc.stdout)
    return out


@pytest.fixture(scope="module")
def profiled(images, tmp_path_factory) -> Path:
    """One `d2v profile --compare` of debug_image on a few hundred prepared images."""
    return run_profile("debug_image.yaml", images, tmp_path_factory.mktemp("out"), "--trace-steps", "1",
                       "--compare", "kernels.backend=reference,auto")


def test_v2_profile_has_a_decoder_row(images, tmp_path):
    out = run_profile("debug_image_v2.yaml", images, tmp_path / "out", "--trace-steps", "0")
    result = json.loads((out / "profile.json").read_text())
    assert list(result["rows"]) == list(PHASES) and result["clones"] == 4
    assert result["rows"]["decoder"] > 0 and result["rows"]["student forward"] > 0
    assert abs(sum(result["rows"].values()) - result["step_ms"]) <= 0.05 * result["step_ms"]
    assert 0 < result["mfu"] < 1


@pytest.mark.parametrize("setting", ["reference", "auto"])
def test_profile_json_rows_tile_the_step(profiled, setting):
    result = json.loads((profiled / setting / "profile.json").read_text())
    assert KEYS <= set(result)
    assert list(result["rows"]) == list(PHASES)
    assert all(ms >= 0 for ms in result["rows"].values())
    assert abs(sum(result["rows"].values()) - result["step_ms"]) <= 0.05 * result["step_ms"]
    for phase in ("student forward", "teacher forward", "backward", "optimizer step"):
        assert result["rows"][phase] > 0, phase
    assert result["samples_per_s"] > 0 and 0 < result["mfu"] < 1
    assert result["flops_per_sample"] > 1e7 and result["peak_mem_bytes"] > 1e7
    assert result["device"].startswith("CPU")
    trace = json.loads((profiled / setting / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "phase: backward" in names and "phase: teacher forward" in names
    assert (profiled / setting / "profile.png").stat().st_size > 0


def test_compare_prints_every_row_with_its_ratio(profiled):
    stdout = (profiled / "stdout.txt").read_text()
    compare = json.loads((profiled / "compare.json").read_text())
    assert compare["key"] == "kernels.backend" and list(compare["results"]) == ["reference", "auto"]
    table = stdout[stdout.index("kernels.backend: ms per step"):]
    for phase in (*PHASES, "measured step", "samples/s"):
        assert phase in table, phase
    assert "auto/reference" in table and (profiled / "compare.png").is_file()
    assert "MFU" in stdout and "GFLOP/sample" in stdout


@pytest.mark.parametrize("model", ["image_debug", "text_debug"])
def test_flop_count_agrees_with_torch_flop_counter(model):
    """Our documented count against torch's counter on one real step (within 10%: torch skips the
    input gradient of the first layer and, on CPU, attention)."""
    cfg = load_config(None, [f"model.name={model}", "target.top_k=2"])
    spec = get_spec(model)
    encoder = build_encoder(spec)
    student = Data2Vec(encoder, cfg.loss, backend="reference")
    teacher = EMATeacher(encoder, cfg.teacher, cfg.target, backend="reference")
    if spec.modality == "image":
        batch = {"images": torch.randn(4, 3, 28, 28), "mask": torch.rand(4, 49) < 0.6}
    else:
        tokens = torch.randint(5, 300, (4, 40))
        batch = {"tokens": tokens, "clean": tokens, "padding_mask": torch.zeros(4, 40, dtype=torch.bool),
                 "mask": torch.rand(4, 40) < 0.15}
    with FlopCounterMode(display=False) as counter:
        loss, _ = student(batch, teacher)
        loss.backward()
    ours = step_flops_per_sample(spec, batch)
    assert abs(ours - counter.get_total_flops() / 4) <= 0.1 * ours


@pytest.mark.parametrize("model", ["image_debug_v2", "text_debug"])
def test_v2_flop_count_agrees_with_torch_flop_counter(model):
    """2.0's count (visible tokens x M copies, the decoder, one teacher pass) against torch's counter.

    (Ungrouped decoder convolutions: torch's counter ignores the groups of a convolution's backward.)"""
    spec = get_spec(model)
    cfg = load_config(None, [f"model.name={model}", "target.top_k=2", "method.version=2", "method.clones=3",
                             "decoder.dim=32", "decoder.layers=2", "decoder.groups=1"])
    encoder = build_encoder(spec)
    student = Data2Vec2(encoder, cfg.decoder, cfg.loss, 3, backend="reference")
    teacher = EMATeacher(encoder, cfg.teacher, cfg.target, backend="reference", copy=student.teacher_copy)
    if spec.modality == "image":
        batch = {"images": torch.randn(4, 3, 28, 28), "mask": torch.rand(4, 3, 49) < 0.8}
    else:
        tokens = torch.randint(5, 300, (4, 40))
        batch = {"tokens": tokens, "clean": tokens, "padding_mask": torch.zeros(4, 40, dtype=torch.bool),
                 "mask": torch.rand(4, 3, 40) < 0.48}
    with FlopCounterMode(display=False) as counter:
        loss, _ = student(batch, teacher)
        loss.backward()
    ours = student.step_flops(batch)
    assert abs(ours - counter.get_total_flops() / 4) <= 0.1 * ours


def test_phase_clock_charges_each_interval_to_its_phase():
    clock = PhaseClock(torch.device("cpu"))
    clock.begin("data wait")
    time.sleep(0.02)
    clock.begin("loss")
    time.sleep(0.04)
    clock.end()
    assert 0.015 < clock.totals["data wait"] < 0.035 and 0.035 < clock.totals["loss"] < 0.06
    assert clock.totals["backward"] == 0.0


def test_bad_compare_is_one_sentence(capsys):
    argv = ["profile", "--config", "configs/debug_image.yaml", "--compare", "kernels.backend=auto"]
    assert cli.main(argv) == 2
    assert "two or more distinct values" in capsys.readouterr().err
