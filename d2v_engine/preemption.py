"""Stopping on SIGTERM or SIGINT with a checkpoint: clusters preempt jobs with SIGTERM (SLURM,
Kubernetes), and people press Ctrl-C.

    StopSignals           the training process's handlers: a first signal asks for a stop, a later one exits
    StepEndStops          a loop's end-of-step decision (save, stop), shared by pretraining and fine-tuning
    ignore_stop_signals   DataLoader workers' init function: both signals are the training process's
                          (a SIGTERM from the worker's parent excepted)
    PREEMPTED             exit status of a run that a signal stopped after writing its checkpoint (3)

The first SIGTERM or SIGINT only sets a flag. The trainer finishes the optimizer step it is in; at
the end of every step the ranks agree on the flag (one all-reduce, `Trainer._agree`), so that all of
them save the same step's checkpoint through the usual atomic path; then rank 0 prints one line and
every rank exits with status 3. A signal that arrives during a save lets the save finish, and the
run stops right after it (with no second save: that checkpoint is of the current step).

A second signal, more than `COPIES_S` after the first, exits at once with 128 + its number (130 for
SIGINT, 143 for SIGTERM: what a shell reports for a process that signal killed); `latest` then
still names the newest complete checkpoint. Signals within `COPIES_S` of the first are taken as
copies of it: the DeepSpeed launcher forwards a SIGTERM to ranks that have just received the same
signal themselves, from the terminal (Ctrl-C reaches its whole process group) or from SLURM (which
signals every process of the job).
"""
from __future__ import annotations

import os
import signal
import threading
import time

PREEMPTED = 3
"""Exit status of a run stopped by a signal once its checkpoint was written (0 = finished, 2 = user error)."""

COPIES_S = 1.0
"""Seconds after the first signal during which further signals count as copies of it (see above)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM and SIGINT handlers, installed while the trainer's loop runs (`with StopSignals(...)`).

    The handlers run in the main thread between two Python bytecodes, never inside a collective or a
    kernel, and do nothing but note the signal (or, the second time, leave): stopping is the loop's
    decision, taken at the end of a step.
    """

    signum: int | None     # the first signal received, None until one arrives
    phase: str             # what the trainer is doing now (`during`), for the stop line
    received_in: str       # `phase` when the first signal arrived

    def __init__(self, rank: int = 0, program: str = "pretrain"):
        """`program` names the command in the second signal's line (`pretrain`, `finetune`)."""
        self.rank, self.program = rank, program
        self.signum, self.phase, self.received_in = None, "start-up", ""
        self._first = 0.0
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal has arrived in this process."""
        return self.signum is not None

    @property
    def name(self) -> str:
        """The first signal's name (`SIGTERM`), or '' when none arrived."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def during(self, phase: str) -> None:
        """Say what the trainer does from now on ("step 7", "the save of step 6"): the stop line names it."""
        self.phase = phase

    def agree(self, saved_at: float, minutes: float, group=None) -> tuple[int, bool]:
        """(the stop signal's number or 0, save by the clock), the same on every rank.

        A stop signal that reached any rank stops all of them, and rank 0's clock alone decides a
        save every `minutes` (0: never) since `saved_at` (`time.monotonic`). One all-reduce (MAX)
        of two numbers, in `group` (`distributed.cpu_group`, so that it waits for no kernel); none
        with one rank.
        """
        import torch

        from d2v_engine import distributed

        timed = self.rank == 0 and minutes > 0 and time.monotonic() - saved_at >= 60 * minutes
        flags = torch.tensor([self.signum or 0, timed], dtype=torch.int64)
        signum, timed = distributed.all_reduce_max(flags, group).tolist()
        return signum, bool(timed)

    def __enter__(self) -> "StopSignals":
        # Python lets only the main thread install handlers; a loop run elsewhere keeps the defaults.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            # A DataLoader worker forked before its init function ran: the training process decides.
            return
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first, self.received_in = signum, now, self.phase
            return
        if now - self._first <= COPIES_S:
            return
        status = 128 + signum
        if self.rank == 0:
            # os.write, not print: the signal may have interrupted a print to the same stream.
            os.write(2, f"{self.program}: second signal ({signal.Signals(signum).name}): exiting at once with "
                        f"status {status}, no checkpoint of this step; `latest` names the newest complete "
                        f"one.\n".encode())
        os._exit(status)


class StepEndStops:
    """The end-of-step save and stop of a training loop: pretraining's `Trainer`, fine-tuning's `Finetuner`.

    The class provides `cfg`, `rank`, `step`, `ckpt_dir`, `signals` (a `StopSignals`), `flags_group`
    (`distributed.cpu_group()`), `saved_at` (`time.monotonic()` of the last save or of the loop's
    start) and `save_checkpoint()`.
    """

    def _save_then_stop(self) -> bool:
        """The end of a step: save if `train.save_every` or `train.save_every_minutes` or a stop
        signal says so; returns whether the run stops here. Every rank decides alike (`_agree`)."""
        cfg = self.cfg.train
        stop, timed = self._agree()
        if stop or timed or (cfg.save_every and self.step % cfg.save_every == 0):
            self.save_checkpoint()
            if not stop:   # a signal during the save: the checkpoint just written is of this step
                stop, _ = self._agree()
        return stop and self.step < cfg.steps

    def _agree(self) -> tuple[bool, bool]:
        """(stop, save by the clock), the same on every rank (`StopSignals.agree`)."""
        self._stop_signum, timed = self.signals.agree(self.saved_at, self.cfg.train.save_every_minutes,
                                                      self.flags_group)
        return self._stop_signum > 0, timed

    def _report_stop(self, echo=print) -> None:
        """The one line (rank 0) of a run that a signal stopped: which signal, when, what was saved."""
        if self.rank != 0:
            return
        from d2v_engine.trainer import _tag

        when = f"during {self.signals.received_in}" if self.signals.requested else "on another rank"
        echo(f"{self.signals.program}: {signal.Signals(self._stop_signum).name} {when}: stopped after step "
             f"{self.step} of {self.cfg.train.steps} with checkpoint {self.ckpt_dir / _tag(self.step)}; "
             f"continue with run.resume=true (exit status {PREEMPTED})")


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: SIGINT and SIGTERM are the training process's, not the worker's.

    A terminal's Ctrl-C reaches the workers too (they share its process group), and the DeepSpeed
    launcher and SLURM signal every process of a rank: a worker that died of it would fail the
    batch the trainer is waiting for, instead of letting it finish its step. A SIGTERM from the
    worker's own parent still ends it: the DataLoader's shutdown and multiprocessing's exit
    terminate workers that way, and wait for them.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Blocked, SIGTERM waits for `_end_on_parents_sigterm`, which sees the sender (a handler does not).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_parents_sigterm, args=(os.getppid(),), daemon=True,
                     name="parent-sigterm").start()


def _end_on_parents_sigterm(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)
