"""What a run writes: the fixed-format metrics line, `metrics.jsonl`, TensorBoard, the run record, the plot.

Only rank 0 writes. `MetricsLogger.log` takes plain floats: the trainer calls `.item()` once per
logging interval (each one is a device sync point), never per step.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

FIELDS = ("step", "loss", "lr", "ema_decay", "target_var", "pred_var", "target_sample_var", "grad_norm",
          "samples_per_s", "step_ms", "data_ms", "bad_samples", "skipped_steps", "clones")
"""The fields of every `metrics.jsonl` record, in order."""


def format_line(m: dict[str, float], total_steps: int) -> str:
    """The one fixed-format metrics line."""
    width = len(str(total_steps))
    return (f"step {int(m['step']):>{width}}/{total_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
            f"ema {m['ema_decay']:.5f} | tvar {m['target_var']:.3f} | pvar {m['pred_var']:.3f} | "
            f"tsvar {m['target_sample_var']:.3f} | "
            f"gnorm {m['grad_norm']:.3f} | {m['samples_per_s']:.1f} samples/s | "
            f"{m['step_ms']:.0f} ms/step | data {m['data_ms']:.0f} ms"
            + (f" | {m['clones']} clones" if m.get("clones", 1) > 1 else "")
            + (f" | {m['bad_samples']} bad samples" if m.get("bad_samples") else "")
            + (f" | {m['skipped_steps']} skipped steps" if m.get("skipped_steps") else ""))


def git_record() -> str:
    """`hash` plus ` (dirty)` when the work tree has changes, or `unknown` outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + (" (dirty)" if dirty else "")


class MetricsLogger:
    """Writes metrics to stdout, `metrics.jsonl` and TensorBoard in `run_dir` (rank 0 only)."""

    def __init__(self, run_dir: Path, total_steps: int, enabled: bool = True, echo=print,
                 fields: tuple[str, ...] = FIELDS, formatter=format_line):
        """`fields` and `formatter` (record, total steps -> line) default to pretraining's."""
        self.run_dir, self.total_steps, self.enabled, self.echo = run_dir, total_steps, enabled, echo
        self.fields, self.formatter = fields, formatter
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            self.jsonl = open(run_dir / "metrics.jsonl", "a")

    def log(self, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {k: metrics[k] for k in self.fields}
        for key in ("step", "bad_samples", "skipped_steps", "clones"):
            if key in record:
                record[key] = int(record[key])
        self.echo(self.formatter(record, self.total_steps))
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self.scalars(record, "train")

    def scalars(self, record: dict[str, float], group: str) -> None:
        """TensorBoard scalars `group/<key>` at `record["step"]` (fine-tuning's test figures: `test`)."""
        if not self.enabled:
            return
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(f"{group}/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of `metrics.jsonl`; a resumed run's repeated steps keep their newest record."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_run(run_dir: Path) -> Path | None:
    """Loss, target/prediction spread and throughput against step, as `plots/training.png`."""
    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["loss"] for r in records])
    axes[0].set(title="loss", xlabel="step", yscale="log")
    axes[1].plot(steps, [r["target_var"] for r in records], label="target")
    axes[1].plot(steps, [r["pred_var"] for r in records], label="prediction")
    if all("target_sample_var" in r for r in records):   # runs logged before it existed lack it
        axes[1].plot(steps, [r["target_sample_var"] for r in records], label="target, across samples")
    axes[1].set(title="std over masked positions", xlabel="step")
    axes[1].legend()
    axes[2].plot(steps, [r["samples_per_s"] for r in records])
    axes[2].set(title="samples/s", xlabel="step")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "plots" / "training.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
