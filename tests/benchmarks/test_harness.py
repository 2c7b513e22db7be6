"""Smoke test of the benchmark harness: a benchmark at tiny sizes writes its table, CSV and plot."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_quick_benchmark_writes_csv_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    command = [sys.executable, str(BENCHMARKS / "bench_regression_loss.py"), "--quick",
               "--device", "cpu", "--providers", "reference,cpp,triton",
               "--results-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "copy bandwidth" in done.stdout
    rows = list(csv.DictReader((tmp_path / "regression_loss.csv").open()))
    assert [r["provider"] for r in rows] == ["reference", "cpp", "triton"]
    reference = rows[0]
    assert float(reference["median_ms"]) > 0 and float(reference["copy_gbps"]) > 0
    assert float(reference["vs_reference"]) == 1.0 and reference["git"] and reference["device"]
    assert rows[2]["note"].startswith("skipped")  # triton runs on CUDA only
    assert (tmp_path / "regression_loss.png").stat().st_size > 0


def test_timing_statistics():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import harness
    finally:
        sys.path.remove(str(BENCHMARKS))
    calls = []
    timing = harness.time_fn(lambda: calls.append(1), harness.torch.device("cpu"), warmup=3,
                             min_reps=5, max_reps=9, budget_s=0.0)
    assert timing.reps == 5 and len(calls) == 8
    assert timing.q20_s <= timing.median_s <= timing.q80_s
