"""Shared test fixtures: deterministic seeding, the small prepared data sets (assertion helpers live
in tests/asserts.py)."""

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

# The suite runs beside itself (subprocess runs, builds): a thread count chosen from the load of the
# moment (`cpu_threads`) would make runs that tests compare bit for bit differ. Its own tests unset it.
os.environ.setdefault("D2V_THREADS", "off")

if not torch.cuda.is_available():
    # Triton kernels run on a CPU only under the interpreter, and the switch is read when triton is
    # first imported (torch.compile imports it too): set it before any test module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: the GPU checks (`make gpu-check` runs `pytest -m gpu`): the Triton kernels "
        "against the reference and a few steps of each base model; on a CPU they run small (Triton's "
        "interpreter, the debug models)")


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same random state, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """The three offline data sets, cut down to a few hundred samples each (end-to-end tests)."""
    from d2v_engine.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("data")
    for name, limit in (("fashion-mnist", 512), ("spoken-words", 48), ("text-corpus", 600)):
        prepare(name, root, PrepareOptions(limit=limit, shard_size=128, workers=2))
    return root
