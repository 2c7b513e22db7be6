"""Preemption and reproducibility on one rank, in this process, on the debug image model
(`d2v_engine/preemption.py`, the trainer's loop; two ranks: tests/test_distributed.py):

- two runs of one config log bit-identical metrics (every field but the timings);
- SIGTERM at a random step: the run finishes that step, saves it, prints one line and returns exit
  status 3; resumed, it logs the same metrics, bit for bit, as the uninterrupted run, with a
  metrics line every 3 steps (the partial interval is in the checkpoint);
- SIGINT during a save: the save completes and the run stops right after it, with no second save;
- `train.save_every_minutes` saves by the clock;
- a second signal exits at once with 128 + its number, copies within `COPIES_S` do not.
The 10-trial figure with real `kill -TERM` from outside, one and two ranks: benchmarks/preemption.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from d2v_engine import distributed, preemption
from d2v_engine.pretrain import main as pretrain
from d2v_engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "debug_image.yaml"
STEPS = 9
RECIPE = (f"train.steps={STEPS}", "train.batch_size=8", "train.warmup_steps=2", "train.log_every=3",
          "train.save_every=6", "train.keep_checkpoints=3", "train.progress=false", "data.num_workers=0")
TIMINGS = ("samples_per_s", "step_ms", "data_ms")


@contextlib.contextmanager
def single_rank():
    """A one-rank launcher environment and one thread, undone afterwards (as tests/test_guards.py)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (("MASTER_PORT", "29751"), ("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"),
                           ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            mp.setenv(key, value)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_rank():
    with single_rank():
        yield


def run(data_root: Path, run_dir: Path, *extra: str) -> int:
    """`d2v_engine/pretrain.py` in this process; returns its exit status."""
    return pretrain(["--config", str(CONFIG), f"data.path={data_root / 'fashion-mnist' / 'train'}",
                     f"run.dir={run_dir}", *RECIPE, *extra])


def logged(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its timings, every line in order (a repeated step would show)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text()


def tags(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step*"))


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory) -> list[dict]:
    """The uninterrupted run's metrics."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    with single_rank():   # the autouse fixture is the tests' own
        assert run(data_root, run_dir) == 0
    return logged(run_dir)


def test_two_runs_log_identical_metrics(reference, data_root, tmp_path):
    """Same config, same thread count: every logged value is the same float, bit for bit."""
    assert run(data_root, tmp_path / "run") == 0
    again = logged(tmp_path / "run")
    assert [r["step"] for r in again] == [3, 6, 9]
    assert again == reference


def test_sigterm_at_a_random_step_saves_that_step_and_resumes_bit_exact(reference, data_root, tmp_path,
                                                                        monkeypatch, capsys):
    stop_at = random.Random().randrange(1, STEPS)   # a fresh step each run: 1..8
    train_step = Trainer.train_step

    def signalled_step(self):
        out = train_step(self)
        if self.step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)   # as a cluster would, in the middle of the loop
        return out

    monkeypatch.setattr(Trainer, "train_step", signalled_step)
    handler = signal.getsignal(signal.SIGTERM)
    run_dir = tmp_path / "run"
    assert run(data_root, run_dir) == preemption.PREEMPTED, stop_at
    assert latest(run_dir) == f"step{stop_at:08d}"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pretrain:")]
    assert lines == [f"pretrain: SIGTERM during step {stop_at}: stopped after step {stop_at} of {STEPS} "
                     f"with checkpoint {run_dir / 'checkpoints' / f'step{stop_at:08d}'}; continue with "
                     f"run.resume=true (exit status 3)"]
    assert signal.getsignal(signal.SIGTERM) is handler   # the loop's handlers are gone with it

    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert run(data_root, run_dir, "run.resume=true") == 0
    assert logged(run_dir) == reference, stop_at


def test_sigint_during_a_save_finishes_it_then_stops(reference, data_root, tmp_path, monkeypatch, capsys):
    """The signal arrives between the first and second of DeepSpeed's files of the step-6 save."""
    real_save, files = distributed.save_whole, []

    def save(obj, path, *args, **kwargs):
        if "step00000006" in str(path):
            files.append(path)
            if len(files) == 1:
                os.kill(os.getpid(), signal.SIGINT)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(distributed, "save_whole", save)
    run_dir = tmp_path / "run"
    assert run(data_root, run_dir) == preemption.PREEMPTED
    assert len(files) == 2                        # the save went on to its last file
    assert latest(run_dir) == "step00000006" and tags(run_dir) == ["step00000006"]
    assert "pretrain: SIGINT during the save of step 6: stopped after step 6 of 9" in capsys.readouterr().out
    assert run(data_root, run_dir, "run.resume=true") == 0
    assert logged(run_dir) == reference


def test_save_every_minutes_saves_by_the_clock(data_root, tmp_path, monkeypatch):
    """A clock that moves 40 s per step with saves every minute: steps 2 and 4, then the end."""
    now = [1000.0]
    train_step = Trainer.train_step

    def slow_step(self):
        now[0] += 40.0
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", slow_step)
    monkeypatch.setattr("d2v_engine.trainer.time.monotonic", lambda: now[0])
    run_dir = tmp_path / "run"
    assert run(data_root, run_dir, "train.steps=5", "train.save_every=0", "train.save_every_minutes=1") == 0
    assert tags(run_dir) == ["step00000002", "step00000004", "step00000005"]


class Exited(Exception):
    """Raised by the stand-in for os._exit."""


def test_a_second_signal_exits_at_once_and_copies_do_not(monkeypatch, capfd):
    def exit_now(status):
        raise Exited(status)

    monkeypatch.setattr(preemption.os, "_exit", exit_now)
    monkeypatch.setattr(preemption, "COPIES_S", 0.2)
    handler = signal.getsignal(signal.SIGINT)
    with preemption.StopSignals() as signals:
        signals.during("step 4")
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)     # the launcher's copy of it, at once: ignored
        assert signals.requested and signals.name == "SIGTERM" and signals.received_in == "step 4"
        time.sleep(0.3)
        with pytest.raises(Exited) as exited:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)                        # the handler runs at the next bytecode
    assert exited.value.args == (130,)
    assert "pretrain: second signal (SIGINT): exiting at once with status 130" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is handler
