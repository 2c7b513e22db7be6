"""The `d2v` command: one subcommand per task (`prepare` now; `shards`, `eval`, `profile`,
`export` join the same table).

Each subcommand is a pair: `_add_<name>(subparsers)` declares its arguments, `_run_<name>(args)` does
the work and returns the exit status. `main()` turns a `UserError` into one line on stderr and exit
status 2, the same contract as `pretrain.py`.
"""
from __future__ import annotations

import argparse
import sys

from d2v_engine.errors import UserError


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_prepare(subparsers) -> None:
    from d2v_engine.data.prepare import DATASETS

    p = subparsers.add_parser("prepare", help="build an offline data set as WebDataset shards",
                              description="Build one of the offline data sets (see DATASETS.md) as "
                                          "WebDataset shards under OUT/<name>/. Does nothing when a "
                                          "complete copy built with the same options is there.")
    p.add_argument("name", choices=DATASETS, help="which data set")
    p.add_argument("--out", default="data", help="parent folder (default: data)")
    p.add_argument("--limit", type=_positive, default=None,
                   help="at most this many samples per split (small sets for tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits and shuffles")
    p.add_argument("--shard-size", type=_positive, default=5000, help="samples per shard")
    p.add_argument("--workers", type=int, default=0,
                   help="processes for speech synthesis (default: one per CPU)")
    p.set_defaults(run=_run_prepare)


def _run_prepare(args) -> int:
    from d2v_engine.data.prepare import PrepareOptions, prepare

    opts = PrepareOptions(limit=args.limit, seed=args.seed, shard_size=args.shard_size,
                          workers=args.workers)
    prepare(args.name, args.out, opts)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `d2v` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="d2v", description="data2vec engine tools.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_prepare,):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `d2v` with `argv` (default: the process's arguments).

    Returns:
        The exit status: 0 on success, 2 on a user error (printed as `d2v: error: <sentence>`).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as err:
        print(f"d2v: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("d2v: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
