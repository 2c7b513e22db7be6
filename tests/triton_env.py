"""Where the Triton kernel tests run: on a GPU at full size, else in Triton's CPU interpreter.

Triton chooses between compiling and interpreting when `triton.language` is imported, so without a
GPU this module sets TRITON_INTERPRET=1 when it is imported, during test collection, before any
test runs (torch.compile imports triton). That stays set for the session: nothing else changes
with it (`auto` never picks triton for CPU tensors; the test that triton is refused on CPU clears
it). If triton was imported earlier all the same, `triton_device` skips with the reason.
"""
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_device() -> str:
    """The device the Triton kernels run on in this test ("cuda", or "cpu" when interpreted)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from d2v_engine.ops import triton as triton_ops

    if not triton_ops.runs_on(DEVICE):
        pytest.skip(f"Triton kernels do not run on {DEVICE} tensors here "
                    f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r})")
    for name in ("ema_update", "make_targets", "regression_loss"):
        try:
            triton_ops.load_kernels(name, torch.device(DEVICE))
        except RuntimeError as error:
            pytest.skip(f"Triton kernels cannot run on {DEVICE} here: {error}")
    return DEVICE


def sizes(small: list, full: list) -> list:
    """Small shapes everywhere (the interpreter is slow), plus the real model sizes on a GPU."""
    return small + (full if ON_GPU else [])
