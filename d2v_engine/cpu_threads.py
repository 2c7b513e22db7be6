"""CPU threads on a shared machine: how many intra-op threads a rank takes.

torch runs CPU ops on OpenMP threads (libgomp in the pip wheels), one per core by default, and every
parallel region waits for its slowest thread. Beside a busy process one of them is the thread the
scheduler has parked: one single-threaded busy loop made the default's step 3.1x slower on 2 cores,
where a fair share costs 2x (half the cores). What the engine does, unless told otherwise
(`D2V_THREADS`, below): the cores this rank may use (affinity, shared among the launcher's local
ranks) less the cores other processes kept busy while the rank started (`busy_cores`, sampled from
/proc), at least one. Chosen once, before training: torch's results depend on the thread count
(README, "Reproducibility"), so the count never changes mid-run.

The wait is libgomp's: a thread that finishes its part of a region first spins (300,000 iterations)
before it sleeps. Measured on this repository's 2-core machine (README, "The CPU step, and training
beside other work"), a shorter spin or a passive wait cost the idle step 6-20% and did not help two
threads beside a busy process; only the thread count did. `OMP_WAIT_POLICY` / `GOMP_SPINCOUNT` still
change it, and the log line says which wait is in force.

`D2V_THREADS`: `auto` (the default) as above; a number: that many threads; `off`: torch's own
count, shared among local ranks (as before this module). `OMP_NUM_THREADS`, when set, fixes the
count as well (the launcher's and torchrun's convention). The choice is the run's first log line.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from d2v_engine.errors import UserError

CHOSEN: "ThreadChoice | None" = None
"""The last `choose_threads` result applied (`distributed.share_cpu_cores`)."""


def mode() -> str:
    """`D2V_THREADS`: "auto", "off", or a thread count."""
    value = os.environ.get("D2V_THREADS", "auto").strip().lower() or "auto"
    if value not in ("auto", "off") and not (value.isdigit() and int(value) > 0):
        raise UserError(f"D2V_THREADS={value!r} is not a setting: use auto, off or a number of threads.")
    return value


def wait() -> str:
    """The OpenMP wait in force, for the log line."""
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if os.environ.get(var):
            return f"{var}={os.environ[var]} (set by you)"
    return "libgomp's default (spin, then sleep)"


def _busy_ticks(cpus: set[int]) -> tuple[int, int]:
    """(busy, all) clock ticks since boot of the CPUs `cpus`, from their lines of /proc/stat (a
    container may see the whole host's CPUs there: only the ones this process may use count)."""
    busy = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        fields = [int(v) for v in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(fields)
        busy += sum(fields) - fields[3] - fields[4]
    return busy, total


def _own_ticks() -> int:
    """Clock ticks (user + system) of this process and of its children that are still running."""
    total = 0
    pids = [os.getpid()]
    try:
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def busy_cores(seconds: float = 0.3) -> float:
    """Cores of this process's affinity that other processes kept busy over the next `seconds`
    (0.0 where /proc is missing). This process and its children (DataLoader workers) are not others."""
    cpus = _cpus()
    try:
        busy0, all0 = _busy_ticks(cpus)
        own0 = _own_ticks()
        time.sleep(seconds)
        busy1, all1 = _busy_ticks(cpus)
        own1 = _own_ticks()
    except (OSError, ValueError, IndexError):
        return 0.0
    cores = len(cpus)
    if all1 <= all0:
        return 0.0
    others = (busy1 - busy0) - (own1 - own0)
    return max(0.0, cores * others / (all1 - all0))


def _cpus() -> set[int]:
    """The CPUs this process may run on (its affinity)."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """How many cores this process may run on."""
    return len(_cpus())


@dataclass
class ThreadChoice:
    threads: int
    why: str

    def line(self) -> str:
        """The log line: the count, why, and the wait."""
        return f"cpu: {self.threads} thread(s), {self.why}; OpenMP wait: {wait()}"


def choose_threads(local_ranks: int, current: int, busy: float | None = None) -> ThreadChoice:
    """The intra-op thread count of one of `local_ranks` ranks on this machine.

    Args:
        local_ranks: ranks the launcher started on this machine.
        current: torch's thread count now (kept with `D2V_THREADS=off` or `OMP_NUM_THREADS`).
        busy: cores other processes keep busy; None = measure (`busy_cores`), only in `auto`.
    """
    cores = usable_cores()
    if os.environ.get("OMP_NUM_THREADS"):
        return ThreadChoice(current, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} (set by you)")
    share = max(1, cores // max(1, local_ranks))
    m = mode()
    if m == "off":
        return ThreadChoice(min(current, share), f"{cores} core(s) shared by {local_ranks} local rank(s) "
                                                 f"(D2V_THREADS=off)")
    if m != "auto":
        return ThreadChoice(int(m), f"D2V_THREADS={m}")
    if local_ranks > 1:
        # The other local ranks are busy starting up too: their load is not a stranger's.
        return ThreadChoice(share, f"{cores} core(s) shared by {local_ranks} local ranks")
    busy = busy_cores() if busy is None else busy
    # A process that kept most of a core busy takes that core; a passing blip takes none.
    taken = int(busy + 0.3)
    threads = max(1, min(share, cores - taken))
    return ThreadChoice(threads, f"{cores} core(s), other processes kept {busy:.1f} busy")
