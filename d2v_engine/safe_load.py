"""Reading `torch.save`d files without running code: `weights_only` unpickling with an allow-list.

A pickle can name any Python callable and have the unpickler call it, so a downloaded `.pt` file can
run commands the moment it is loaded. Everything d2v reads for `d2v eval`, `d2v export`,
`d2v hf-export` and `run.init_from` goes through `torch.load(weights_only=True)` instead, which
rebuilds only tensors, plain containers and the types allowed here. Those are exactly the types a
checkpoint of `Trainer.save_checkpoint` holds besides tensors (listed by disassembling real ZeRO 0-3,
fp32 and bf16 checkpoints of every modality):

- model-states files (DeepSpeed's `module`, `optimizer`, `param_shapes` ... and our client state):
  NumPy's RNG state in `rng` (an `ndarray` of `uint32`), nothing else;
- ZeRO 1-3 optimizer-state files (read by DeepSpeed's `zero_to_fp32`): DeepSpeed's `LossScaler`,
  `ZeroStageEnum` and, under ZeRO 1-2, `fragment_address`.

Resuming a run (`run.resume`) is the exception: DeepSpeed's own `load_checkpoint` unpickles with
`weights_only=False`, so it trusts the run directory that the same user's training wrote.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2v_engine.errors import UserError

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
"""torch's switch that makes every `torch.load` weights-only, even one that passes weights_only=False."""


def client_state_types() -> list[Any]:
    """What model-states files hold besides tensors: the NumPy RNG state (`trainer.rng_state`)."""
    reconstruct = np.zeros(0).__reduce__()[0]          # numpy._core.multiarray._reconstruct
    # the same function under NumPy 1's module name, for checkpoints a NumPy 1 run wrote
    legacy = (reconstruct, "numpy.core.multiarray._reconstruct")
    return [reconstruct, legacy, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def zero_optimizer_types() -> list[Any]:
    """What DeepSpeed's ZeRO 1-3 optimizer-state files hold besides tensors and plain values."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only(types: list[Any]) -> Iterator[None]:
    """Inside, every `torch.load` rebuilds only tensors, plain containers and `types`.

    This covers code we do not control too: DeepSpeed's `zero_to_fp32` passes weights_only=False,
    which torch's force switch overrides. The switch is process-wide, so only the single-threaded
    readers (`export.consolidate`) use it.
    """
    saved = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(types):
            yield
    finally:
        if saved is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = saved


def refused_global(err: BaseException) -> str | None:
    """The callable or class a refused pickle asked for (e.g. `posix.system`), or None."""
    found = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", str(err))
    if found:
        return found.group(1)
    found = re.search(r"allowlisted via `add_safe_globals`, but got <class '([^']+)'>", str(err))
    return found.group(1) if found else None


def load_file(path: str | Path, types: list[Any], what: str, fix: str) -> Any:
    """`torch.load` of one file, weights only, with `types` allowed besides tensors.

    Args:
        path: the file.
        types: the allow-list (`client_state_types()`, ...).
        what: how the error names the file, e.g. "run.init_from 'w.pt'".
        fix: what the user should do instead, the end of the error sentence.
    Raises:
        UserError: the file asks for anything else (it could run code), or is not readable.
    """
    try:
        with open(path, "rb") as f, torch.serialization.safe_globals(types):
            # A file object, not the path: torch would hand a path ending in .safetensors elsewhere.
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file means the same to the user
        if isinstance(err, pickle.UnpicklingError) and is_refusal(err):
            raise unsafe_error(what, err, fix) from None
        raise unreadable_error(what, err, fix) from None


def unreadable_error(what: str, err: BaseException, fix: str) -> UserError:
    """The one sentence for a file that is not a weights file at all (truncated, foreign, corrupt)."""
    return UserError(f"{what} is not a readable weights file ({type(err).__name__}); {fix}.")


def is_refusal(err: BaseException) -> bool:
    """True when `err` is torch's weights-only unpickler refusing a file (possibly re-raised by a library)."""
    return "Weights only load failed" in str(err)


def unsafe_error(what: str, err: BaseException, fix: str) -> UserError:
    """The one sentence for a file whose weights-only unpickling was refused."""
    name = refused_global(err)
    asked = f"asks to run or build {name}" if name else "holds more than tensors"
    return UserError(f"{what} was not loaded because it {asked} while unpickling, which a weights "
                     f"file never needs (it could run code); {fix}.")
