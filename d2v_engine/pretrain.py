"""Pretrain a data2vec model.

    deepspeed [--num_gpus N] d2v_engine/pretrain.py --config configs/X.yaml [section.key=value ...]
    python d2v_engine/pretrain.py --config configs/X.yaml [section.key=value ...]   # one process
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script, Python puts this file's folder first on sys.path, where modules such as
    # `profile.py` would shadow the standard library: import the package from the repository instead.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import contextlib
import traceback


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/); defaults apply when omitted")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the rank is read from the environment")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.steps=60 run.dir=runs/try")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Config, build, train, close. Returns the exit status: 0 finished, 2 a user error, 3 stopped by
    SIGTERM or SIGINT after writing a checkpoint (`preemption`)."""
    args = parse_args(argv)
    from d2v_engine.config import load_config
    from d2v_engine.errors import UserError

    try:
        cfg = load_config(args.config, args.overrides)
        from d2v_engine.data.workers import stop_on_dead_worker
        from d2v_engine.preemption import PREEMPTED
        from d2v_engine.trainer import Trainer

        trainer = Trainer(cfg)
        with stop_on_dead_worker(trainer.worker_died):  # torch reports it wherever the loop is
            stopped = trainer.train()
            trainer.close(plot=not stopped)
    except UserError as err:
        print(f"pretrain: error: {err}", file=sys.stderr)
        return 2
    return PREEMPTED if stopped else 0


if __name__ == "__main__":
    try:
        status = main()
    except BaseException:   # a bug, or a closed stdout: the traceback, and the usual status 1
        traceback.print_exc()
        status = 1
    with contextlib.suppress(OSError):   # a closed pipe refuses the flush too
        sys.stdout.flush()
        sys.stderr.flush()
    # Leave without interpreter teardown: two-rank ZeRO-3 on gloo can abort while destroying the
    # process group after training and saving succeeded, which would turn success into a crash;
    # and multiprocessing's exit would wait for DataLoader workers, which ignore SIGTERM.
    os._exit(status)
