"""Probe accuracy against training step: k-NN and linear probes of every checkpoint a run kept.

The random-init encoder is the run's step 0 (same seed, same shape). The features of all
checkpoints come from one pass over the probe data, so a curve costs one `d2v eval` per
checkpoint minus the repeated random-init encoder. Writes `<out>.csv` and `<out>.png`.

    python benchmarks/probe_curve.py --run runs/default --task fashion-mnist --raw \
        --out benchmarks/results/probe_curve

Several `--run`s (e.g. the 1.0 and the 2.0 default) share one plot, against training wall time:
a checkpoint's time is the sum of the step times `metrics.jsonl` logged up to its step (training
steps only: start-up, checkpoint writes and evaluation are left out), so the curves compare
accuracy per second of training.

Keep the checkpoints to plot: `train.save_every=100 train.keep_checkpoints=10` when pretraining.
This folder is scripts only: nothing in the installed package imports it.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from d2v_engine.checkpoint import build_run_encoder, load_run_config, load_run_weights
from d2v_engine.eval import EvalOptions, data_root, probe_scores, select_tasks, task_features
from d2v_engine.metrics import read_metrics


def checkpoint_encoders(run_dir: Path, weights: str) -> dict[str, object]:
    """Step -> encoder: the random init as step 0, then every checkpoint in `run_dir/checkpoints`.

    Args:
        run_dir: a run directory; weights: `student` or `teacher`.
    Returns:
        {"0": random-init encoder, "<step>": trained encoder, ...} in step order.
    """
    cfg = load_run_config(run_dir)
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step*") if p.is_dir())
    if not tags:
        raise SystemExit(f"{run_dir} has no checkpoints")
    encoders = {}
    for tag in tags:
        found = load_run_weights(run_dir, tag)
        if not encoders:
            encoders["0"] = build_run_encoder(cfg, found, "random")
        encoders[str(found.step)] = build_run_encoder(cfg, found, weights)
    return encoders


def training_seconds(run_dir: Path, steps: list[int]) -> dict[int, float]:
    """Step -> seconds of training up to it, from the logged step times (0 -> 0).

    A record's `step_ms` is the mean over the steps since the previous record, so a step between
    two records (a checkpoint every 110 steps, a log every 25) takes its window's rate. Steps past
    the last record are absent.
    """
    records = [(r["step"], r["step_ms"] / 1000) for r in read_metrics(run_dir)]
    seconds = {}
    for step in steps:
        last, total = 0, 0.0
        for logged, rate in records:
            if step <= logged:
                seconds[step] = total + rate * (step - last)
                break
            total += rate * (logged - last)
            last = logged
    return seconds


def curve(run_dir: Path, opts: EvalOptions) -> list[dict]:
    """Probe every checkpoint of a run on one task.

    Args:
        run_dir: the run; opts: one task in `tasks`, limits, k, weights, raw.
    Returns:
        One row per step (and a `raw_input` row when opts.raw): feature set, k-NN and linear accuracy.
    """
    cfg = load_run_config(run_dir)
    (name, task), = select_tasks(cfg, opts).items()
    encoders = checkpoint_encoders(run_dir, opts.weights)
    train, train_y, test, test_y = task_features(name, task, encoders, cfg, data_root(cfg, opts), opts)
    seconds = training_seconds(run_dir, [int(key) for key in train if key.isdigit()])
    rows = []
    for key in train:
        scores = probe_scores(train[key], train_y, test[key], test_y, opts.k)
        weights = {"0": "random", "raw_input": "-"}.get(key, opts.weights)
        train_s = round(seconds.get(int(key), float("nan")), 1) if key.isdigit() else ""
        rows.append({"run": run_dir.name, "task": name, "features": key, "weights": weights,
                     "train_s": train_s, **{k: round(v, 4) for k, v in scores.items()}})
        print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy against step, with the step-0 (random-init) level and the raw input as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in rows if r["features"].isdigit()]
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for i, (key, label) in enumerate((("knn_acc", "k-NN (k=20, cosine)"), ("linear_acc", "linear probe"))):
        ax.plot([int(r["features"]) for r in steps], [r[key] for r in steps], "o-", color=f"C{i}", label=label)
        ax.axhline(steps[0][key], color=f"C{i}", ls="--", lw=1, alpha=0.6)
        for r in rows:
            if r["features"] == "raw_input":
                ax.axhline(r[key], color=f"C{i}", ls=":", lw=1, alpha=0.6)
    ax.set(xlabel="training step (0 = random init, dashed)", ylabel="accuracy", title=title)
    ax.legend(fontsize=8, loc="lower right", title="dotted: raw input" if len(steps) < len(rows) else None,
              title_fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_runs(rows: list[dict], path: Path, title: str) -> None:
    """k-NN and linear accuracy of each run against training minutes, one panel per probe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.8), sharey=False)
    for ax, (key, label) in zip(axes, (("knn_acc", "k-NN (k=20, cosine)"), ("linear_acc", "linear probe"))):
        for i, run in enumerate(runs):
            steps = [r for r in rows if r["run"] == run and r["features"].isdigit()]
            ax.plot([r["train_s"] / 60 for r in steps], [r[key] for r in steps], "o-", color=f"C{i}",
                    label=run)
            final = steps[-1][key]
            ax.axhline(final, color=f"C{i}", ls="--", lw=0.8, alpha=0.5)
        raw = [r for r in rows if r["features"] == "raw_input"]
        if raw:
            ax.axhline(raw[0][key], color="grey", ls=":", lw=1, label="raw input")
        ax.set(xlabel="training wall time (min; dashed: each run's final)", ylabel=label, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, action="append",
                        help="a run directory; repeat to compare runs against training time")
    parser.add_argument("--task", required=True, help="one `d2v eval` task of the run's modality")
    parser.add_argument("--out", required=True, type=Path, help="output path without extension")
    parser.add_argument("--weights", choices=("student", "teacher"), default="student")
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--limit-test", type=int, default=None)
    parser.add_argument("--raw", action="store_true", help="also probe the raw input (images)")
    args = parser.parse_args()
    opts = EvalOptions(tasks=[args.task], limit_train=args.limit_train, limit_test=args.limit_test,
                       weights=args.weights, raw=args.raw)
    rows = []
    for i, run in enumerate(args.run):
        # The raw input is the same for every run: probed once.
        rows += [r for r in curve(run, opts) if i == 0 or r["features"] != "raw_input"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if len(args.run) == 1:
        plot(rows, args.out.with_suffix(".png"), f"{args.task}: {args.weights} of {args.run[0].name} vs step")
    else:
        plot_runs(rows, args.out.with_suffix(".png"), f"{args.task}, {args.weights} features")
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
