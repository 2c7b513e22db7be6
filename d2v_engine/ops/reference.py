"""The readable fp32 specification of the three fused ops (DESIGN.md §4).

Every other backend (Triton, C++) is tested against these functions; they favour clarity over speed
but are exact enough to serve as the reference: statistics are computed in fp32 with a shifted
two-pass formula, so inputs with a large common offset (1e4 + noise) keep their precision, where
the one-pass E[x^2] - E[x]^2 would cancel catastrophically.

The argument checks (`check_*`) are shared with the other backends so all of them fail alike.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

NORMS = ("instance", "layer", "none")
REDUCTIONS = ("sum", "mean", "none")
STUDENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_ema_args(ema: list[Tensor], student: list[Tensor], decay: float,
                   shadow: list[Tensor] | None) -> None:
    """Raises ValueError/TypeError unless `ema_update_`'s arguments match its contract."""
    if len(ema) != len(student) or (shadow is not None and len(shadow) != len(ema)):
        counts = f"{len(ema)} ema, {len(student)} student"
        counts += "" if shadow is None else f", {len(shadow)} shadow"
        raise ValueError(f"ema_update_ needs lists of equal length, got {counts} tensors")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema decay must lie in [0, 1], got {decay}")
    for i, (e, s) in enumerate(zip(ema, student)):
        if e.dtype != torch.float32:
            raise TypeError(f"ema[{i}] must be float32, got {e.dtype}")
        if s.dtype not in STUDENT_DTYPES:
            raise TypeError(f"student[{i}] must be float32, bfloat16 or float16, got {s.dtype}")
        others = [s] if shadow is None else [s, shadow[i]]
        for other in others:
            if other.shape != e.shape or other.device != e.device:
                raise ValueError(f"tensor {i}: ema {tuple(e.shape)} on {e.device} does not match "
                                 f"{tuple(other.shape)} on {other.device}")
        if shadow is not None and not shadow[i].is_floating_point():
            raise TypeError(f"shadow[{i}] must be a float tensor, got {shadow[i].dtype}")


def check_targets_args(layers: Sequence[Tensor], layer_norm: str, final_norm: str,
                       mask: Tensor | None, padding_mask: Tensor | None, repeat: int = 1) -> None:
    """Raises ValueError/TypeError unless `make_targets`' arguments match its contract."""
    if len(layers) < 1:
        raise ValueError("make_targets needs at least one layer (K >= 1)")
    if layer_norm not in NORMS or final_norm not in NORMS:
        raise ValueError(f"layer_norm={layer_norm!r} and final_norm={final_norm!r} must be one "
                         f"of {NORMS}")
    first = layers[0]
    if first.dim() != 3:
        raise ValueError(f"layers must be [B, T, C], got {tuple(first.shape)}")
    for k, layer in enumerate(layers):
        if layer.shape != first.shape or layer.device != first.device:
            raise ValueError(f"layers[{k}] is {tuple(layer.shape)} on {layer.device}, "
                             f"layers[0] is {tuple(first.shape)} on {first.device}")
        if not layer.is_floating_point():
            raise TypeError(f"layers[{k}] must be a float tensor, got {layer.dtype}")
    if isinstance(repeat, bool) or not isinstance(repeat, int):
        raise TypeError(f"repeat must be an int, got {type(repeat).__name__}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1 (masked copies per sample), got {repeat}")
    if repeat > 1 and mask is None:
        raise ValueError(f"repeat={repeat} needs a mask [B*repeat, T]: without one every clone's "
                         f"targets are the sample's")
    batch, steps = first.shape[:2]
    for name, m, shape in (("mask", mask, (batch * repeat, steps)),
                           ("padding_mask", padding_mask, (batch, steps))):
        if m is not None and (m.dtype != torch.bool or m.shape != shape):
            raise ValueError(f"{name} must be bool {shape}, got {m.dtype} {tuple(m.shape)}")


def check_loss_args(pred: Tensor, target: Tensor, beta: float, reduction: str) -> None:
    """Raises ValueError/TypeError unless `regression_loss`' arguments match its contract."""
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be [M, C], got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if not (pred.is_floating_point() and target.is_floating_point()):
        raise TypeError(f"pred and target must be float tensors, got {pred.dtype}, {target.dtype}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0 (0 = squared error), got {beta}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be one of {REDUCTIONS}")


@torch.no_grad()
def ema_update_ref(ema: list[Tensor], student: list[Tensor], decay: float,
                   shadow: list[Tensor] | None = None) -> None:
    """ema[i] <- decay * ema[i] + (1 - decay) * student[i] in place, in fp32.

    Args:
        ema: fp32 tensors (the teacher's master weights), updated in place.
        student: tensors of the same shapes, fp32, bf16 or fp16.
        decay: EMA decay in [0, 1].
        shadow: optional tensors of the same shapes in any float dtype (the teacher's compute
            copy); shadow[i] <- ema[i], cast, after the update.
    """
    check_ema_args(ema, student, decay, shadow)
    for i, (e, s) in enumerate(zip(ema, student)):
        e.mul_(decay).add_(s.float(), alpha=1.0 - decay)
        if shadow is not None:
            shadow[i].copy_(e)


def make_targets_ref(layers: Sequence[Tensor], *, layer_norm: str, final_norm: str = "none",
                     mask: Tensor | None = None, padding_mask: Tensor | None = None,
                     eps: float = 1e-5, repeat: int = 1) -> Tensor:
    """Average of the parameter-free normalised top-K teacher outputs, in fp32.

    Args:
        layers: K >= 1 tensors [B, T, C], any float dtype (views and transposes are fine).
        layer_norm: per-layer norm: "instance" (per (b, c) over the valid steps of T), "layer"
            (per (b, t) over C) or "none"; biased variance, eps inside the square root, no affine.
        final_norm: the same choices, applied to the average.
        mask: [B*repeat, T] bool, True = masked: return only those rows. Rows b*repeat + j
            (j < repeat) are the masks of the clones of sample b (repeat_interleave order).
        padding_mask: [B, T] bool, True = padding: left out of the instance-norm statistics.
        eps: added to the variance.
        repeat: M >= 1 masked clones per sample (data2vec 2.0); M > 1 needs a mask.

    Returns:
        [M_rows, C] fp32 (M_rows = mask.sum(), rows in row-major (r, t) order of the mask, row
        (r, t) being the target of sample r // repeat at step t) when mask is given, else
        [B, T, C] fp32. Padded rows are 0.
    """
    check_targets_args(layers, layer_norm, final_norm, mask, padding_mask, repeat)
    valid = None if padding_mask is None else ~padding_mask
    total = _normalise(layers[0].float(), layer_norm, valid, eps)
    for layer in layers[1:]:
        total = total + _normalise(layer.float(), layer_norm, valid, eps)
    target = _normalise(total / len(layers), final_norm, valid, eps)
    if padding_mask is not None:
        target = target.masked_fill(padding_mask[..., None], 0.0)
    return target if mask is None else gather_rows(target, mask, repeat)


def gather_rows(targets: Tensor, mask: Tensor, repeat: int = 1) -> Tensor:
    """The rows of the clones' masks, gathered from the samples' targets (never repeated first).

    Args:
        targets: [B, T, C], the targets of each sample.
        mask: [B*repeat, T] bool; row r masks a clone of sample r // repeat.
        repeat: clones per sample.

    Returns:
        [mask.sum(), C]: targets[r // repeat, t] for each True (r, t), in row-major order.
    """
    clone, step = mask.nonzero(as_tuple=True)  # row-major, as targets[mask] when repeat is 1
    return targets[clone // repeat, step]


def _normalise(x: Tensor, norm: str, valid: Tensor | None, eps: float) -> Tensor:
    """x: [B, T, C] fp32; valid: [B, T] bool or None. Returns [B, T, C] fp32."""
    if norm == "instance":
        return _instance_norm(x, valid, eps)
    if norm == "layer":
        return _layer_norm(x, eps)
    return x


def _layer_norm(x: Tensor, eps: float) -> Tensor:
    """Per (b, t) over C. x: [B, T, C] fp32. Returns [B, T, C] fp32."""
    # Shifting by one element of the row first makes the fp32 mean exact enough even when the
    # row shares a large offset (subtracting two close floats is exact).
    shifted = x - x[..., :1]
    centred = shifted - shifted.mean(dim=-1, keepdim=True)
    var = centred.square().mean(dim=-1, keepdim=True)
    return centred / torch.sqrt(var + eps)


def _instance_norm(x: Tensor, valid: Tensor | None, eps: float) -> Tensor:
    """Per (b, c) over the valid steps of T. x: [B, T, C] fp32, valid: [B, T] bool or None.

    Returns:
        [B, T, C] fp32; padded steps (and rows without a valid step) are 0.
    """
    batch, steps, _ = x.shape
    if valid is None:
        valid = torch.ones(batch, steps, dtype=torch.bool, device=x.device)
    weight = valid[..., None].float()
    count = weight.sum(dim=1, keepdim=True).clamp(min=1.0)
    # Shift by the first valid step (see _layer_norm): padding may hold anything.
    first = valid.long().argmax(dim=1)
    shifted = x - x[torch.arange(batch, device=x.device), first][:, None, :]
    mean = (shifted * weight).sum(dim=1, keepdim=True) / count
    centred = (shifted - mean) * weight
    var = centred.square().sum(dim=1, keepdim=True) / count
    return centred / torch.sqrt(var + eps)


def regression_loss_ref(pred: Tensor, target: Tensor, *, beta: float, scale: float = 1.0,
                        reduction: str = "sum") -> Tensor:
    """Squared error (beta == 0) or smooth L1 (beta > 0), summed over C, in fp32.

    smooth L1: 0.5 x^2 / beta where |x| < beta, else |x| - 0.5 beta, with x = pred - target.

    Args:
        pred: [M, C] any float dtype; the loss is differentiable in it.
        target: [M, C] any float dtype.
        beta: 0 for squared error, else the smooth-L1 threshold.
        scale: multiplies each row's sum (data2vec audio: 1 / sqrt(C)).
        reduction: "sum" or "mean" over rows (a scalar; the mean of zero rows is 0, so a batch
            without masked positions contributes nothing), or "none" ([M]).

    Returns:
        fp32 scalar, or [M] fp32 for reduction "none".
    """
    check_loss_args(pred, target, beta, reduction)
    diff = pred.float() - target.float()
    if beta == 0:
        elementwise = diff.square()
    else:
        magnitude = diff.abs()
        elementwise = torch.where(magnitude < beta, 0.5 * diff.square() / beta,
                                  magnitude - 0.5 * beta)
    rows = elementwise.sum(dim=-1) * scale
    if reduction == "none":
        return rows
    if reduction == "mean":
        return rows.sum() / max(rows.shape[0], 1)
    return rows.sum()
