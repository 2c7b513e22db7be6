"""`cpu_threads`: the thread count a CPU rank takes beside other processes, and the OpenMP wait."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d2v_engine import cpu_threads
from d2v_engine.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BUSY = "while 1: pass"


@pytest.fixture
def auto(monkeypatch):
    """The engine's own choice, as a user gets it (the suite runs with D2V_THREADS=off)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("D2V_THREADS", "auto")


def test_count_leaves_the_cores_others_keep_busy(auto, monkeypatch):
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 4)
    assert cpu_threads.choose_threads(1, 4, busy=0.0).threads == 4
    assert cpu_threads.choose_threads(1, 4, busy=0.1).threads == 4     # a blip takes no core
    assert cpu_threads.choose_threads(1, 4, busy=0.9).threads == 3
    assert cpu_threads.choose_threads(1, 4, busy=2.2).threads == 2
    assert cpu_threads.choose_threads(1, 4, busy=9.0).threads == 1     # never none
    assert cpu_threads.choose_threads(2, 4, busy=3.0).threads == 2     # local ranks: their share
    choice = cpu_threads.choose_threads(1, 4, busy=1.0)
    assert choice.line().startswith("cpu: 3 thread(s), 4 core(s), other processes kept 1.0 busy; OpenMP wait:")


def test_the_users_settings_win(auto, monkeypatch):
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 4)
    monkeypatch.setenv("D2V_THREADS", "3")
    assert cpu_threads.choose_threads(1, 4, busy=3.0).threads == 3
    monkeypatch.setenv("D2V_THREADS", "off")
    assert cpu_threads.choose_threads(1, 4, busy=3.0).threads == 4
    assert cpu_threads.choose_threads(2, 4, busy=3.0).threads == 2     # off still shares among ranks
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads.choose_threads(1, 4, busy=0.0).threads == 4     # torch already took it: kept
    for bad in ("many", "0"):
        monkeypatch.setenv("D2V_THREADS", bad)
        with pytest.raises(UserError, match=f"D2V_THREADS='{bad}' is not a setting"):
            cpu_threads.mode()


def _stranger() -> int:
    """A busy loop that is not our child (its parent shell exits): a process of someone else's."""
    out = subprocess.run(["sh", "-c", f"{sys.executable} -c '{BUSY}' >/dev/null 2>&1 & echo $!"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_busy_cores_sees_a_stranger_and_not_our_children():
    pid = _stranger()
    try:
        time.sleep(0.2)
        assert cpu_threads.busy_cores(0.6) > 0.6
    finally:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    child = subprocess.Popen([sys.executable, "-c", BUSY])     # ours, like a DataLoader worker
    try:
        time.sleep(0.2)
        assert cpu_threads.busy_cores(0.6) < 0.5
    finally:
        child.kill()
        child.wait()


def test_the_line_names_the_wait_in_force(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert cpu_threads.wait() == "libgomp's default (spin, then sleep)"
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    assert cpu_threads.wait() == "GOMP_SPINCOUNT=7 (set by you)"


def test_a_run_says_its_choice_first(auto, data_root, tmp_path):
    """Beside a busy stranger on 2 cores, a run takes one thread and says so in its first line."""
    if cpu_threads.usable_cores() != 2:
        pytest.skip("the figure is for a 2-core machine")
    pid = _stranger()
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "D2V_THREADS",
                                                               "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        cmd = [sys.executable, str(ROOT / "d2v_engine" / "pretrain.py"), "--config",
               str(ROOT / "configs" / "debug_image.yaml"), "train.progress=false", "train.steps=2",
               f"data.path={data_root / 'fashion-mnist' / 'train'}", f"run.dir={tmp_path / 'run'}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    finally:
        os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith("cpu: 1 thread(s), 2 core(s), other processes kept"), first
    assert first.endswith("OpenMP wait: libgomp's default (spin, then sleep)"), first
