"""Training beside other work: samples/s idle and with competing CPU-bound processes, per setting.

    .venv/bin/python benchmarks/shared_machine.py --config configs/default.yaml \
        --competitors 0,1 --settings today,auto --out benchmarks/results/shared_machine

Each trial runs `d2v profile` (warm-up steps, then measured steps of the real trainer and reader)
as a subprocess, optionally beside `--competitors` single-threaded busy loops
(`python -c 'while 1: pass'`, the issue's competitor), and reads samples/s from its profile.json.
A setting is a set of environment variables for the trainer:

    today    D2V_THREADS=off: torch's defaults (a thread per core, libgomp's spinning wait)
    auto     the engine's choice (`d2v_engine.cpu_threads`): the cores others leave free
    t1, t2   D2V_THREADS=1 / 2
    passive  OMP_WAIT_POLICY=PASSIVE with torch's thread count
    spin1k, spin10k   two threads, GOMP_SPINCOUNT=1000 / 10000 (libgomp's default: 300000)

Trials alternate settings within each competitor count, `--repeats` times, so that drift of the
machine falls on every setting alike. Writes <out>/<name>.csv (one row per trial) and <name>.json
(medians, and each setting's contended samples/s over its idle samples/s). The machine must be
otherwise idle: the script prints the 1-minute load average before it starts.
This folder is scripts only: nothing in the installed package imports it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import append_csv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "today": {"D2V_THREADS": "off"},
    "auto": {},
    "t1": {"D2V_THREADS": "1"},
    "t2": {"D2V_THREADS": "2"},
    "spin1k": {"D2V_THREADS": "2", "GOMP_SPINCOUNT": "1000"},
    "spin10k": {"D2V_THREADS": "2", "GOMP_SPINCOUNT": "10000"},
    "passive": {"D2V_THREADS": "off", "OMP_WAIT_POLICY": "PASSIVE"},
}
BUSY = "while 1: pass"


def trial(config: str, setting: str, competitors: int, args, out: Path) -> dict:
    """One `d2v profile` run beside `competitors` busy loops; its samples/s and first log line."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                           "GOMP_SPINCOUNT", "D2V_THREADS")}
    env.update(SETTINGS[setting])
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(competitors)]
    try:
        time.sleep(0.5 if competitors else 0.0)
        cmd = [sys.executable, "-m", "d2v_engine.cli", "profile", "--config", config,
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--trace-steps", "0",
               "--out", str(out), *args.overrides]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    finally:
        for p in busy:
            p.kill()
            p.wait()
    if done.returncode:
        raise SystemExit(f"{setting} x{competitors}: d2v profile failed:\n{done.stderr[-3000:]}")
    prof = json.loads((out / "profile.json").read_text())
    threads = next((line for line in (done.stdout + done.stderr).splitlines() if line.startswith("cpu:")), "")
    return {"setting": setting, "competitors": competitors, "samples_per_s": prof["samples_per_s"],
            "step_ms": prof["step_ms"], "wall_s": round(wall, 1), "threads_line": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--settings", default="today,auto")
    ap.add_argument("--competitors", default="0,1")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/shared_machine")
    ap.add_argument("--name", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    settings = args.settings.split(",")
    counts = [int(c) for c in args.competitors.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or Path(args.config).stem
    print(f"load average (1 min) before: {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            for r in range(args.repeats):
                for s in settings:
                    row = trial(args.config, s, n, args, Path(tmp) / f"{s}{n}{r}")
                    rows.append(row)
                    print(f"{s:8s} competitors {n}: {row['samples_per_s']:7.1f} samples/s "
                          f"({row['step_ms']:.0f} ms/step)  {row['threads_line']}", flush=True)
    csv_path = out / f"{name}.csv"
    csv_path.unlink(missing_ok=True)
    append_csv(csv_path, rows, list(rows[0]))
    summary = {"config": args.config, "overrides": args.overrides, "steps": args.steps,
               "warmup": args.warmup, "repeats": args.repeats, "medians": {}, "ratio_to_idle": {}}
    for s in settings:
        for n in counts:
            runs = [r["samples_per_s"] for r in rows if r["setting"] == s and r["competitors"] == n]
            summary["medians"][f"{s} x{n}"] = round(statistics.median(runs), 2)
        if 0 in counts:
            idle = summary["medians"][f"{s} x0"]
            for n in counts:
                if n:
                    summary["ratio_to_idle"][f"{s} x{n}"] = round(summary["medians"][f"{s} x{n}"] / idle, 3)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
