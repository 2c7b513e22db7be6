"""Smoke test of the data reader benchmark: both readers measured in one run, a CSV row for each."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_data.py"


def test_quick_data_benchmark_writes_both_readers(tmp_path):
    pytest.importorskip("nvidia.dali")
    command = [sys.executable, str(BENCH), "--quick", "--workers", "1", "--cases", "fashion28,audio",
               "--results-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "data.csv").open()))
    assert {(r["case"], r["stage"], r["reader"]) for r in rows} == {
        (case, stage, reader) for case in ("fashion28", "audio") for stage in ("augment", "batches")
        for reader in ("torch", "dali")}
    for row in rows:
        assert float(row["median"]) > 0 and float(row["cpu_ms"]) > 0 and row["git"] and row["load_avg"]
        assert row["unit"] == ("images/s" if row["case"] == "fashion28" else "audio s/s")
    assert {r["vs_torch"] for r in rows if r["reader"] == "torch"} == {"1.0"}
