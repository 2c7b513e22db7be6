"""The Triton backend of the fused ops: the reference signatures over `d2v_engine.kernels`.

Triton kernels run on CUDA tensors, and on CPU tensors only under the Triton interpreter
(`TRITON_INTERPRET=1`, slow: for tests with small shapes). Triton decides between compiling and
interpreting when `triton.language` and each kernel module are imported, so this module imports
neither: the kernels load at the first call, and the variable must be set before anything in the
process imports triton (torch.compile does).
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from d2v_engine.ops.reference import check_loss_args, check_targets_args

__all__ = ["ema_update_", "make_targets", "regression_loss", "runs_on", "interpreting",
           "load_kernels"]

# One kernel per module, to tell whether the module was imported for the interpreter.
_PROBE = {"ema_update": "_ema_update_fwd_kernel", "make_targets": "_make_targets_fwd_kernel",
          "regression_loss": "_regression_loss_fwd_kernel"}
_LOADED: dict[tuple[str, str], ModuleType] = {}


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (the TRITON_INTERPRET variable)."""
    # Read as Triton reads it, without importing triton (see the module docstring).
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def runs_on(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors of `device`."""
    device_type = torch.device(device).type
    return device_type == "cuda" or (device_type == "cpu" and interpreting())


def load_kernels(name: str, device: torch.device) -> ModuleType:
    """`d2v_engine.kernels.<name>` ("ema_update", "make_targets", "regression_loss"), checked
    to be runnable on `device`."""
    # After the first call a dict lookup, which torch.compile traces without a graph break.
    module = _LOADED.get((name, device.type))
    if module is None:
        module = _LOADED[name, device.type] = _import_kernels(name, device)
    return module


def _import_kernels(name: str, device: torch.device) -> ModuleType:
    module = importlib.import_module(f"d2v_engine.kernels.{name}")
    if device.type == "cpu":
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        # tl.sum and friends are Triton functions too, fixed when triton.language was imported.
        if not all(isinstance(f, InterpretedFunction) for f in (getattr(module, _PROBE[name]),
                                                                tl.sum)):
            raise RuntimeError(
                "triton was imported before TRITON_INTERPRET=1 was set, so its kernels are "
                "compiled for a GPU and cannot take CPU tensors; set TRITON_INTERPRET=1 in the "
                "environment before the process imports triton.")
    return module


def ema_update_(ema: list[Tensor], student: list[Tensor], decay: float,
                shadow: list[Tensor] | None = None) -> None:
    """Multi-tensor EMA update in one launch (see `kernels/ema_update.py`); args as the reference."""
    if not ema and not student and not shadow:
        return
    module = load_kernels("ema_update", ema[0].device if ema else student[0].device)
    module.ema_update_(ema, student, decay, shadow)


def make_targets(layers: Sequence[Tensor], *, layer_norm: str, final_norm: str = "none",
                 mask: Tensor | None = None, padding_mask: Tensor | None = None,
                 eps: float = 1e-5, repeat: int = 1) -> Tensor:
    """Fused targets (see `kernels/make_targets.py`); args and result as `make_targets_ref`."""
    check_targets_args(layers, layer_norm, final_norm, mask, padding_mask, repeat)
    module = load_kernels("make_targets", layers[0].device)
    return module.make_targets(layers, layer_norm=layer_norm, final_norm=final_norm, mask=mask,
                               padding_mask=padding_mask, eps=eps, repeat=repeat)


def regression_loss(pred: Tensor, target: Tensor, *, beta: float, scale: float = 1.0,
                    reduction: str = "sum") -> Tensor:
    """Fused loss and gradient (see `kernels/regression_loss.py`); args as the reference."""
    check_loss_args(pred, target, beta, reduction)
    module = load_kernels("regression_loss", pred.device)
    return module.regression_loss(pred, target, beta=beta, scale=scale, reduction=reduction)
