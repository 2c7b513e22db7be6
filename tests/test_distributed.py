"""Two ranks on the CPU (DeepSpeed's CPU accelerator, gloo), through the real entry points.

Every run follows one recipe (the debug image model, 12 steps at a global batch of 32, a metrics line
every step, checkpoints at steps 6 and 12), so loss curves compare step by step:
- two ranks under ZeRO 1, 2 and 3 track the one-rank curve (fp32: 1e-5 relative, seen 2.4e-7;
  bf16 against the fp32 curve: 5e-3, seen 8e-4);
- a two-rank ZeRO-3 run killed while writing its step-12 checkpoint resumes from step 6 and logs the
  same losses for steps 7-12 as the uninterrupted run (1e-5 relative);
- the ZeRO-3 teacher's bytes per rank halve from one rank to two;
- `d2v export` gathers the ZeRO-3 run's weights, and a one-rank run starts from them;
- data2vec 2.0 (debug_image_v2) on two ranks under ZeRO-3 in bf16 tracks its one-rank fp32 curve;
- a NaN on one rank only: both ranks skip the step, and both stop on the same one;
- SIGTERM to one rank (and its DataLoader worker) at a random step from 6 on: both ranks save that
  step and exit with status 3, and metrics.jsonl, up to the signal a second run of the ZeRO-3 run's
  config and then the resumed run, is that run's, bit for bit.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d2v_engine import distributed
from d2v_engine.export import read_export

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "d2v_engine" / "pretrain.py"
# data.rank_split=samples: ranks take strided slices of one global order, so a global batch holds
# the same samples with one rank or two (dealing shards to ranks would change the batches).
RECIPE = ("train.steps=12", "train.log_every=1", "train.save_every=6", "train.keep_checkpoints=3",
          "train.warmup_steps=2", "train.progress=false", "data.rank_split=samples")
FP32_REL, BF16_REL = 1e-5, 5e-3

# Run as a script under the launcher: SIGKILL this rank on its second file of one checkpoint tag,
# i.e. in the middle of DeepSpeed's save (its first file is complete, the others are not written).
# `distributed.save_whole` writes each of DeepSpeed's checkpoint files.
KILL_DURING_SAVE = """
import os, runpy, signal, sys
from d2v_engine import distributed
real_save, calls = distributed.save_whole, []

def save(obj, path, *args, **kwargs):
    if {tag!r} in str(path) and os.environ.get("RANK") == "0":
        calls.append(path)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *args, **kwargs)

distributed.save_whole = save
sys.argv[0] = {pretrain!r}
runpy.run_path({pretrain!r}, run_name="__main__")
"""

# Run as a script under the launcher: a NaN in rank 1's inputs on optimizer steps 3 and 4.
NAN_ON_RANK_1 = """
import os, runpy, sys
from d2v_engine.trainer import Trainer
to_device = Trainer._to_device

def nan_input(self, batch):
    batch = to_device(self, batch)
    if self.rank == 1 and self.step + 1 in (3, 4):
        batch["images"].view(-1)[0] = float("nan")
    return batch

Trainer._to_device = nan_input
sys.argv[0] = {pretrain!r}
runpy.run_path({pretrain!r}, run_name="__main__")
"""

# Run as a script under the launcher: SIGTERM rank 1 and its DataLoader worker (as the launcher
# signals a rank's process tree) at the end of optimizer step {step}; rank 0 gets no signal.
SIGTERM_ON_RANK_1 = """
import os, psutil, runpy, signal, sys
from d2v_engine.trainer import Trainer
train_step = Trainer.train_step

def signalled_step(self):
    out = train_step(self)
    if self.rank == 1 and self.step == {step}:
        for child in psutil.Process().children(recursive=True):
            child.send_signal(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    return out

Trainer.train_step = signalled_step
sys.argv[0] = {pretrain!r}
runpy.run_path({pretrain!r}, run_name="__main__")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(run_dir: Path, data: Path, *overrides: str, ranks: int = 2, script: Path = PRETRAIN,
           timeout: int = 300, config: str = "debug_image.yaml") -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS script` (or plain `python script` for one rank) on the recipe."""
    # One OpenMP thread per rank: two ranks share the CI's 2 cores (oversubscribed threads spin).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["--config", str(ROOT / "configs" / config), f"data.path={data}",
            f"run.dir={run_dir}", *RECIPE, *overrides]
    if ranks == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), str(script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def losses(run_dir: Path, skip: int = 0) -> dict[int, float]:
    """Loss by step from metrics.jsonl, after its first `skip` records."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[skip:]
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def teacher_bytes(proc: subprocess.CompletedProcess) -> int:
    return int(re.search(r"teacher: (\d+) bytes per rank", proc.stdout).group(1))


def assert_same_curve(actual: dict[int, float], expected: dict[int, float], rel: float) -> None:
    worst = max(abs(actual[s] - expected[s]) / expected[s] for s in expected)
    assert actual.keys() == expected.keys() and worst <= rel, (worst, actual, expected)


@pytest.fixture(scope="module")
def images(data_root) -> Path:
    return data_root / "fashion-mnist" / "train"


@pytest.fixture(scope="module")
def one_rank(images, tmp_path_factory) -> Path:
    """The reference: one process, no ZeRO."""
    run = tmp_path_factory.mktemp("one_rank") / "run"
    ok(launch(run, images, "ds.zero_stage=0", ranks=1))
    return run


@pytest.fixture(scope="module")
def zero3(images, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Two ranks, ZeRO-3, activation checkpointing (which must not change a single loss)."""
    run = tmp_path_factory.mktemp("zero3") / "run"
    return run, ok(launch(run, images, "ds.zero_stage=3", "train.activation_checkpointing=true"))


@pytest.mark.parametrize("stage, precision, extra", [
    (1, "fp32", ("train.grad_accum=2",)),   # 2 ranks x 2 micro-batches of 8
    (2, "bf16", ()),
    (3, "fp32", ("train.activation_checkpointing=true",)),
])
def test_two_ranks_track_the_one_rank_curve(stage, precision, extra, images, one_rank, zero3, tmp_path):
    """Same global batch, same samples per step: the ranks' mean loss is the one-rank loss."""
    if stage == 3:
        run = zero3[0]
    else:
        run = tmp_path / "run"
        ok(launch(run, images, f"ds.zero_stage={stage}", f"ds.precision={precision}", *extra))
    assert_same_curve(losses(run), losses(one_rank), FP32_REL if precision == "fp32" else BF16_REL)
    assert (run / "checkpoints" / "latest").read_text() == "step00000012"


def test_zero3_killed_during_a_save_resumes_the_same_curve(images, zero3, tmp_path):
    """SIGKILL in the step-12 save leaves `latest` on step 6; the resumed run repeats steps 7-12 exactly."""
    run, driver = tmp_path / "run", tmp_path / "kill_during_save.py"
    driver.write_text(KILL_DURING_SAVE.format(tag="step00000012", pretrain=str(PRETRAIN)))
    killed = launch(run, images, "ds.zero_stage=3", "train.activation_checkpointing=true", script=driver)
    assert killed.returncode != 0
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step00000006"
    assert (checkpoints / "step00000012").is_dir()
    assert not (checkpoints / "step00000012" / "d2v.json").exists()   # written only after every file

    proc = ok(launch(run, images, "ds.zero_stage=3", "train.activation_checkpointing=true",
                     "run.resume=true"))
    assert "resumed from" in proc.stdout and "step00000006" in proc.stdout
    expected = {s: v for s, v in losses(zero3[0]).items() if s > 6}
    assert_same_curve(losses(run, skip=12), expected, FP32_REL)
    assert (checkpoints / "latest").read_text() == "step00000012"
    assert sorted(p.name for p in (checkpoints / "step00000012").glob("zero_pp_rank_*_model_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]


def test_zero3_teacher_bytes_per_rank_halve(images, one_rank, zero3, tmp_path):
    """Measured by each run at start-up: one rank holds the whole teacher, two ranks half each."""
    # 2 of the recipe's 12 steps: the same warm-up, and the EMA anneal pinned to the recipe's length.
    one = ok(launch(tmp_path / "run", images, "ds.zero_stage=3", "train.steps=2", "teacher.anneal_steps=12",
                    ranks=1))
    one_bytes, two_bytes = teacher_bytes(one), teacher_bytes(zero3[1])
    # Half the weights plus DeepSpeed's padding to a multiple of 2, and the unsplit buffers.
    assert 0.5 <= two_bytes / one_bytes < 0.52, (one_bytes, two_bytes)
    # On one rank, ZeRO-3 (sliced teacher, gathered forward) is bit for bit the plain run.
    assert_same_curve(losses(tmp_path / "run"), {s: losses(one_rank)[s] for s in (1, 2)}, 1e-6)


def test_export_then_start_another_world_size_from_it(images, one_rank, zero3, tmp_path):
    """Resuming on one rank says what to do; the exported weights start a one-rank run."""
    from d2v_engine.cli import main as d2v

    moved = tmp_path / "moved"
    shutil.copytree(zero3[0], moved)
    refused = launch(moved, images, "ds.zero_stage=3", "run.resume=true", ranks=1, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "2 rank(s)" in refused.stderr and "run.init_from=" in refused.stderr

    out = tmp_path / "weights.safetensors"
    assert d2v(["export", "--run", str(zero3[0]), "--out", str(out)]) == 0
    d2v(["export", "--run", str(one_rank), "--out", str(tmp_path / "one.safetensors")])
    got, ref = read_export(out), read_export(tmp_path / "one.safetensors")
    assert got["step"] == 12 and got["world_size"] == 2 and got["zero_stage"] == 3
    for part in ("student", "head", "teacher"):
        assert got[part].keys() == ref[part].keys()
        for name, tensor in ref[part].items():   # whole fp32 tensors, not slices
            assert got[part][name].dtype == torch.float32
            torch.testing.assert_close(got[part][name], tensor, rtol=0, atol=1e-5, msg=f"{part}.{name}")

    fresh = tmp_path / "fresh"
    ok(launch(fresh, images, "ds.zero_stage=1", f"run.init_from={out}", "train.steps=1", ranks=1))
    assert losses(fresh)[1] < 0.9 * losses(one_rank)[1]   # trained weights, on the same first batch


def test_v2_two_ranks_zero3_bf16_track_the_one_rank_curve(images, tmp_path):
    """data2vec 2.0 under ZeRO-3 in bf16 on two ranks (the decoder partitioned with the encoder, the
    teacher sliced) follows the one-rank fp32 curve. The decoder's input noise is drawn per rank, so
    it is off here: with it, the ranks draw other noise than the one rank does for the same samples."""
    common = ("decoder.mask_noise_std=0",)
    one, two = tmp_path / "one", tmp_path / "two"
    ok(launch(one, images, "ds.zero_stage=0", *common, ranks=1, config="debug_image_v2.yaml"))
    ok(launch(two, images, "ds.zero_stage=3", "ds.precision=bf16", "train.activation_checkpointing=true",
              *common, config="debug_image_v2.yaml"))
    assert_same_curve(losses(two), losses(one), BF16_REL)
    assert (two / "checkpoints" / "latest").read_text() == "step00000012"


def test_a_nan_on_one_rank_is_skipped_on_both(images, tmp_path):
    """Rank 1's loss is NaN on steps 3 and 4, rank 0's finite: the gradients summed over the ranks are
    NaN on both, so both skip step 3 (counted in rank 0's metrics) and both stop at step 4."""
    run, driver = tmp_path / "run", tmp_path / "nan_on_rank_1.py"
    driver.write_text(NAN_ON_RANK_1.format(pretrain=str(PRETRAIN)))
    proc = launch(run, images, "train.save_every=2", "train.max_skipped_steps=1", script=driver)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain: error:")]
    # One per rank, the same sentence (the launcher may stop a rank before it prints its own).
    assert 1 <= len(errors) <= 2, proc.stderr[-3000:]
    assert all(e.startswith("pretrain: error: step 4: the loss or a gradient was not finite on 2 steps")
               and e.endswith(f"the last good checkpoint is {run / 'checkpoints' / 'step00000002'}.")
               for e in errors), errors
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(1, 0), (2, 0), (3, 1), (4, 2)]


def test_sigterm_on_one_rank_stops_both_at_its_step_and_resumes_bit_exact(images, zero3, tmp_path):
    """ZeRO-3: the ranks agree on the stop (one all-reduce per step), write one complete checkpoint of
    that step and exit 3; resumed, the run logs exactly the uninterrupted run's metrics.jsonl."""
    # A fresh step each run, 6..11: the steps before it are a second run of the fixture's config.
    step = random.Random().randrange(6, 12)
    run, driver = tmp_path / "run", tmp_path / "sigterm_on_rank_1.py"
    driver.write_text(SIGTERM_ON_RANK_1.format(step=step, pretrain=str(PRETRAIN)))
    zero3_args = ("ds.zero_stage=3", "train.activation_checkpointing=true")
    stopped = launch(run, images, *zero3_args, script=driver)
    assert stopped.returncode == 3, f"step {step}\n{stopped.stdout[-3000:]}\n{stopped.stderr[-3000:]}"
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"step{step:08d}"
    assert len(list((checkpoints / f"step{step:08d}").glob("zero_pp_rank_*_model_states.pt"))) == 2
    assert (f"pretrain: SIGTERM on another rank: stopped after step {step} of 12 with checkpoint "
            f"{checkpoints / f'step{step:08d}'}") in stopped.stdout

    ok(launch(run, images, *zero3_args, "run.resume=true"))
    timings = ("samples_per_s", "step_ms", "data_ms")
    got, want = ([{k: v for k, v in json.loads(line).items() if k not in timings}
                  for line in (folder / "metrics.jsonl").read_text().splitlines()] for folder in (run, zero3[0]))
    assert got == want, step


def test_cpu_ranks_share_the_cores(monkeypatch):
    """Without OMP_NUM_THREADS, each of LOCAL_SIZE ranks takes its share of the cores, never more."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_SIZE", str(cores))
        assert distributed.share_cpu_cores() == 1
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", str(before))
        assert distributed.share_cpu_cores() == before   # the user's setting wins
    finally:
        torch.set_num_threads(before)
