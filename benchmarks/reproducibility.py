"""What changes a run's losses, bit for bit: two runs of one config, and one setting changed at a time.

    python benchmarks/reproducibility.py --data data/fashion-mnist/train

Every run is the debug image model (`configs/debug_image.yaml`) for 12 steps with a metrics line per
step. The baseline: one rank, `OMP_NUM_THREADS=1`, one DataLoader worker, `kernels.backend=auto` (the
C++ kernels on a CPU), fp32. Each variant changes one thing and is compared with the run named in
its row: equal means every logged value but the timings is the same float (`metrics.jsonl`);
otherwise the row gives the largest relative loss difference and the first step that differs.
The C++ kernels take torch's thread count (`at::get_num_threads`, `csrc/ops.h`), so their thread
count is torch's; the `reference` rows separate torch's own operations from the kernels.

Rows are appended to `benchmarks/results/reproducibility.csv`.
This folder is scripts only: nothing in the installed package imports it.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, append_csv, git_hash  # noqa: E402

PRETRAIN = ROOT / "d2v_engine" / "pretrain.py"
RECIPE = ("train.steps=12", "train.log_every=1", "train.warmup_steps=2", "train.progress=false",
          "data.rank_split=samples", "train.save_every=0")
TIMINGS = ("samples_per_s", "step_ms", "data_ms")
COLUMNS = ["timestamp", "git", "variant", "compared_with", "identical", "max_rel_loss_diff",
           "first_diff_step", "load_avg"]

# name: (ranks, OMP_NUM_THREADS, overrides)
RUNS = {
    "baseline": (1, 1, ()),
    "baseline again": (1, 1, ()),
    "data.num_workers=0": (1, 1, ("data.num_workers=0",)),
    "data.num_workers=2": (1, 1, ("data.num_workers=2",)),
    "OMP_NUM_THREADS=2": (1, 2, ()),
    "reference kernels": (1, 1, ("kernels.backend=reference",)),
    "reference kernels, OMP_NUM_THREADS=2": (1, 2, ("kernels.backend=reference",)),
    "bf16": (1, 1, ("ds.precision=bf16",)),
    "bf16 again": (1, 1, ("ds.precision=bf16",)),
    "dali, 1 thread": (1, 1, ("data.reader=dali", "data.num_workers=1")),
    "dali, 1 thread, again": (1, 1, ("data.reader=dali", "data.num_workers=1")),
    "dali, 2 threads": (1, 1, ("data.reader=dali", "data.num_workers=2")),
    "2 ranks ZeRO-3": (2, 1, ("ds.zero_stage=3",)),
    "2 ranks ZeRO-3 again": (2, 1, ("ds.zero_stage=3",)),
    "1 rank ZeRO-3": (1, 1, ("ds.zero_stage=3",)),
}
COMPARISONS = [   # (variant, compared with)
    ("baseline again", "baseline"),
    ("data.num_workers=0", "baseline"),
    ("data.num_workers=2", "baseline"),
    ("OMP_NUM_THREADS=2", "baseline"),
    ("reference kernels", "baseline"),
    ("reference kernels, OMP_NUM_THREADS=2", "reference kernels"),
    ("bf16 again", "bf16"),
    ("bf16", "baseline"),
    ("dali, 1 thread, again", "dali, 1 thread"),
    ("dali, 2 threads", "dali, 1 thread"),
    ("dali, 1 thread", "baseline"),
    ("2 ranks ZeRO-3 again", "2 ranks ZeRO-3"),
    ("2 ranks ZeRO-3", "1 rank ZeRO-3"),
]


def train(run_dir: Path, data: str, ranks: int, threads: int, overrides: tuple[str, ...]) -> list[dict]:
    """One run to the end; its metrics.jsonl without the timings."""
    args = ["--config", str(ROOT / "configs" / "debug_image.yaml"), f"data.path={data}", f"run.dir={run_dir}",
            *RECIPE, *overrides]
    if ranks == 1:
        cmd = [sys.executable, str(PRETRAIN), *args]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(port), str(PRETRAIN), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{run_dir}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def compare(got: list[dict], want: list[dict]) -> tuple[bool, float, int | str]:
    """(every value equal, largest relative loss difference, first step whose record differs)."""
    diffs = [abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(got, want)]
    first = next((a["step"] for a, b in zip(got, want) if a != b), "")
    return got == want, max(diffs), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data" / "fashion-mnist" / "train"))
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args()
    logged = {}
    with tempfile.TemporaryDirectory(prefix="reproducibility_") as tmp:
        for i, (name, (ranks, threads, overrides)) in enumerate(RUNS.items()):
            logged[name] = train(Path(tmp) / f"run{i}", args.data, ranks, threads, overrides)
            print(f"ran {name}", flush=True)
    rows = []
    for variant, base in COMPARISONS:
        identical, worst, first = compare(logged[variant], logged[base])
        rows.append({"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git": git_hash(),
                     "variant": variant, "compared_with": base, "identical": identical,
                     "max_rel_loss_diff": f"{worst:.2e}", "first_diff_step": first,
                     "load_avg": round(os.getloadavg()[0], 2)})
        print(f"{variant:<40} vs {base:<20} identical {identical!s:<5} max rel loss diff {worst:.2e}"
              + (f" (first at step {first})" if first != "" else ""))
    out = Path(args.results_dir) / "reproducibility.csv"
    append_csv(out, rows, COLUMNS)
    print(f"rows appended to {out}")


if __name__ == "__main__":
    main()
