"""`make gpu-check OUT=dir`: the GPU checks and timings of this repository in one run of at most 8 minutes.

Each stage runs in subprocesses under a time budget (a stage past it is killed and marked failed),
so a slow stage cannot starve the others, and the whole run stops starting stages once its total
budget (`--total`) is spent. `check` stages decide the exit status; `measure` stages never do.

    stage         kind     budget  what
    setup         check     45 s   GPU: wheels/*.whl and the package (editable) into this python;
                                   then every module a stage needs imports
    extension     check    120 s   GPU: the C++ extension builds (in the background, while the tests run)
    kernel tests  check    110 s   pytest -m gpu: each Triton kernel against ops/reference.py, fp32/bf16/
                                   fp16, gradients, awkward and base shapes (pytest-xdist, if there)
    model steps   check     90 s   pytest -m gpu tests/test_base_steps.py: bf16 steps of each base model
                                   through DeepSpeed (1.0 and 2.0), the loss finite and falling
    dali          check     60 s   tests/data/test_dali.py, where DALI is installed
    ceilings      measure   15 s   device-to-device copy GB/s and bf16 matmul TFLOP/s, for the rest
    op timings    measure   70 s   benchmarks/bench_*.py at base shapes: triton vs eager vs torch.compile
    profiles      measure   90 s   d2v profile --compare kernels.backend=reference,auto: base_image first,
                                   then the other base configs while the budget lasts

Sequential budgets add up to 420 s (the extension builds beside the tests); the default total is 450 s.
Smoke mode (no CUDA device, or --smoke): the same stages on the CPU, with Triton's interpreter, tiny
shapes, the debug models and a few tests of each kind (about 40 s of CPU time; each stage may take 480 s,
since make test shares the CPUs); nothing is installed or built (`make setup` did that), and
`tests/benchmarks/test_gpu_check.py` runs it inside `make test`.

OUT receives SUMMARY.md (rewritten after every stage: the machine, versions, each stage passed / failed
/ not run with why, the tables), stages.jsonl (one record per finished stage), environment.json,
ops.csv, profiles.csv, profiles.json and log.txt (every command and its output). Scratch files (shards,
junit files, per-op CSVs) go to a temporary folder, or to --work.

Test hook: --inject-fault loads `gpu_check_fault.py` into the kernel tests, which makes the reference
regression loss 1% off, so that the Triton comparison fails and the exit status must be 1.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata, util
from pathlib import Path

import gpu_check_report as report
from gpu_check_runner import BENCHMARKS, ROOT, Done, GpuCheck, Outcome, Stage, Stopped, read_junit, tests_outcome

TASKS = BENCHMARKS / "gpu_check_tasks.py"
OPS = ("regression_loss", "make_targets", "ema_update")   # quickest torch.compile first
# (config, batch size) in the order the profiles run; batches that fit one 80 GB GPU.
PROFILES = (("base_image", 128), ("base_image_v2", 32), ("base_text", 32), ("base_audio", 16),
            ("base_text_v2", 16), ("base_audio_v2", 8))
SMOKE_PROFILES = (("debug_image", 8),)
KERNEL_TESTS = ("tests/kernels", "tests/test_streaming.py")
# Smoke mode: 18 tests of the three kernels, fp32/bf16/fp16 and gradients, in the interpreter (which
# runs all of them in `make test` anyway).
SMOKE_KERNEL_TESTS = ("tests/kernels/test_triton_ema_update.py", "tests/kernels/test_triton_make_targets.py",
                      "tests/kernels/test_triton_regression_loss.py")
SMOKE_KERNEL_SELECTION = "(test_matches_reference and shadow_dtype1) or (masked_and_padded and layer-layer) " \
                         "or (low_precision and norms1) or (regression_loss and mean and (fp32 or " \
                         "low_precision_pred) and (shape2 or dtype1))"
PROFILE_MIN_S = {True: 5.0, False: 30.0}    # smoke, GPU: a profile that cannot finish is not started


# ------------------------------------------------------------------------------ the stages
def run_setup(check: GpuCheck, budget: float) -> Outcome:
    deadline = time.monotonic() + budget
    notes = []
    if not check.smoke:
        pip = [check.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--disable-pip-version-check"]
        wheels = sorted(str(p) for p in (ROOT / "wheels").glob("*.whl"))
        if wheels:
            done = check.command([*pip, *wheels], deadline - time.monotonic())
            if not done.ok:
                return Outcome("failed", "pip could not install wheels/*.whl (see log.txt)")
            notes.append(f"{len(wheels)} wheels installed from wheels/")
        # Editable, so that kernels/ resolves as d2v_engine.kernels; the extension is its own stage.
        done = check.command([*pip, "--no-build-isolation", "-e", str(ROOT)], deadline - time.monotonic(),
                             env={"D2V_SKIP_EXT": "1"})
        if not done.ok:
            return Outcome("failed", "pip install -e . failed (see log.txt)")
        notes.append("d2v_engine installed (editable)")
    else:
        notes.append("smoke mode: this environment as it is, nothing installed")
    found = check.work / "imports.json"
    gpu = [] if check.smoke else ["--gpu"]
    done = check.command([check.python, str(TASKS), "imports", str(found), *gpu], deadline - time.monotonic())
    record = json.loads(found.read_text()) if found.exists() else {}
    check.environment["imports"] = record
    check.environment["packages"] = package_versions()
    if not done.ok:
        missing = "; ".join(record.get("missing", [])) or "see log.txt"
        return Outcome("failed", f"cannot import: {missing}", record)
    return Outcome("passed", "; ".join(notes), record)


def run_extension(check: GpuCheck, budget: float) -> Outcome:
    built = sorted((ROOT / "d2v_engine").glob("_C*.so"))
    if check.smoke:
        if built:
            return Outcome("passed", f"{built[0].name} is built (smoke mode does not rebuild it)")
        return Outcome("not run", "smoke mode does not build the extension (make setup does)")
    for old in built:
        old.unlink()    # so that a library found afterwards is this build's (or ninja's up-to-date one)
    log_path = check.work / "extension.log"     # its own log: it runs beside the tests
    log = log_path.open("w")
    proc = check.start([check.python, "setup.py", "build_ext", "--inplace"],
                       env={"MAX_JOBS": str(os.cpu_count() or 4)}, log=log)

    def finish(done: Done) -> Outcome:
        log.close()
        output = log_path.read_text()
        check.log.write(f"\n[the extension stage's output]{output}")
        library = sorted((ROOT / "d2v_engine").glob("_C*.so"))
        if done.timed_out:
            return Outcome("failed", f"the build took longer than its {budget:.0f} s budget")
        # setup.py turns a failed optional build into a warning: the library is the proof.
        if not done.ok or not library or "extension d2v_engine._C was not built" in output:
            return Outcome("failed", "setup.py build_ext did not build d2v_engine/_C (see log.txt)")
        return Outcome("passed", f"built {library[0].name} with up to {os.cpu_count()} jobs")

    return check.background(proc, budget, finish)


def run_kernel_tests(check: GpuCheck, budget: float) -> Outcome:
    extra: tuple[str, ...] = ("-k", SMOKE_KERNEL_SELECTION) if check.smoke else ()
    if not check.smoke and util.find_spec("xdist") is not None:
        # Most of the time goes to compiling the kernels' specialisations: compile in parallel.
        extra = ("-n", str(max(1, min(8, (os.cpu_count() or 2) // 2))))
    if check.inject_fault:
        extra = (*extra, "-p", "gpu_check_fault")
    targets = SMOKE_KERNEL_TESTS if check.smoke else KERNEL_TESTS
    done, counts = check.pytest(list(targets), "kernel_tests", budget, extra)
    return tests_outcome(done, counts, budget)


def run_model_steps(check: GpuCheck, budget: float) -> Outcome:
    done, counts = check.pytest(["tests/test_base_steps.py"], "model_steps", budget)
    return tests_outcome(done, counts, budget)


def run_dali(check: GpuCheck, budget: float) -> Outcome:
    if check.smoke:
        return Outcome("not run", "smoke mode (make test runs tests/data/test_dali.py)")
    if util.find_spec("nvidia") is None or util.find_spec("nvidia.dali") is None:
        return Outcome("not run", "DALI wheels exceed the 64 MiB carry limit (nvidia.dali is not installed)")
    done = check.command([check.python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"--junitxml={check.work / 'dali.xml'}", "tests/data/test_dali.py"], budget)
    return tests_outcome(done, read_junit(check.work / "dali.xml"), budget)


def run_ceilings(check: GpuCheck, budget: float) -> Outcome:
    path = check.work / "ceilings.json"
    smoke = ["--smoke"] if check.smoke else []
    done = check.command([check.python, str(TASKS), "ceilings", str(path), *smoke], budget)
    if not done.ok or not path.exists():
        return Outcome("failed", "timed out" if done.timed_out else "the measurement failed (see log.txt)")
    check.environment["ceilings"] = ceilings = json.loads(path.read_text())
    return Outcome("passed", f"copy {ceilings['copy_gbps']:.0f} GB/s, {ceilings['matmul_dtype']} matmul "
                             f"{ceilings['matmul_flops'] / 1e12:.1f} TFLOP/s", ceilings)


def run_op_timings(check: GpuCheck, budget: float) -> Outcome:
    deadline, failed = time.monotonic() + budget, []
    folder = check.work / "bench"
    for i, op in enumerate(OPS):
        share = (deadline - time.monotonic()) / (len(OPS) - i)   # a slow op leaves the others theirs
        argv = [check.python, str(BENCHMARKS / f"bench_{op}.py"), "--results-dir", str(folder)]
        argv += ["--quick", "--device", "cpu", "--providers", "reference,cpp"] if check.smoke \
            else ["--budget", "0.3"]
        done = check.command(argv, share)
        if not done.ok:
            failed.append(f"{op} ({'timed out' if done.timed_out else f'exit {done.rc}'})")
        merge_op_rows(check, folder)
    rows = len(check.op_rows)
    if failed:
        return Outcome("failed", f"{rows} rows; failed: {', '.join(failed)}")
    return Outcome("passed", f"{rows} rows from {len(OPS)} ops")


def merge_op_rows(check: GpuCheck, folder: Path) -> None:
    """ops.csv in OUT: every row the benchmarks wrote so far."""
    rows = []
    for op in OPS:
        if (folder / f"{op}.csv").exists():
            with (folder / f"{op}.csv").open() as handle:
                rows += list(csv.DictReader(handle))
    check.op_rows = rows
    if rows:
        report.write_csv(check.out / "ops.csv", rows)


def run_profiles(check: GpuCheck, budget: float) -> Outcome:
    deadline, done_configs, failed, skipped = time.monotonic() + budget, [], [], []
    for config, batch in SMOKE_PROFILES if check.smoke else PROFILES:
        left = deadline - time.monotonic()
        if left < PROFILE_MIN_S[check.smoke]:
            skipped.append(config)
            continue
        result = profile(check, config, batch, left)
        (done_configs if result is None else failed).append(config if result is None else f"{config} ({result})")
    note = f"profiled {', '.join(done_configs) or 'nothing'}"
    if skipped:
        note += f"; not run (the stage's {budget:.0f} s budget was spent): {', '.join(skipped)}"
    if failed:
        return Outcome("failed", f"{note}; failed: {', '.join(failed)}")
    return Outcome("passed", note)


def profile(check: GpuCheck, config: str, batch: int, timeout: float) -> str | None:
    """`d2v profile --compare kernels.backend=reference,auto` of one config; None, or why it failed."""
    start = time.monotonic()
    modality = config.split("_")[1]
    shards = check.work / "shards" / modality / "train"
    if not shards.exists():
        smoke = ["--smoke"] if check.smoke else []
        done = check.command([check.python, str(TASKS), "shards", modality, str(shards), *smoke], timeout)
        if not done.ok:
            return "could not write its synthetic shards"
    out = check.work / "profile" / config
    steps = ["--warmup", "1", "--steps", "2"] if check.smoke else ["--warmup", "3", "--steps", "8"]
    done = check.command([check.python, "-m", "d2v_engine.cli", "profile", "--config", f"configs/{config}.yaml",
                          *steps, "--trace-steps", "0", "--compare", "kernels.backend=reference,auto",
                          "--out", str(out), f"data.path={shards}", "data.reader=torch",
                          f"data.num_workers={0 if check.smoke else 6}", f"train.batch_size={batch}"],
                         timeout - (time.monotonic() - start))
    if not done.ok or not (out / "compare.json").exists():
        return "timed out" if done.timed_out else f"exit {done.rc}"
    results = json.loads((out / "compare.json").read_text())["results"]
    report.add_profile(check, config, results)
    return None


STAGES = [
    Stage("setup", "check", 45, run_setup),
    Stage("extension", "check", 120, run_extension),
    Stage("kernel tests", "check", 110, run_kernel_tests),
    Stage("model steps", "check", 90, run_model_steps),
    Stage("dali", "check", 60, run_dali),
    Stage("ceilings", "measure", 15, run_ceilings),
    Stage("op timings", "measure", 70, run_op_timings),
    Stage("profiles", "measure", 90, run_profiles),
]


def package_versions() -> dict[str, str]:
    """Installed versions, read from the package metadata (nothing is imported)."""
    versions = {}
    for name in ("torch", "triton", "deepspeed", "numpy", "pytest", "transformers", "d2v_engine"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine_record(smoke: bool) -> dict:
    """GPU name and driver (nvidia-smi), python, packages, git commit, the mode, the start time."""
    record = {"mode": "smoke" if smoke else "gpu", "python": sys.version.split()[0],
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "packages": package_versions(), "git": os.environ.get("GIT_COMMIT") or git_commit()}
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        name, driver, memory = (part.strip() for part in query.stdout.splitlines()[0].split(","))
        record |= {"gpu": name, "driver": driver, "gpu_memory": memory}
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        record |= {"gpu": "none (no nvidia-smi answer)", "driver": "none"}
    return record


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout here; pass GIT_COMMIT=...)"
    return head + ("-dirty" if dirty else "")


def has_cuda() -> bool:
    """Whether this machine has an NVIDIA GPU (nvidia-smi lists one); torch is not imported."""
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where SUMMARY.md and the results go")
    parser.add_argument("--smoke", action="store_true", help="smoke mode even with a GPU")
    parser.add_argument("--total", type=float, default=None,
                        help="seconds for the whole run (default 450; smoke mode 1800)")
    parser.add_argument("--only", default="", help="comma-separated stages to run (the rest: not run)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--inject-fault", action="store_true",
                        help="test hook: make the reference regression loss 1%% off in the kernel tests")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    smoke = args.smoke or not has_cuda()
    only = set(filter(None, (s.strip() for s in args.only.split(","))))
    if unknown := only - {s.name for s in STAGES}:
        sys.exit(f"unknown stage(s) {sorted(unknown)}; the stages are: {', '.join(s.name for s in STAGES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("stages.jsonl", "log.txt", "ops.csv", "profiles.csv", "profiles.json"):
        (args.out / name).unlink(missing_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = GpuCheck(args.out, work, smoke, args.total or (1800.0 if smoke else 450.0), args.inject_fault)
    check.environment = machine_record(smoke)

    def on_signal(signum, frame):
        raise Stopped(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        status = check.run(STAGES, only)
    except Stopped as stop:
        status = check.stop(stop.args[0])
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print((args.out / "SUMMARY.md").read_text())
    return status


if __name__ == "__main__":
    sys.exit(main())
