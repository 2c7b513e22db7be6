"""SIGTERM at random moments, from outside, then resume: does the run continue bit for bit?

    python benchmarks/preemption.py --data data/fashion-mnist/train --ranks 1,2 --trials 10

Per number of ranks: one uninterrupted run (the reference) and a second one (two runs of one config
must log the same metrics), then `--trials` runs that get a real SIGTERM at a random moment: half of
them a random time after the first metrics line (up to 7 of the step times it logged: the 10 steps
left take longer), the other half as soon as one of the periodic checkpoints starts to be written (its folder appears).
The signal goes to the run's whole process group, as SLURM signals every process of a job and a
terminal's Ctrl-C its foreground group: with two ranks the DeepSpeed runner dies of it, the launcher
forwards it to the ranks (which got it themselves as well: the copies), and the DataLoader workers
get it too. Each stopped run is then resumed (`run.resume=true`) to the end, and its metrics.jsonl,
every line in order, timings left out, must equal the reference's.

Rows are appended to `benchmarks/results/preemption.csv`: the moment, where the trainer says the
signal found it (its stop line), the step it stopped after, `latest`, the exit status (one rank;
with two, the ranks' statuses are not visible behind the runner that the signal killed), the seconds
from the signal to the last process's exit, whether rank 0 took a copy of the signal for a second one
(and exited at once), and whether the resumed run was bit-exact.
This folder is scripts only: nothing in the installed package imports it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, append_csv, git_hash  # noqa: E402

PRETRAIN = ROOT / "d2v_engine" / "pretrain.py"
STEPS, SAVE_EVERY = 12, 3
RECIPE = (f"train.steps={STEPS}", "train.log_every=2", f"train.save_every={SAVE_EVERY}",
          "train.keep_checkpoints=5", "train.warmup_steps=2", "train.progress=false",
          "data.rank_split=samples", "data.num_workers=1")
ZERO = {1: "ds.zero_stage=1", 2: "ds.zero_stage=3"}   # two ranks: the partitioned student and teacher
TIMINGS = ("samples_per_s", "step_ms", "data_ms")
STOP_LINE = re.compile(r"pretrain: (SIG\w+) (during (.+?)|on another rank): stopped after step (\d+) of")
COLUMNS = ["timestamp", "git", "ranks", "trial", "moment", "target", "received_in", "stopped_after",
           "latest", "exit", "exit_s", "exited_at_once", "bit_exact", "load_avg"]


def command(run_dir: Path, data: str, ranks: int, *extra: str) -> list[str]:
    args = ["--config", str(ROOT / "configs" / "debug_image.yaml"), f"data.path={data}", f"run.dir={run_dir}",
            *RECIPE, ZERO[ranks], *extra]
    if ranks == 1:
        return [sys.executable, str(PRETRAIN), *args]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(port), str(PRETRAIN), *args]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def finish(run_dir: Path, data: str, ranks: int, *extra: str) -> None:
    """Run to the end; stop the benchmark if that fails."""
    proc = subprocess.run(command(run_dir, data, ranks, *extra), cwd=ROOT, env=environment(),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{run_dir}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def logged(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def wait_for(ready, timeout: float = 300.0) -> None:
    """Poll `ready()` every 2 ms (a save of the debug model takes tens of milliseconds)."""
    end = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > end:
            raise SystemExit("timed out waiting for the moment to signal")
        time.sleep(0.002)


def lines_in(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except OSError:
        return 0


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def trial(run_dir: Path, data: str, ranks: int, moment: str, rng: random.Random) -> dict:
    """Start a run in its own session, SIGTERM the session's process group at the chosen moment, wait
    until every process is gone, resume to the end. Returns the row (without the reference check)."""
    log = open(run_dir.with_suffix(".log"), "w")
    proc = subprocess.Popen(command(run_dir, data, ranks), cwd=ROOT, env=environment(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    if moment == "step":
        # a random time into the 10 steps after step 2's metrics line, by that line's step time
        # (the stop line says which step, or save, the signal found)
        wait_for(lambda: lines_in(run_dir / "metrics.jsonl") >= 1)
        step_s = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["step_ms"] / 1000
        delay = rng.uniform(0, 7 * step_s)   # steps 1-2 are the slowest: this ends before step 12
        target = f"{delay:.2f} s after step 2"
        time.sleep(delay)
    else:
        step = rng.choice(range(SAVE_EVERY, STEPS, SAVE_EVERY))
        target = f"save of step {step}"
        wait_for(lambda: (run_dir / "checkpoints" / f"step{step:08d}").is_dir())
    os.killpg(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    status = proc.wait(timeout=300)
    wait_for(lambda: not group_alive(proc.pid), timeout=120)
    exit_s = time.monotonic() - sent
    log.close()
    text = run_dir.with_suffix(".log").read_text()
    found = STOP_LINE.search(text)
    latest = (run_dir / "checkpoints" / "latest").read_text() if (run_dir / "checkpoints" / "latest").is_file() else ""
    finish(run_dir, data, ranks, "run.resume=true")
    return {"ranks": ranks, "moment": moment, "target": target,
            "received_in": (found.group(3) or "another rank") if found else "no stop line",
            "stopped_after": int(found.group(4)) if found else "", "latest": latest,
            "exit": status if ranks == 1 else f"runner {status}", "exit_s": round(exit_s, 2),
            # the launcher's copy of the signal must not count as a second one
            "exited_at_once": "pretrain: second signal" in text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data" / "fashion-mnist" / "train"))
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=None, help="of the moments (default: fresh)")
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows, summary = [], []
    with tempfile.TemporaryDirectory(prefix="preemption_") as tmp:
        for ranks in map(int, args.ranks.split(",")):
            reference, again = Path(tmp) / f"ref{ranks}", Path(tmp) / f"again{ranks}"
            finish(reference, args.data, ranks)
            finish(again, args.data, ranks)
            same = logged(again) == logged(reference)
            exact = 0
            for i in range(args.trials):
                moment = ("step", "save")[i % 2]
                run_dir = Path(tmp) / f"r{ranks}_t{i}"
                row = trial(run_dir, args.data, ranks, moment, rng)
                row["bit_exact"] = logged(run_dir) == logged(reference)
                exact += row["bit_exact"]
                row.update(trial=i, timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           git=git_hash(), load_avg=round(os.getloadavg()[0], 2))
                rows.append(row)
                print(" | ".join(f"{k} {row[k]}" for k in ("ranks", "trial", "target", "received_in",
                                                            "stopped_after", "latest", "exit", "exit_s",
                                                            "exited_at_once", "bit_exact")), flush=True)
            summary.append(f"{ranks} rank(s): two uninterrupted runs identical: {same}; "
                           f"SIGTERM at {args.trials} random moments: {exact} of {args.trials} resumed bit-exact")
    append_csv(Path(args.results_dir) / "preemption.csv", rows, COLUMNS)
    print("\n".join(summary))
    print(f"rows appended to {out}")


if __name__ == "__main__":
    main()
