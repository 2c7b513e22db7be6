"""`d2v profile`: where the time of a training step goes.

The profiler builds the run's `Trainer` and drives its components the way `Trainer.train_step` does
(next batch, `engine(batch, teacher)`, `engine.backward`, `engine.step`, `teacher.update`), with a
`PhaseClock` that switches phase at each boundary. Boundaries inside the engine's forward come from
module hooks, so the model code stays untouched:

    Data2Vec pre-hook        -> student forward   (views: the student's front-end, e.g. the audio CNN)
    teacher module pre-hook  -> teacher forward
    teacher module post-hook -> targets           (top-K normalisation and averaging)
    student encoder pre-hook -> student forward   (1.0: encoder + head at the masked positions)
    head post-hook           -> loss
    decoder pre-hook         -> decoder           (2.0: the conv decoder over every copy)
    decoder post-hook        -> loss
    Data2Vec post-hook       -> rest              (engine overhead, host-to-device copies, the loop)

On a GPU every boundary synchronises, so each phase owns the kernels it launched. The phases tile the
step, and the step is also timed from outside; the two agree to well under 5%, which the report shows.
After the measured steps, `trace_steps` more run under `torch.profiler` for a Chrome trace (the
tracer's overhead stays out of the table).
"""
from __future__ import annotations

import dataclasses
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from d2v_engine.config import Config, load_config
from d2v_engine.errors import UserError
from d2v_engine.flops import device_peak
from d2v_engine.guards import nan_unless_finite

PHASES = ("data wait", "student forward", "teacher forward", "targets", "decoder", "loss", "backward",
          "optimizer step", "EMA update", "rest")


@dataclass
class ProfileOptions:
    warmup: int = 5
    """Steps run before measuring (data workers start, allocator and BLAS warm up)."""
    steps: int = 20
    """Measured steps."""
    trace_steps: int = 2
    """Steps recorded by torch.profiler after the measured ones; 0 = no trace."""


class PhaseClock:
    """Accumulates wall time per phase; `begin(name)` ends the running phase and starts `name`.

    Args:
        device: on CUDA every boundary synchronises, so a phase's kernels are charged to it.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.current: str | None = None
        self.started = 0.0
        self.trace = False
        self._range = None

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # a sync point on purpose: the phase's kernels finish here
        return time.perf_counter()

    def begin(self, name: str | None) -> None:
        now = self.now()
        if self.current is not None:
            self.totals[self.current] += now - self.started
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        self.current, self.started = name, now
        if self.trace and name is not None:
            # Named ranges in the Chrome trace, only while tracing (they are not free).
            self._range = torch.profiler.record_function(f"phase: {name}")
            self._range.__enter__()

    def end(self) -> None:
        self.begin(None)

    def reset(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)


def install_hooks(trainer, clock: PhaseClock) -> list:
    """Module hooks that move `clock` through the phases of the engine's forward (module docstring)."""
    model, teacher = trainer.model, trainer.teacher.module

    def to(name: str):
        return lambda *args: clock.begin(name)  # returns None: hooks leave inputs and outputs alone

    if hasattr(model, "decoder"):  # 2.0: the decoder's own row, then the loss
        last = [model.decoder.register_forward_pre_hook(to("decoder")),
                model.decoder.register_forward_hook(to("loss"))]
    else:
        last = [model.head.register_forward_hook(to("loss"))]
    return [model.register_forward_pre_hook(to("student forward")),
            teacher.register_forward_pre_hook(to("teacher forward")),
            teacher.register_forward_hook(to("targets")),
            model.encoder.register_forward_pre_hook(to("student forward")),
            *last,
            model.register_forward_hook(to("rest"))]


def to_device(trainer, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch on the trainer's device, floats in its input dtype (as the trainer moves it)."""
    return {k: (v.to(trainer.device, trainer.input_dtype, non_blocking=True) if v.is_floating_point()
                else v.to(trainer.device, non_blocking=True)) for k, v in batch.items()}


def timed_step(trainer, clock: PhaseClock) -> list[dict[str, Tensor]]:
    """One optimizer step as `Trainer.train_step` runs it, phase by phase.

    Returns:
        The step's micro-batches (CPU tensors), for the FLOP and token counts.
    """
    batches = []
    for _ in range(trainer.cfg.train.grad_accum):
        clock.begin("data wait")
        batch = next(trainer.data)
        clock.begin("rest")
        loss, _ = trainer.engine(to_device(trainer, batch), trainer.teacher)
        clock.begin("backward")
        trainer.engine.backward(nan_unless_finite(loss))
        clock.begin("optimizer step")
        trainer.engine.step()  # DeepSpeed steps the optimizer only at accumulation boundaries
        batches.append(batch)
    trainer.step += 1
    clock.begin("EMA update")
    trainer.teacher.update(trainer.model.encoder, trainer.step)
    clock.end()
    return batches


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): CUDA's max allocated, else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak RSS of the training process"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process (ever)"


def throughput_units(spec, batches: list[dict[str, Tensor]], seconds: float, sample_rate: int) -> dict:
    """tokens/s (text: non-padding tokens) or audio seconds/s (audio: non-padding samples)."""
    if spec.modality == "text":
        return {"tokens_per_s": sum(int((~b["padding_mask"]).sum()) for b in batches) / seconds}
    if spec.modality == "audio":
        valid = sum(int((~b["padding_mask"]).sum()) for b in batches)
        return {"audio_s_per_s": valid / sample_rate / seconds}
    return {}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model}, {torch.get_num_threads()} threads"


def write_trace(trainer, clock: PhaseClock, steps: int, path: Path) -> None:
    """Run `steps` more steps under torch.profiler and save a Chrome trace (chrome://tracing, Perfetto)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    clock.trace = True
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            timed_step(trainer, clock)
    clock.trace = False
    prof.export_chrome_trace(str(path))


@dataclass
class Measurement:
    """What the measured steps of one profile produced."""

    totals: dict[str, float]
    """Seconds per phase, summed over the measured steps."""
    seconds: float
    """Wall time of the measured steps, timed around the loop."""
    batches: list
    """Their micro-batches (CPU tensors), for FLOP and token counts."""
    memory: tuple[int, str]
    """Peak memory in bytes and what was measured."""


def measure(trainer, opts: ProfileOptions, out: Path) -> Measurement:
    """Warm up, time the measured steps phase by phase, then trace a few more into `out`."""
    clock = PhaseClock(trainer.device)
    hooks = install_hooks(trainer, clock)
    try:
        for _ in range(opts.warmup):
            timed_step(trainer, clock)
        clock.reset()
        reset_peak_memory(trainer.device)
        batches = []
        start = clock.now()
        for _ in range(opts.steps):
            batches += timed_step(trainer, clock)
        seconds = clock.now() - start
        result = Measurement(dict(clock.totals), seconds, batches, peak_memory(trainer.device))
        if opts.trace_steps > 0:
            write_trace(trainer, clock, opts.trace_steps, out / "trace.json")
    finally:
        for hook in hooks:
            hook.remove()
    return result


def profile_config(cfg: Config, opts: ProfileOptions, out: Path) -> dict[str, Any]:
    """Profile training steps of `cfg`, writing the run record and the trace into `out`.

    Args:
        cfg: the config to profile (its run.dir is replaced by `out`).
        opts: warm-up, measured and traced steps.
        out: output folder.
    Returns:
        The `profile.json` record: rows (phase -> ms per step), step_ms, samples_per_s, ...
    """
    from d2v_engine.trainer import Trainer

    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(out), resume=False))
    trainer = Trainer(cfg)
    try:
        m = measure(trainer, opts, out)
    finally:
        trainer.close()
    spec, world = trainer.model.encoder.spec, trainer.world_size
    peak = device_peak(trainer.device, trainer.input_dtype)
    flops = sum(trainer.model.step_flops(b) for b in m.batches) / len(m.batches)
    samples_per_s = cfg.train.batch_size * opts.steps / m.seconds
    rows = {name: 1000 * t / opts.steps for name, t in m.totals.items()}
    return {
        "rows": rows, "step_ms": 1000 * m.seconds / opts.steps, "rows_sum_ms": sum(rows.values()),
        "samples_per_s": samples_per_s, **throughput_units(spec, m.batches, m.seconds, cfg.data.sample_rate),
        "flops_per_sample": flops, "achieved_flops": flops * samples_per_s,
        "peak_flops": peak.flops * world, "peak_source": peak.source,
        "mfu": flops * samples_per_s / (peak.flops * world),
        "peak_mem_bytes": m.memory[0], "peak_mem_kind": m.memory[1],
        "device": device_name(trainer.device), "world_size": world, "model": cfg.model.name,
        "batch_size": cfg.train.batch_size, "clones": trainer.model.clones, "precision": cfg.ds.precision, "backend": cfg.kernels.backend,
        "warmup": opts.warmup, "steps": opts.steps, "is_main": trainer.rank == 0,
    }


def format_report(result: dict[str, Any], title: str) -> str:
    """One profile as a table of ms per step by phase, then the throughput line."""
    step = result["step_ms"]
    lines = [title, f"{'phase':<18}{'ms/step':>10}{'share':>8}"]
    lines += [f"{name:<18}{ms:>10.2f}{100 * ms / step:>7.1f}%" for name, ms in result["rows"].items()]
    total = result["rows_sum_ms"]
    lines.append(f"{'sum of phases':<18}{total:>10.2f}{100 * total / step:>7.1f}%")
    lines.append(f"{'measured step':<18}{step:>10.2f}")
    units = "".join(f" | {result[k]:.1f} {label}" for k, label in
                    (("tokens_per_s", "tokens/s"), ("audio_s_per_s", "audio s/s")) if k in result)
    lines.append(
        f"{result['samples_per_s']:.1f} samples/s{units} | {result['flops_per_sample'] / 1e9:.3f} GFLOP/sample "
        f"(matmuls: 3x student fwd + teacher fwd) | {result['achieved_flops'] / 1e9:.1f} GFLOP/s | "
        f"MFU {100 * result['mfu']:.1f}% of {result['peak_flops'] / 1e9:.1f} GFLOP/s "
        f"({result['peak_source']}) | "
        f"peak memory {result['peak_mem_bytes'] / 2**20:.0f} MiB ({result['peak_mem_kind']})")
    return "\n".join(lines)


def format_compare(results: dict[str, dict[str, Any]], key: str) -> str:
    """Several profiles side by side, each row's ratio to the first setting."""
    labels = list(results)
    base = results[labels[0]]
    head = f"{'phase':<18}" + "".join(f"{lab:>14}" for lab in labels)
    head += "".join(f"{lab + '/' + labels[0]:>22}" for lab in labels[1:])
    lines = [f"{key}: ms per step and ratio to {labels[0]}", head]

    def row(name: str, get) -> str:
        values = [get(results[lab]) for lab in labels]
        ratios = [v / get(base) if get(base) else float("nan") for v in values[1:]]
        return (f"{name:<18}" + "".join(f"{v:>14.2f}" for v in values)
                + "".join(f"{r:>22.3f}" for r in ratios))

    lines += [row(name, lambda r, n=name: r["rows"][n]) for name in PHASES]
    lines.append(row("measured step", lambda r: r["step_ms"]))
    lines.append(row("samples/s", lambda r: r["samples_per_s"]))
    return "\n".join(lines)


def plot_rows(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """Horizontal bars of ms per step by phase, one bar per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.5 + 0.45 * len(PHASES) * max(1, len(results) / 1.5)))
    height = 0.8 / len(results)
    for i, (label, result) in enumerate(results.items()):
        ys = [j + i * height for j in range(len(PHASES))]
        ax.barh(ys, [result["rows"][p] for p in PHASES], height,
                label=f"{label} ({result['step_ms']:.1f} ms/step)")
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(PHASES))], PHASES)
    ax.invert_yaxis()
    first = next(iter(results.values()))
    ax.set(xlabel="ms per step", title=f"{first['model']} on {first['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_compare(text: str) -> tuple[str, list[str]]:
    """`key=a,b[,c]` -> (key, [a, b, c])."""
    key, _, raw = text.partition("=")
    key, values = key.strip(), [v.strip() for v in raw.split(",") if v.strip()]
    if len(values) < 2 or len(set(values)) < len(values) or not key:
        raise UserError(f"--compare '{text}' must be KEY=A,B with two or more distinct values, e.g. "
                        f"kernels.backend=reference,auto.")
    return key, values


def run_profile(config: str | None, overrides: list[str], opts: ProfileOptions,
                compare: str | None = None, out: str | None = None, echo=print) -> dict[str, dict]:
    """`d2v profile`: profile one config (or each value of --compare), print and write the results.

    Args:
        config: YAML config path (None = defaults); overrides: `section.key=value` items.
        opts: warm-up, measured and traced steps.
        compare: `KEY=A,B[,...]`: profile each value of KEY in turn, in this process.
        out: output folder; default `<run.dir>/profile` (with --compare, one subfolder per value).
        echo: where the tables go.
    Returns:
        label -> profile record (the label is the compared value, or "profile").
    """
    if opts.warmup < 0 or opts.steps < 1 or opts.trace_steps < 0:
        raise UserError("--warmup and --trace-steps must be 0 or more and --steps at least 1.")
    cfg = load_config(config, overrides)
    root = Path(out or Path(cfg.run.dir) / "profile")
    key, values = parse_compare(compare) if compare else (None, [])
    settings = {"profile": ([], root)} if key is None else \
        {v: ([f"{key}={v}"], root / v.replace("/", "_")) for v in values}
    results = {}
    for label, (extra, folder) in settings.items():
        results[label] = profile_config(load_config(config, [*overrides, *extra]), opts, folder)
        if results[label]["is_main"]:
            (folder / "profile.json").write_text(json.dumps(results[label], indent=2) + "\n")
            plot_rows({label: results[label]}, folder / "profile.png")
            what = " ".join([config or "defaults", *overrides, *extra])
            echo(format_report(results[label], f"profile of {what} on {results[label]['device']}, "
                                               f"{opts.steps} steps after {opts.warmup} warm-up -> {folder}"))
    if key is not None and results[values[0]]["is_main"]:
        echo(format_compare(results, key))
        (root / "compare.json").write_text(json.dumps({"key": key, "results": results}, indent=2) + "\n")
        plot_rows(results, root / "compare.png")
    return results
