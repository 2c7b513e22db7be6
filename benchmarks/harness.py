"""The shared harness of the kernel microbenchmarks (DESIGN.md §9).

A benchmark script declares cases (model-sized inputs, and the bytes an ideal kernel must move)
and providers (implementations), then calls `main`. For each case the harness measures the
machine's copy bandwidth (one large tensor copy, read + write bytes) right before timing the
providers, so every figure has its ceiling from the same run and the same load. Each provider is
timed as the median of repeated runs after a warm-up (with the 20% and 80% quantiles) and reported
as time, GB/s of the case's essential bytes, the fraction of the copy bandwidth, and the speedup
over the `reference` provider. Results are printed as a table, appended to
`benchmarks/results/<op>.csv` (device, torch version, git hash, time stamp, load average) and
plotted to `benchmarks/results/<op>.png`.

This folder is scripts only: nothing in the installed package imports it.
"""

import argparse
import csv
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["timestamp", "git", "device", "threads", "torch", "op", "case", "provider",
           "median_ms", "q20_ms", "q80_ms", "reps", "bytes", "gbps", "copy_gbps",
           "fraction_of_copy", "floor_ms", "vs_reference", "load_avg", "note"]


class Skip(Exception):
    """Raised by a provider that cannot run here; the message says why (it goes into the CSV)."""


@dataclass
class Case:
    """One input size. `build(device)` makes the inputs (a dict handed to every provider);
    `bytes` is what an ideal kernel reads and writes (the GB/s and ceiling figures use it)."""

    name: str
    bytes: int
    build: Callable[[torch.device], dict]


@dataclass
class Provider:
    """One implementation. `setup(inputs)` returns the function to time (no arguments), or
    raises Skip. `devices` are the device types it runs on."""

    name: str
    setup: Callable[[dict], Callable[[], object]]
    devices: tuple[str, ...] = ("cpu", "cuda")


def op_providers(op: str, reference_fn: Callable, call: Callable[[Callable, dict], Callable[[], object]]
                 ) -> list[Provider]:
    """The providers every `d2v_engine.ops` op has: its reference, torch.compile of the reference,
    and the cpp and triton backends through the op's dispatch.

    Args:
        op: the op's name in `d2v_engine.ops` ("make_targets", "regression_loss", ...).
        reference_fn: the op's `*_ref` function from ops/reference.py.
        call: `call(fn, inputs)` returns the no-argument function to time, calling `fn` with the
            op's arguments taken from the case's inputs.
    Returns:
        providers named reference, torch_compile, cpp (CPU only) and triton (CUDA only).
    """
    from d2v_engine import ops

    def compiled(inputs):
        run = call(torch.compile(reference_fn), inputs)
        try:
            run()
        except Exception as error:  # noqa: BLE001  (any compiler failure is a skip with its reason)
            raise Skip(f"torch.compile failed: {type(error).__name__}: {str(error)[:120]}") from None
        return run

    def backend(name):
        def setup(inputs):
            if name not in ops._BACKENDS:
                raise Skip(f"the {name} backend is not available in this build")
            dispatched = getattr(ops, op)
            return call(lambda *args, **kwargs: dispatched(*args, backend=name, **kwargs), inputs)
        return setup

    return [Provider("reference", lambda inputs: call(reference_fn, inputs)),
            Provider("torch_compile", compiled),
            Provider("cpp", backend("cpp"), devices=("cpu",)),
            Provider("triton", backend("triton"), devices=("cuda",))]


@dataclass
class Timing:
    median_s: float
    q20_s: float
    q80_s: float
    reps: int
    samples: list[float] = field(default_factory=list, repr=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 2,
            min_reps: int = 5, max_reps: int = 50, budget_s: float = 2.0) -> Timing:
    """Median and quantiles of repeated timed calls of `fn`, after `warmup` untimed ones.

    Runs at least `min_reps` and at most `max_reps` times, stopping once `budget_s` is spent.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps
                                       or time.perf_counter() - start < budget_s):
        begin = time.perf_counter()
        fn()
        _sync(device)  # a CUDA launch returns before the kernel finishes
        samples.append(time.perf_counter() - begin)
    q20, median, q80 = _quantiles(samples)
    return Timing(median, q20, q80, len(samples), samples)


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    cuts = statistics.quantiles(samples, n=10, method="inclusive")  # deciles
    return cuts[1], statistics.median(samples), cuts[7]


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """GB/s of one large tensor copy (bytes read + bytes written), the machine's ceiling for
    streaming kernels."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, warmup=2, min_reps=7, budget_s=1.0)
    return 2 * nbytes / timing.median_s / 1e9


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo with the number of cores used."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model}, {threads} {'core' if threads == 1 else 'cores'}"


def git_hash() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


@dataclass
class Figure:
    """A target the benchmark checks: `provider` on the case whose name starts with `case` is at
    least `at_least` times faster than `baseline`, or (baseline "floor") takes at most
    `at_most` times the case's bandwidth floor."""

    case: str
    provider: str
    baseline: str
    at_least: float = 0.0
    at_most: float = math.inf


def check_figures(rows: list[dict], figures: list[Figure]) -> list[str]:
    """One line per figure (met / NOT met, with the measured number), printed and returned."""
    lines = []
    for fig in figures:
        timed = {r["provider"]: r for r in rows
                 if r["case"].startswith(fig.case) and "median_ms" in r}
        if fig.provider not in timed or (fig.baseline != "floor" and fig.baseline not in timed):
            lines.append(f"{fig.case}: {fig.provider} vs {fig.baseline}: not measured")
            continue
        row = timed[fig.provider]
        if fig.baseline == "floor":
            value = row["median_ms"] / row["floor_ms"]
            met = value <= fig.at_most
            text = f"{value:.2f}x the bandwidth floor ({row['floor_ms']:.2f} ms), target <= " \
                   f"{fig.at_most:g}x"
        else:
            value = timed[fig.baseline]["median_ms"] / row["median_ms"]
            met = value >= fig.at_least
            text = f"{value:.2f}x faster than {fig.baseline}, target >= {fig.at_least:g}x"
        lines.append(f"{'met' if met else 'NOT MET'}: {fig.case} {fig.provider} {text}")
    for line in lines:
        print(line)
    return lines


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repetitions (a CI smoke run); saves nothing "
                             "unless --results-dir is given")
    parser.add_argument("--providers", default="",
                        help="comma-separated providers to run (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help=f"where <op>.csv and <op>.png go (default: {RESULTS}; none with "
                             f"--quick)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (torch.set_num_threads); default: torch's default")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds of timed runs per provider and case (after warm-up)")
    return parser.parse_args(argv)


def main(op: str, cases: Callable[[bool], list[Case]], providers: list[Provider],
         argv: list[str] | None = None, description: str = "",
         figures: list[Figure] | None = None) -> list[dict]:
    """Runs every provider on every case of `op`; prints, saves and plots; checks `figures`.
    Returns the rows."""
    args = parse_args(argv, description or f"{op} microbenchmark")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = set(filter(None, args.providers.split(",")))
    chosen = [p for p in providers if not wanted or p.name in wanted]
    results_dir = args.results_dir if args.results_dir or args.quick else RESULTS
    budget = 0.2 if args.quick else args.budget
    context = dict(timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   git=git_hash(), device=device_name(device), threads=torch.get_num_threads(),
                   torch=torch.__version__, op=op)
    rows = []
    for case in cases(args.quick):
        inputs = case.build(device)
        ceiling = copy_bandwidth(device, (32 if args.quick else 256) * 2**20)
        case_rows = _run_case(case, inputs, chosen, device, ceiling, budget, context)
        del inputs
        rows += case_rows
        if results_dir is not None:  # case by case: a run killed part way keeps the finished cases
            _append_csv(case_rows, results_dir, op)
    _print_table(rows)
    if figures and not args.quick:
        check_figures(rows, figures)
    if results_dir is not None and rows:
        plot(rows, results_dir / f"{op}.png")
        print(f"appended {len(rows)} rows to {results_dir / f'{op}.csv'}")
    return rows


def _run_case(case: Case, inputs: dict, providers: list[Provider], device: torch.device,
              ceiling: float, budget: float, context: dict) -> list[dict]:
    rows = []
    for provider in providers:
        row = dict(context, case=case.name, provider=provider.name, bytes=case.bytes,
                   copy_gbps=round(ceiling, 3), floor_ms=round(case.bytes / ceiling / 1e6, 4),
                   load_avg=round(os.getloadavg()[0], 2), note="")
        try:
            if device.type not in provider.devices:
                raise Skip(f"runs on {'/'.join(provider.devices)} only")
            started = time.perf_counter()
            fn = provider.setup(inputs)
            fn()  # set-up and the first call compile, build caches, allocate: not timed
            first_s = time.perf_counter() - started
            timing = time_fn(fn, device, budget_s=budget)
        except Skip as reason:
            row.update(note=f"skipped: {reason}")
            rows.append(row)
            continue
        gbps = case.bytes / timing.median_s / 1e9
        row.update(median_ms=round(timing.median_s * 1e3, 4), q20_ms=round(timing.q20_s * 1e3, 4),
                   q80_ms=round(timing.q80_s * 1e3, 4), reps=timing.reps, gbps=round(gbps, 3),
                   fraction_of_copy=round(gbps / ceiling, 4))
        if first_s > 10 * timing.median_s and first_s > 1.0:
            row["note"] = f"set-up and first call {first_s:.1f} s"
        rows.append(row)
    reference = next((r for r in rows if r["provider"] == "reference" and "median_ms" in r), None)
    for row in rows:
        if reference and "median_ms" in row:
            row["vs_reference"] = round(reference["median_ms"] / row["median_ms"], 2)
    return rows


def _print_table(rows: list[dict]) -> None:
    if not rows:
        return
    print(f"device: {rows[0]['device']}, torch {rows[0]['torch']}, git {rows[0]['git']}, "
          f"{rows[0]['threads']} threads")
    width = max(50, *(len(row["case"]) for row in rows))
    header = f"{'case':<{width}} {'provider':<14} {'median ms':>10} {'q20-q80 ms':>17} {'GB/s':>7} " \
             f"{'of copy':>8} {'x ref':>6}  note"
    print(header)
    print("-" * len(header))
    for row in rows:
        if "median_ms" not in row:
            print(f"{row['case']:<{width}} {row['provider']:<14} {'-':>10} {'':>17} {'':>7} {'':>8} "
                  f"{'':>6}  {row['note']}")
            continue
        spread = f"{row['q20_ms']:.3f}-{row['q80_ms']:.3f}"
        print(f"{row['case']:<{width}} {row['provider']:<14} {row['median_ms']:>10.3f} {spread:>17} "
              f"{row['gbps']:>7.2f} {row['fraction_of_copy']:>8.1%} "
              f"{row.get('vs_reference', math.nan):>6.2f}  {row['note']}")
    copies = dict.fromkeys((r["case"], r["copy_gbps"], r["floor_ms"]) for r in rows)
    for case, gbps, floor in copies:
        print(f"copy bandwidth before '{case}': {gbps:.2f} GB/s; bandwidth floor {floor:.3f} ms")


def append_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Append `rows` to the CSV at `path` (the header first when the file is new); missing fields blank."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="", extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _append_csv(rows: list[dict], results_dir: Path, op: str) -> None:
    append_csv(results_dir / f"{op}.csv", rows, COLUMNS)


def plot(rows: list[dict], path: Path) -> None:
    """Bars of GB/s per case and provider, the copy bandwidth of each case as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "median_ms" in r]
    if not timed:
        return
    cases = list(dict.fromkeys(r["case"] for r in timed))
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6.0, 3.2 * len(cases)), 4.5))
    for j, provider in enumerate(providers):
        xs, ys = [], []
        for i, case in enumerate(cases):
            match = [r for r in timed if r["case"] == case and r["provider"] == provider]
            if match:
                xs.append(i + (j - (len(providers) - 1) / 2) * width)
                ys.append(match[0]["gbps"])
        bars = ax.bar(xs, ys, width, label=provider)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    for i, case in enumerate(cases):
        ceiling = next(r["copy_gbps"] for r in timed if r["case"] == case)
        ax.hlines(ceiling, i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                  label="copy bandwidth" if i == 0 else None)
    ax.set_xticks(range(len(cases)), [c.replace(" ", "\n", 1) for c in cases], fontsize=8)
    ax.set_ylabel("GB/s of essential bytes")
    first = timed[0]
    ax.set_title(f"{first['op']}: {first['device']}, torch {first['torch']}, {first['git']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
