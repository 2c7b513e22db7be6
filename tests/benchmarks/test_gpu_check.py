"""`make gpu-check` in smoke mode (no GPU: the CPU, Triton's interpreter, tiny shapes), as `make test` runs it.

The whole script runs once into a temporary OUT: every stage passes or is not run with its reason,
the files carry their fields, and a failed kernel comparison (the `--inject-fault` test hook) makes
the exit status 1.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ("setup", "extension", "kernel tests", "model steps", "dali", "ceilings", "op timings", "profiles")


def gpu_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), str(out), "--smoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check")
    done = gpu_check(out)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return out


def test_every_stage_passes_or_says_why_not(smoke):
    records = [json.loads(line) for line in (smoke / "stages.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == list(STAGES)
    for record in records:
        assert {"kind", "status", "seconds", "note", "details"} <= set(record)
        assert record["status"] in ("passed", "not run"), record
        assert record["status"] == "passed" or record["note"]          # a stage not run says why
    by_stage = {r["stage"]: r for r in records}
    for stage in ("setup", "kernel tests", "model steps", "ceilings", "op timings", "profiles"):
        assert by_stage[stage]["status"] == "passed", by_stage[stage]
    kernels = by_stage["kernel tests"]["details"]
    assert kernels["tests"] >= 10 and kernels["failures"] == kernels["errors"] == 0
    assert by_stage["model steps"]["details"]["tests"] == 2
    summary = (smoke / "SUMMARY.md").read_text()
    assert "PASSED" in summary.splitlines()[0] and "smoke mode" in summary
    for stage in STAGES:
        assert f"| {stage} |" in summary
    for stamp in ("| GPU |", "| driver |", "| python |", "| torch |", "| triton |", "| deepspeed |",
                  "| git commit |"):
        assert stamp in summary


def test_results_have_their_fields(smoke):
    env = json.loads((smoke / "environment.json").read_text())
    assert env["mode"] == "smoke" and env["packages"]["torch"] and env["git"]
    assert env["ceilings"]["copy_gbps"] > 0 and env["ceilings"]["matmul_flops"] > 0
    ops = list(csv.DictReader((smoke / "ops.csv").open()))
    assert {r["op"] for r in ops} == {"ema_update", "make_targets", "regression_loss"}
    timed = [r for r in ops if r["median_ms"]]
    assert {r["provider"] for r in timed} == {"reference", "cpp"}
    assert all(float(r["median_ms"]) > 0 and float(r["fraction_of_copy"]) > 0 for r in timed)
    profiles = list(csv.DictReader((smoke / "profiles.csv").open()))
    assert [(r["config"], r["backend"]) for r in profiles] == [("debug_image", "reference"),
                                                               ("debug_image", "auto")]
    records = json.loads((smoke / "profiles.json").read_text())
    assert set(records) == {"debug_image"}
    for row in profiles:
        assert float(row["samples_per_s"]) > 0 and float(row["peak_mem_bytes"]) > 0
        record = records["debug_image"][row["backend"]]
        # MFU against the matmul rate measured by the ceilings stage of this run
        assert record["matmul_flops"] == env["ceilings"]["matmul_flops"]
        assert record["mfu_measured"] == pytest.approx(record["achieved_flops"] / record["matmul_flops"])
        assert record["mfu_measured"] > 0
    assert "$ " in (smoke / "log.txt").read_text()       # the commands are logged


def test_a_failed_kernel_comparison_fails_the_run(tmp_path):
    done = gpu_check(tmp_path, "--only", "kernel tests", "--inject-fault")
    assert done.returncode == 1, done.stdout[-3000:]
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert summary.splitlines()[0].endswith("FAILED: kernel tests")
    failed = [line for line in summary.splitlines() if line.startswith("- kernel tests:")]
    assert failed and all("test_triton_regression_loss" in line for line in failed)
    assert "left out by --only" in summary
