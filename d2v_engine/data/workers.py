"""A DataLoader worker of the `torch` reader that dies ends the run with one sentence, not a traceback.

torch reports a dead worker in two ways, both as a RuntimeError in the main process:
- from its SIGCHLD handler, the moment the worker dies: "DataLoader worker (pid 31242) is killed by
  signal: Killed." or "... exited unexpectedly with exit code 1. ...". A signal handler raises in
  whatever Python code the main thread runs at that moment: the data wait, the backward, a
  checkpoint save. So the report is caught around the whole loop (`stop_on_dead_worker`, which
  `pretrain.main` wraps around training), never around `next(data)` alone;
- from the wait for the next batch: "DataLoader worker (pid(s) 31242, 31243) exited unexpectedly",
  raised from the handler's report when that landed in the wait (a worker that dies while the
  main process waits for its batch), or on its own after a 5 s wait when no report got through.
The `dali` reader decodes in DALI's threads inside the training process, and reads text through the
`torch` reader: its only worker processes are the `torch` reader's.
"""
from __future__ import annotations

import contextlib
import re
import signal
from typing import Callable, Iterator

from d2v_engine.errors import UserError

_KILLED = re.compile(r"DataLoader worker \(pid (\d+)\) is killed by signal: ([^.]*)\.")
_EXITED = re.compile(r"DataLoader worker \(pid (\d+)\) exited unexpectedly with exit code (-?\d+)")
_LOST = re.compile(r"DataLoader worker \(pid\(s\) ([\d, ]+)\) exited unexpectedly")
# Why a worker commonly gets the signal, added to the sentence.
_NOTES = {"SIGKILL": "also what the kernel's out-of-memory killer sends",
          "SIGBUS": "out of shared memory: enlarge /dev/shm"}


def _signal_named(description: str) -> str:
    """`strsignal` text ("Killed") -> "signal 9 (SIGKILL, ...)"; the text itself when no signal has it."""
    for sig in signal.Signals:
        if signal.strsignal(sig) == description:
            note = f", {_NOTES[sig.name]}" if sig.name in _NOTES else ""
            return f"signal {sig.value} ({sig.name}{note})"
    return f"signal '{description}'"


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions it was raised from or while handling, innermost last."""
    chain = [err]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    return chain


def worker_death(err: BaseException) -> str | None:
    """What torch's error says happened to a DataLoader worker, as a clause; None for other errors.

    When the SIGCHLD handler's report lands while the main process waits for a batch, the wait
    catches it and raises "exited unexpectedly" from it: the report it was raised from says more.

    Args:
        err: an exception raised in the training process.
    Returns:
        e.g. "a data loader worker (pid 31242) was killed by signal 9 (SIGKILL, also what the
        kernel's out-of-memory killer sends)", or None when `err` is not torch's report of a dead worker.
    """
    reports = [str(e) for e in _chain(err) if isinstance(e, RuntimeError)]
    for text in reports:
        if m := _KILLED.search(text):
            return f"a data loader worker (pid {m.group(1)}) was killed by {_signal_named(m.group(2))}"
        if m := _EXITED.search(text):
            return f"a data loader worker (pid {m.group(1)}) exited with status {m.group(2)}"
    for text in reports:
        if m := _LOST.search(text):
            return f"data loader worker(s) (pid {m.group(1).strip()}) exited unexpectedly"
    return None


@contextlib.contextmanager
def stop_on_dead_worker(stop: Callable[[str], UserError]) -> Iterator[None]:
    """Turn torch's report of a dead DataLoader worker, wherever it is raised, into `stop(clause)`.

    Args:
        stop: builds the run's one-sentence UserError from `worker_death`'s clause (the trainer's
            `worker_died`: the step, the checkpoint to resume from).
    """
    try:
        yield
    except RuntimeError as err:
        death = worker_death(err)
        if death is None:
            raise
        raise stop(death) from None
