"""Soak: a long debug run's resident memory and open files, and a killed DataLoader worker.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak.py \
        --config configs/debug_image_v2.yaml --steps 2000 --out benchmarks/results/soak

Runs `d2v_engine/pretrain.py` as a subprocess, as a user does (checkpoints every `--save-every`
steps, metrics.jsonl and TensorBoard on), and every `--interval` seconds samples the training
process and its DataLoader workers from /proc: resident memory (VmRSS), open file descriptors
(/proc/PID/fd), threads, and the step the run is at (the last record of metrics.jsonl, so at most
`--log-every` steps behind). The issue's targets (#16): after step 200 resident memory grows less
than 5% and the open descriptors do not grow. Growth is measured on the samples taken while
training (before the last metrics record: the final checkpoint and the plot `close` draws come
after it), as the median of the last `--window` steps' samples over the median of the samples of
steps [200, 200 + window); the largest single sample is reported beside it.

Then one killed-worker trial per `--kill-ranks` entry: a fresh run with 2 workers per rank, a
SIGKILL to one worker of the last rank once a checkpoint exists, and the time until the whole job
(the DeepSpeed launcher and every rank, for 2 ranks) has exited, its status and its sentence.

Writes <out>/<name>.csv (the samples), <name>.json (summary and trials) and <name>.png.
This folder is scripts only: nothing in the installed package imports it.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "d2v_engine" / "pretrain.py"
COLUMNS = ("seconds", "step", "rss_main_mib", "rss_workers_mib", "pss_main_mib", "pss_workers_mib",
           "uss_workers_mib", "workers", "fds_main", "fds_workers", "threads_main")


# ------------------------------------------------------------------------------ /proc
def children(pid: int) -> list[int]:
    """The direct child processes of `pid` ([] once it is gone)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _kib(text: str) -> dict[str, int]:
    """"Key:   123 kB" lines -> {"Key": 123}; other lines are left out."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def probe(pid: int) -> dict[str, int] | None:
    """{"rss_kib", "pss_kib", "uss_kib", "threads", "fds"} of a live process; None once it is gone.

    RSS counts every resident page the process maps, the pages a forked worker still shares with
    the training process included; PSS splits each shared page among its sharers (the processes'
    PSS sum to the memory they hold together); USS is the process's private pages only.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rollup = _kib(Path(f"/proc/{pid}/smaps_rollup").read_text())
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    fields = _kib(status)
    if "VmRSS" not in fields or "Pss" not in rollup:   # a zombie: exited, not yet reaped
        return None
    threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
    return {"rss_kib": fields["VmRSS"], "pss_kib": rollup["Pss"],
            "uss_kib": rollup["Private_Clean"] + rollup["Private_Dirty"], "threads": threads, "fds": fds}


def last_step(run_dir: Path) -> int:
    """The step of metrics.jsonl's last complete record, 0 before the first."""
    try:
        with open(run_dir / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue   # a record half written, or a cut-off first line
    return 0


def sample(trainer: int, run_dir: Path, start: float) -> dict[str, float] | None:
    """One row of COLUMNS: the training process and its workers (their own children included)."""
    main = probe(trainer)
    if main is None:
        return None
    workers = [p for p in (probe(c) for c in children(trainer)) if p is not None]
    mib = lambda kib: round(kib / 1024, 2)   # noqa: E731
    return {"seconds": round(time.monotonic() - start, 2), "step": last_step(run_dir),
            "rss_main_mib": mib(main["rss_kib"]), "rss_workers_mib": mib(sum(w["rss_kib"] for w in workers)),
            "pss_main_mib": mib(main["pss_kib"]), "pss_workers_mib": mib(sum(w["pss_kib"] for w in workers)),
            "uss_workers_mib": mib(sum(w["uss_kib"] for w in workers)), "workers": len(workers), "fds_main": main["fds"], "fds_workers": sum(w["fds"] for w in workers),
            "threads_main": main["threads"]}


# ------------------------------------------------------------------------------ the soak
def pretrain_cmd(args, run_dir: Path, *extra: str, ranks: int = 1) -> list[str]:
    """The pretraining command: `python pretrain.py`, or the DeepSpeed launcher for several ranks."""
    overrides = [f"data.path={args.data}", f"run.dir={run_dir}", "train.progress=false", *args.overrides, *extra]
    script = [str(PRETRAIN), "--config", str(args.config), *overrides]
    if ranks == 1:
        return [sys.executable, *script]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(port), *script]


def soak(args, run_dir: Path) -> tuple[list[dict], int]:
    """Train `args.steps` steps, sampling every `args.interval` s; returns (rows, exit status)."""
    cmd = pretrain_cmd(args, run_dir, f"train.steps={args.steps}", f"train.log_every={args.log_every}",
                       f"train.save_every={args.save_every}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(run_dir.parent / "soak.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        start, rows = time.monotonic(), []
        while proc.poll() is None:
            row = sample(proc.pid, run_dir, start)
            if row is not None:
                rows.append(row)
                if len(rows) % 60 == 0:
                    print(f"  {row['seconds']:.0f} s, step {row['step']}: {row['rss_main_mib']:.1f} MiB, "
                          f"{row['fds_main']} fds", flush=True)
            time.sleep(args.interval)
    return rows, proc.returncode


def summarize(rows: list[dict], steps: int, after: int, window: int, limit_pct: float) -> dict:
    """Growth of resident memory and open descriptors after step `after`, while training."""
    training = [r for r in rows if after <= r["step"] < steps]
    if not training:
        raise SystemExit(f"no sample between step {after} and {steps}: run more steps")
    first = [r for r in training if r["step"] < after + window]
    last = [r for r in training if r["step"] >= training[-1]["step"] - window]
    out = {"steps": steps, "after_step": after, "window_steps": window, "samples": len(training),
           "last_sampled_step": training[-1]["step"]}
    for name, value in (("rss_main", lambda r: r["rss_main_mib"]), ("rss_workers", lambda r: r["rss_workers_mib"]),
                        ("uss_workers", lambda r: r["uss_workers_mib"]),
                        ("pss_total", lambda r: r["pss_main_mib"] + r["pss_workers_mib"])):
        begin, end = statistics.median(map(value, first)), statistics.median(map(value, last))
        peak = max(map(value, training))
        out[f"{name}_at_{after}_mib"] = round(begin, 2)
        out[f"{name}_end_mib"] = round(end, 2)
        out[f"{name}_growth_pct"] = round(100 * (end / begin - 1), 2)
        out[f"{name}_max_mib"] = round(peak, 2)
        out[f"{name}_max_growth_pct"] = round(100 * (peak / begin - 1), 2)
    for key in ("fds_main", "fds_workers", "threads_main", "workers"):
        values = [r[key] for r in training]
        out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
        # Window medians, as for memory: single samples peak now and then, while a save's files or
        # the shared memory of batches in flight from the workers are open.
        out[f"{key}_at_{after}"] = statistics.median_low(r[key] for r in first)
        out[f"{key}_end"] = statistics.median_low(r[key] for r in last)
    out["rss_target_pct"] = limit_pct
    # The target: the training process's RSS, and the memory of the whole run (PSS of the training
    # process and its workers: a worker forked later maps more of the trainer's pages, shared).
    out["rss_met"] = out["rss_main_growth_pct"] < limit_pct and out["pss_total_growth_pct"] < limit_pct
    out["fds_met"] = out["fds_main_end"] <= out[f"fds_main_at_{after}"] and \
        out["fds_workers_end"] <= out[f"fds_workers_at_{after}"]
    return out


# ------------------------------------------------------------------------------ the killed worker
def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def ranks_of(launcher: int, ranks: int) -> list[int]:
    """The training processes of a job: `launcher` itself for one rank, else the launcher's ranks."""
    if ranks == 1:
        return [launcher]
    # deepspeed.launcher.runner -> deepspeed.launcher.launch -> one process per rank
    return [p for c in children(launcher) for p in children(c)]


def kill_trial(args, run_dir: Path, ranks: int, start_timeout: float = 900, timeout: float = 120) -> dict:
    """SIGKILL one DataLoader worker of the last rank once a checkpoint exists; time the job's end.

    The job runs in its own session, so that whatever is left of it (a launcher whose runner was
    stopped, a rank) can be stopped as a group.
    """
    cmd = pretrain_cmd(args, run_dir, "train.steps=100000", "train.log_every=5", "train.save_every=10",
                       "data.num_workers=2", ranks=ranks)
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + start_timeout   # a shared machine starts the job slowly
    while not (latest.is_file() and len(ranks_of(proc.pid, ranks)) == ranks and
               len(children(ranks_of(proc.pid, ranks)[-1])) == 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_group(proc)
            return {"ranks": ranks, "error": "the run ended or stalled before a checkpoint",
                    "output": proc.communicate()[0][-2000:]}
        time.sleep(0.2)
    job = [proc.pid, *descendants(proc.pid)]
    worker = children(ranks_of(proc.pid, ranks)[-1])[0]
    os.kill(worker, signal.SIGKILL)
    start = time.monotonic()
    try:   # the output ends when the last process of the job holding it has exited
        output, hung = proc.communicate(timeout=timeout)[0], False
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        output, hung = proc.communicate()[0], True
    took = time.monotonic() - start
    (run_dir.parent / "kill.log").write_text(output)
    left = [p for p in job if probe(p) is not None]
    _stop_group(proc)
    sentences = [line for line in output.splitlines() if line.startswith("pretrain: error:")]
    return {"ranks": ranks, "killed_worker": worker, "hung": hung, "exit_status": proc.returncode,
            "seconds_to_exit": round(took, 2), "processes_left": left,
            "sentence": sentences[-1] if sentences else None,
            "tracebacks": output.count("Traceback"), "killed_at_checkpoint": latest.read_text().strip()}


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process left in the job's session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------ outputs
def plot(rows: list[dict], summary: dict, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (mem, fds) = plt.subplots(1, 2, figsize=(11, 3.6))
    mem.plot(steps, [r["rss_main_mib"] for r in rows], label="training process")
    mem.plot(steps, [r["rss_workers_mib"] for r in rows], label="DataLoader workers")
    mem.plot(steps, [r["uss_workers_mib"] for r in rows], label="workers, private (USS)")
    mem.axvline(summary["after_step"], color="grey", lw=0.8, ls="--")
    mem.set(title=f"resident memory (+{summary['rss_main_growth_pct']}% after step "
                  f"{summary['after_step']})", xlabel="step", ylabel="MiB", ylim=(0, None))
    mem.legend()
    fds.plot(steps, [r["fds_main"] for r in rows], label="training process")
    fds.plot(steps, [r["fds_workers"] for r in rows], label="DataLoader workers")
    fds.set(title="open file descriptors", xlabel="step", ylim=(0, None))
    fds.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "debug_image_v2.yaml")
    parser.add_argument("--data", default=str(ROOT / "data" / "fashion-mnist" / "train"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--after", type=int, default=200, help="growth is measured from this step")
    parser.add_argument("--window", type=int, default=50, help="steps whose samples give a median")
    parser.add_argument("--limit-pct", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--kill-ranks", default="1,2", help="killed-worker trials ('' for none)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak")
    parser.add_argument("--name", help="file stem of the results (default: the config's)")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value for every run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = args.name or args.config.stem
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        print(f"soak: {args.steps} steps of {args.config.name}, a sample every {args.interval} s", flush=True)
        (Path(tmp) / "soak").mkdir()
        rows, status = soak(args, Path(tmp) / "soak" / "run")
        if status != 0:
            print((Path(tmp) / "soak" / "soak.log").read_text()[-3000:])
            raise SystemExit(f"the soak run failed with exit status {status}")
        summary = summarize(rows, args.steps, args.after, args.window, args.limit_pct)
        trials = []
        for ranks in (int(r) for r in args.kill_ranks.split(",") if r):
            (Path(tmp) / f"kill{ranks}").mkdir()
            trials.append(kill_trial(args, Path(tmp) / f"kill{ranks}" / "run", ranks))
            print(f"killed worker, {ranks} rank(s): {json.dumps(trials[-1])}", flush=True)
    with open(args.out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    record = {"config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config),
              "overrides": args.overrides, "interval_s": args.interval, "save_every": args.save_every,
              "log_every": args.log_every, "load_avg_1min": os.getloadavg()[0], **summary,
              "killed_worker_trials": trials}
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(rows, summary, f"soak: {args.steps} steps of {name}", args.out / f"{name}.png")
    for key in ("rss_main", "rss_workers", "uss_workers", "pss_total"):
        print(f"{key}: {summary[f'{key}_at_{args.after}_mib']} MiB at step {args.after} -> "
              f"{summary[f'{key}_end_mib']} MiB ({summary[f'{key}_growth_pct']:+}%, largest sample "
              f"{summary[f'{key}_max_growth_pct']:+}%)")
    print(f"fds (training process): {summary['fds_main_min']}-{summary['fds_main_max']} after step "
          f"{args.after}; {'met' if summary['rss_met'] and summary['fds_met'] else 'NOT MET'}")
    return 0 if summary["rss_met"] and summary["fds_met"] and all(
        not t.get("hung", True) and t.get("sentence") for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
