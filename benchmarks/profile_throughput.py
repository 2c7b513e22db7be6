"""Throughput profile of a training configuration: a thin script over `d2v_engine.profile`.

    python benchmarks/profile_throughput.py --config configs/base_image.yaml [section.key=value ...]
        [--warmup N] [--steps N] [--trace-steps N] [--compare kernels.backend=reference,auto] [--out DIR]

The same as `d2v profile ...`: a table of ms per step by phase (data wait, student forward, teacher
forward, targets, loss, backward, optimizer step, EMA update, rest), samples/s, model FLOPs per
sample, MFU and peak memory, with profile.json, profile.png and a Chrome trace in --out (default
<run.dir>/profile). To keep a result, copy its profile.json to benchmarks/results/ under a name that
says the configuration and the device.
"""
from __future__ import annotations

import sys

from d2v_engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
