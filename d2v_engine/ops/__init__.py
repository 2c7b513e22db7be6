"""The three fused ops of a data2vec step, dispatched to a kernel backend (DESIGN.md §4).

`backend` is "auto", "reference", "triton" or "cpp"; it comes from the `kernels.backend` config
field and is passed down explicitly. `ops/reference.py` is the specification every backend is
tested against. Adding a backend is one entry in `_BACKENDS` (and its place in `_AUTO_ORDER`).
"""

import importlib.util
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from d2v_engine.errors import UserError
from d2v_engine.ops import reference

__all__ = ["ema_update_", "make_targets", "regression_loss", "resolve_backend"]


class _Backend(NamedTuple):
    """One implementation of the three ops, with the reference functions' signatures."""

    ema_update_: Callable[..., None]
    make_targets: Callable[..., Tensor]
    regression_loss: Callable[..., Tensor]


_BACKENDS: dict[str, _Backend] = {
    "reference": _Backend(reference.ema_update_ref, reference.make_targets_ref,
                          reference.regression_loss_ref),
}
if importlib.util.find_spec("triton") is not None:
    # Triton is optional (the `gpu` extra); it is imported at the first call (ops/triton.py).
    from d2v_engine.ops import triton as _triton

    _BACKENDS["triton"] = _Backend(_triton.ema_update_, _triton.make_targets,
                                   _triton.regression_loss)
try:  # the C++ backend exists when setup.py built the extension d2v_engine._C
    from d2v_engine.ops import cpp as _cpp
except ImportError:
    pass
else:
    _BACKENDS["cpp"] = _Backend(_cpp.ema_update_, _cpp.make_targets, _cpp.regression_loss)
# What "auto" prefers per device type; names absent from _BACKENDS are skipped.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "reference"),
    "cpu": ("cpp", "reference"),
}
_KNOWN = ("auto", "reference", "triton", "cpp")
_MISSING_REASON = {
    "triton": "the triton package is not installed: pip install triton",
    "cpp": "the C++ extension d2v_engine._C is not part of it yet",
}


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend that runs an op on tensors of `device`.

    Args:
        backend: "auto", "reference", "triton" or "cpp" (the `kernels.backend` config field).
        device: where the op's tensors live.

    Returns:
        The name of an available backend ("auto" picks the fastest one for the device).

    Raises:
        UserError: the name is unknown, or names a backend this build does not have.
    """
    if backend not in _KNOWN:
        raise UserError(f"unknown kernels.backend={backend!r}; choose one of "
                        f"{', '.join(_KNOWN)}.")
    if backend == "auto":
        device_type = torch.device(device).type
        order = _AUTO_ORDER.get(device_type, ("reference",))
        return next(name for name in order if name in _BACKENDS)
    if backend not in _BACKENDS:
        raise UserError(f"kernels.backend={backend!r} is not available in this build "
                        f"({_MISSING_REASON[backend]}); use kernels.backend=reference or auto.")
    if backend == "triton" and not _triton.runs_on(device):
        raise UserError(f"kernels.backend='triton' runs on CUDA tensors, not on "
                        f"{torch.device(device).type} ones (CPU only under the slow Triton "
                        f"interpreter, TRITON_INTERPRET=1); use kernels.backend=auto.")
    return backend


def _backend_for(backend: str, device: torch.device) -> _Backend:
    return _BACKENDS[resolve_backend(backend, device)]


def ema_update_(ema: list[Tensor], student: list[Tensor], decay: float,
                shadow: list[Tensor] | None = None, *, backend: str = "auto") -> None:
    """ema[i] <- decay * ema[i] + (1 - decay) * student[i] in place; shadow[i] <- ema[i].

    Args:
        ema: fp32 tensors (the teacher's master weights), updated in place.
        student: tensors of the same shapes, fp32, bf16 or fp16.
        decay: EMA decay in [0, 1].
        shadow: optional tensors of the same shapes in the teacher's compute dtype (e.g. bf16),
            overwritten with the updated ema.
        backend: "auto" | "reference" | "triton" | "cpp".
    """
    device = ema[0].device if ema else torch.device("cpu")
    _backend_for(backend, device).ema_update_(ema, student, decay, shadow)


def make_targets(layers: Sequence[Tensor], *, layer_norm: str, final_norm: str = "none",
                 mask: Tensor | None = None, padding_mask: Tensor | None = None,
                 eps: float = 1e-5, backend: str = "auto", repeat: int = 1) -> Tensor:
    """Regression targets: the average of the normalised top-K teacher outputs, in fp32.

    Args:
        layers: K >= 1 tensors [B, T, C], any float dtype.
        layer_norm: "instance" (per (b, c) over valid T) | "layer" (per (b, t) over C) | "none".
        final_norm: the same choices, applied to the average.
        mask: [B*repeat, T] bool, True = masked: return only those rows; rows b*repeat + j
            (j < repeat) mask the clones of sample b (repeat_interleave order).
        padding_mask: [B, T] bool, True = padding, left out of the instance-norm statistics.
        eps: added to the variance inside the square root.
        backend: "auto" | "reference" | "triton" | "cpp".
        repeat: M >= 1 masked clones per teacher sample (data2vec 2.0); each sample's targets
            are computed once and serve all its clones. M > 1 needs a mask.

    Returns:
        [M_rows, C] fp32 rows at the masked positions in row-major order of the [B*repeat, T]
        mask (row (r, t) is the target of sample r // repeat at step t), or [B, T, C] fp32 when
        mask is None (padded rows are 0).
    """
    if not layers:
        raise ValueError("make_targets needs at least one layer (K >= 1)")
    impl = _backend_for(backend, layers[0].device).make_targets
    return impl(layers, layer_norm=layer_norm, final_norm=final_norm, mask=mask,
                padding_mask=padding_mask, eps=eps, repeat=repeat)


def regression_loss(pred: Tensor, target: Tensor, *, beta: float, scale: float = 1.0,
                    reduction: str = "sum", backend: str = "auto") -> Tensor:
    """Squared error (beta == 0) or smooth L1 (beta > 0), summed over C, times scale, in fp32.

    Args:
        pred: [M, C] any float dtype; the loss is differentiable in it.
        target: [M, C] any float dtype.
        beta: 0 for squared error, else the smooth-L1 threshold.
        scale: multiplies each row's sum.
        reduction: "sum" | "mean" over rows (the mean of zero rows is 0) | "none".
        backend: "auto" | "reference" | "triton" | "cpp".

    Returns:
        fp32 scalar, or [M] fp32 for reduction "none".
    """
    impl = _backend_for(backend, pred.device).regression_loss
    return impl(pred, target, beta=beta, scale=scale, reduction=reduction)
