"""The machinery of `gpu_check.py`: stages as subprocesses under time budgets, outcomes, reports.

A stage's commands run in their own process groups with their output in log.txt; one past its budget
is killed with its whole group. After every stage the outcome goes to stages.jsonl and SUMMARY.md is
rewritten, so a run killed part way keeps what it measured. One stage may run in the background (the
extension build beside the tests): it is joined before the first `measure` stage.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import gpu_check_report as report

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


class Stopped(Exception):
    """A signal asked the run to stop (SIGTERM from a timeout, Ctrl-C)."""


@dataclass
class Outcome:
    status: Literal["passed", "failed", "not run", "running"]
    note: str = ""
    details: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Stage:
    name: str
    kind: Literal["check", "measure"]
    budget_s: float
    run: Callable[["GpuCheck", float], Outcome]
    # Smoke mode runs on shared CPUs (make test, CI): its budgets only stop a hung stage (a stage
    # of 6 s of CPU time was seen taking 141 s of wall time on a 2-core machine at load average 9).
    smoke_budget_s: float = 480.0


@dataclass
class Done:
    """One finished subprocess."""

    rc: int
    seconds: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out


class GpuCheck:
    """One run: options, folders, the environment of the stages, the outcomes so far."""

    def __init__(self, out: Path, work: Path, smoke: bool, total_s: float, inject_fault: bool):
        self.out, self.work, self.smoke, self.inject_fault = out, work, smoke, inject_fault
        self.started, self.total_s = time.monotonic(), total_s
        self.stages: list[Stage] = []
        self.outcomes: dict[str, Outcome] = {}
        self.environment: dict = {}
        self.op_rows: list[dict] = []                 # ops.csv so far
        self.profiles: dict[str, dict] = {}          # config -> backend setting -> profile record
        self.python = sys.executable
        self.log = (out / "log.txt").open("a", buffering=1)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(BENCHMARKS),
                                                                os.environ.get("PYTHONPATH")]))}
        if smoke:
            # Triton reads the switch when it is first imported: every stage process starts with it.
            self.env["TRITON_INTERPRET"] = "1"
            self.env["CUDA_VISIBLE_DEVICES"] = ""     # smoke mode is the CPU's, also on a GPU machine
            self.env.setdefault("OMP_NUM_THREADS", "1")
        self.current: Stage | None = None
        self.current_started = self.started
        # The background stage: (stage, process, start, budget, what its exit means).
        self.pending: tuple[Stage, subprocess.Popen, float, float, Callable[[Done], Outcome]] | None = None

    def left_s(self) -> float:
        return self.total_s - (time.monotonic() - self.started)

    # ------------------------------------------------------------------------------ subprocesses
    def start(self, argv: list[str], env: dict | None = None, log=None) -> subprocess.Popen:
        """Start `argv` in its own process group, its output appended to `log` (default log.txt)."""
        log = log or self.log
        log.write(f"\n$ {' '.join(argv)}\n")
        log.flush()
        return subprocess.Popen(argv, cwd=ROOT, env={**self.env, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, proc: subprocess.Popen, timeout: float, started: float) -> Done:
        """Wait for `proc` up to `timeout` seconds; past it (or on a signal) kill its whole group."""
        try:
            rc = proc.wait(timeout=max(0.1, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            rc, timed_out = -9, True
            kill_group(proc)
            self.log.write(f"[gpu-check: killed after {timeout:.0f} s, the stage's budget]\n")
        except Stopped:
            kill_group(proc)
            raise
        return Done(rc, time.monotonic() - started, timed_out)

    def command(self, argv: list[str], timeout: float, env: dict | None = None) -> Done:
        started = time.monotonic()
        return self.wait(self.start(argv, env), timeout, started)

    def pytest(self, targets: list[str], name: str, timeout: float, extra: tuple[str, ...] = ()
               ) -> tuple[Done, dict]:
        """`pytest -m gpu targets`, with a junit file read back into counts and failures."""
        junit = self.work / f"{name}.xml"
        argv = [self.python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                f"--junitxml={junit}", *extra, *targets]
        done = self.command(argv, timeout)
        return done, read_junit(junit)

    # ------------------------------------------------------------------------------ the run
    def run(self, stages: list[Stage], only: set[str]) -> int:
        self.stages = stages
        for stage in stages:
            self.outcomes[stage.name] = Outcome("not run", "waiting for its turn")
        self.write_reports()
        for stage in stages:
            if only and stage.name not in only:
                self.finish(stage, Outcome("not run", "left out by --only"))
                continue
            if stage.kind == "measure":
                self.join_background()   # timings need a quiet machine
            budget = min(stage.smoke_budget_s if self.smoke else stage.budget_s, self.left_s() - 3)
            if budget < 5:
                self.finish(stage, self.out_of_time(stage))
                continue
            self.outcomes[stage.name] = Outcome("running", "if this stays, gpu-check was killed here")
            self.current, self.current_started = stage, time.monotonic()
            self.write_reports()
            started = self.current_started
            outcome = stage.run(self, budget)
            if outcome.status == "running":    # a background stage: joined before the timings
                continue
            outcome.seconds = outcome.seconds or time.monotonic() - started
            self.finish(stage, outcome)
        self.join_background()
        failed = [s.name for s in stages if s.kind == "check" and self.outcomes[s.name].status == "failed"]
        self.write_reports(final=True)
        return 1 if failed else 0

    def out_of_time(self, stage: Stage) -> Outcome:
        why = f"the total budget of {self.total_s:.0f} s was spent"
        # A check that did not run did not pass: the exit status says so.
        return Outcome("failed", f"not run: {why}") if stage.kind == "check" else Outcome("not run", why)

    def background(self, proc: subprocess.Popen, budget: float, finish: Callable[[Done], Outcome]
                   ) -> Outcome:
        """Leave the current stage's `proc` running; `finish` judges it when it is joined."""
        self.pending = (self.current, proc, time.monotonic(), budget, finish)
        return Outcome("running", "in the background")

    def join_background(self) -> None:
        """Wait for the background stage (up to the rest of its budget) and record it."""
        if self.pending is None:
            return
        stage, proc, started, budget, finish = self.pending
        done = self.wait(proc, budget - (time.monotonic() - started), started)
        self.pending = None
        outcome = finish(done)
        outcome.seconds = done.seconds
        self.finish(stage, outcome)

    def finish(self, stage: Stage, outcome: Outcome) -> None:
        self.outcomes[stage.name] = outcome
        record = {"stage": stage.name, "kind": stage.kind, "status": outcome.status,
                  "seconds": round(outcome.seconds, 1), "note": outcome.note, "details": outcome.details}
        with (self.out / "stages.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(f"gpu-check: {stage.name}: {outcome.status} ({outcome.seconds:.0f} s) {outcome.note}",
              flush=True)
        self.write_reports()

    def stop(self, signum: int) -> int:
        """After a signal: the running stage failed, the rest did not run; reports written."""
        if self.pending is not None:
            kill_group(self.pending[1])
        why = f"gpu-check was stopped by {signal.Signals(signum).name}"
        for name, outcome in self.outcomes.items():
            if outcome.status == "running":
                self.outcomes[name] = Outcome("failed", why, seconds=time.monotonic() - self.current_started)
            elif outcome.note == "waiting for its turn":
                self.outcomes[name] = Outcome("not run", why)
        self.write_reports(final=True)
        return 128 + signum

    def write_reports(self, final: bool = False) -> None:
        self.environment["elapsed_s"] = round(time.monotonic() - self.started, 1)
        (self.out / "environment.json").write_text(json.dumps(self.environment, indent=2) + "\n")
        (self.out / "SUMMARY.md").write_text(report.summary(self, final))


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def read_junit(path: Path) -> dict:
    """{tests, failures, errors, skipped, failed: ["file::test: first line", ...]} of a junit file."""
    if not path.exists():
        return {}
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").strip().splitlines()
            failed.append(f"{case.get('classname')}::{case.get('name')}: {message[0][:200] if message else ''}")
    return counts | {"failed": failed}


def tests_outcome(done: Done, counts: dict, budget: float) -> Outcome:
    ran = counts.get("tests", 0) - counts.get("skipped", 0)
    summary = (f"{ran - counts.get('failures', 0) - counts.get('errors', 0)} of {ran} passed, "
               f"{counts.get('skipped', 0)} skipped") if counts else "no junit report"
    if done.timed_out:
        return Outcome("failed", f"timed out after {budget:.0f} s (its budget)", counts)
    if done.rc == 5 or (counts and ran == 0):
        return Outcome("failed", "no test ran", counts)
    return Outcome("passed" if done.ok else "failed", summary, counts)
