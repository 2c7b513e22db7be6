"""The C++ backend: the three fused ops on CPU tensors, from the extension `d2v_engine._C`.

Importing this module raises ImportError when the extension is not built (`D2V_SKIP_EXT=1`, no
compiler); `d2v_engine.ops` then simply does not offer the "cpp" backend. The functions have the
reference's signatures and raise the reference's errors (its `check_*_args` run first). Inputs
the kernels have no native path for (float64, a non-contiguous channel dimension) are converted
here; everything else goes to C++ untouched.

`make_targets` and the regression-loss kernels are also `torch.library` custom ops with fake
(shape) functions, used while `torch.compile` traces, so that it can trace through them;
`RegressionLossFunction` adds the gradient, which the forward kernel has already computed.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from d2v_engine import _C
from d2v_engine.ops.reference import (
    check_ema_args,
    check_loss_args,
    check_targets_args,
    ema_update_ref,
)

__all__ = ["ema_update_", "make_targets", "regression_loss", "RegressionLossFunction"]

_NATIVE = (torch.float32, torch.bfloat16, torch.float16)
_NORM_CODES = {"none": 0, "instance": 1, "layer": 2}


def _require_cpu(op: str, tensor: Tensor) -> None:
    if tensor.device.type != "cpu":
        raise ValueError(f"{op}: the cpp backend runs on CPU tensors, got one on {tensor.device}; "
                         f"use backend='auto'")


def _traced(custom_op, kernel):
    """The custom op while torch.compile traces (it sees the fake function), else the kernel
    itself: in eager mode the op's dispatch adds only overhead (and imports torch._dynamo)."""
    return custom_op if torch.compiler.is_compiling() else kernel


# ema_update_ ----------------------------------------------------------------------------------

def ema_update_(ema: list[Tensor], student: list[Tensor], decay: float,
                shadow: list[Tensor] | None = None) -> None:
    """ema[i] <- decay * ema[i] + (1 - decay) * student[i] in place; shadow[i] <- ema[i].

    The hot path is one C++ call: it finds the plan cached for exactly these tensors (data
    pointers, dtypes, shapes) and runs it. Only on a miss (first call, new tensors) are the
    arguments validated here and a plan built.

    Args:
        ema: fp32 tensors (the teacher's master weights), updated in place.
        student: tensors of the same shapes, fp32, bf16 or fp16.
        decay: EMA decay in [0, 1].
        shadow: optional tensors of the same shapes (e.g. bf16), overwritten with the new ema.
    """
    if _C.ema_update_cached(ema, student, shadow, decay):
        return
    check_ema_args(ema, student, decay, shadow)
    if ema:
        _require_cpu("ema_update_", ema[0])
    native = [i for i in range(len(ema)) if _ema_native(i, ema, student, shadow)]
    if len(native) == len(ema):
        _C.ema_update_(ema, student, shadow, decay)
        return
    # Rare layouts (non-contiguous, float64 shadow): the kernel takes the rest, the reference these.
    others = sorted(set(range(len(ema))) - set(native))
    if native:
        _C.ema_update_(_pick(ema, native), _pick(student, native), _pick(shadow, native), decay)
    ema_update_ref(_pick(ema, others), _pick(student, others), decay, _pick(shadow, others))


def _pick(tensors: list[Tensor] | None, indices: list[int]) -> list[Tensor] | None:
    return None if tensors is None else [tensors[i] for i in indices]


def _ema_native(i: int, ema: list[Tensor], student: list[Tensor],
                shadow: list[Tensor] | None) -> bool:
    group = [ema[i], student[i]] + ([] if shadow is None else [shadow[i]])
    return all(t.device.type == "cpu" and t.is_contiguous() and t.dtype in _NATIVE for t in group)


# make_targets ---------------------------------------------------------------------------------

@torch.library.custom_op("d2v_cpp::make_targets", mutates_args=())
def _make_targets_op(layers: list[Tensor], layer_norm: int, final_norm: int,
                     mask: Tensor | None, padding_mask: Tensor | None, eps: float,
                     repeat: int) -> Tensor:
    return _C.make_targets(layers, layer_norm, final_norm, mask, padding_mask, eps, repeat)


@_make_targets_op.register_fake
def _(layers, layer_norm, final_norm, mask, padding_mask, eps, repeat):
    batch, steps, channels = layers[0].shape
    if mask is None:
        return layers[0].new_empty((batch, steps, channels), dtype=torch.float32)
    rows = torch.library.get_ctx().new_dynamic_size()  # data-dependent: mask.sum()
    return layers[0].new_empty((rows, channels), dtype=torch.float32)


def make_targets(layers: Sequence[Tensor], *, layer_norm: str, final_norm: str = "none",
                 mask: Tensor | None = None, padding_mask: Tensor | None = None,
                 eps: float = 1e-5, repeat: int = 1) -> Tensor:
    """Average of the parameter-free normalised top-K teacher outputs, in fp32 (not differentiable).

    Args:
        layers: K >= 1 tensors [B, T, C], any float dtype; any strides (a non-contiguous C is
            copied first).
        layer_norm: "instance" (per (b, c) over the valid steps of T) | "layer" (per (b, t) over
            C) | "none".
        final_norm: the same choices, applied to the average.
        mask: [B * repeat, T] bool, True = masked: return only those rows.
        padding_mask: [B, T] bool, True = padding, left out of the instance-norm statistics.
        eps: added to the variance.
        repeat: masked copies per sample: a source row that several copies select is computed
            once and copied to their output rows.

    Returns:
        [M, C] fp32 (rows in row-major (r, t) order) when mask is given, else [B, T, C] fp32.
        Padded rows are 0.
    """
    check_targets_args(layers, layer_norm, final_norm, mask, padding_mask, repeat)
    _require_cpu("make_targets", layers[0])
    native = [_native_layer(x) for x in layers]
    mask = None if mask is None else mask.contiguous()
    padding_mask = None if padding_mask is None else padding_mask.contiguous()
    return _traced(_make_targets_op, _C.make_targets)(
        native, _NORM_CODES[layer_norm], _NORM_CODES[final_norm], mask, padding_mask, float(eps),
        int(repeat))


def _native_layer(x: Tensor) -> Tensor:
    """x as the kernel reads it: fp32/bf16/fp16 with a contiguous C (strides of B, T are free)."""
    if x.dtype not in _NATIVE:
        x = x.float()
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    return x.detach()


# regression_loss ------------------------------------------------------------------------------

@torch.library.custom_op("d2v_cpp::regression_loss_fwd", mutates_args=())
def _regression_loss_op(pred: Tensor, target: Tensor, beta: float, scale: float, mean: bool,
                        need_grad: bool) -> tuple[Tensor, Tensor]:
    return _C.regression_loss_fwd(pred, target, beta, scale, mean, need_grad)


@_regression_loss_op.register_fake
def _(pred, target, beta, scale, mean, need_grad):
    rows = pred.new_empty(pred.shape[0], dtype=torch.float32)
    grad = pred.new_empty(pred.shape if need_grad else (0,), dtype=torch.float32)
    return rows, grad


@torch.library.custom_op("d2v_cpp::regression_loss_bwd", mutates_args=())
def _regression_loss_bwd_op(grad: Tensor, upstream: Tensor, dtype_code: int) -> Tensor:
    return _C.regression_loss_bwd(grad, upstream, dtype_code)


@_regression_loss_bwd_op.register_fake
def _(grad, upstream, dtype_code):
    return torch.empty_like(grad, dtype=_NATIVE[dtype_code])


class RegressionLossFunction(torch.autograd.Function):
    """Loss and gradient from one C++ pass; backward scales the stored gradient.

    forward(pred [M, C], target [M, C], beta, scale, reduction, need_grad) -> fp32 scalar or [M].
    The gradient is kept in fp32 (one rounding to pred's dtype, in backward, as the reference).
    """

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, beta: float, scale: float, reduction: str,
                need_grad: bool) -> Tensor:
        rows_count = pred.shape[0]
        rows, grad = _traced(_regression_loss_op, _C.regression_loss_fwd)(
            _native_loss_input(pred), _native_loss_input(target), float(beta), float(scale),
            reduction == "mean", need_grad)
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.pred_dtype = pred.dtype
        if reduction == "none":
            return rows
        total = rows.sum()
        return total / max(rows_count, 1) if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, upstream: Tensor):
        (grad,) = ctx.saved_tensors
        dtype = ctx.pred_dtype
        # (A traced graph cannot branch on a value: under torch.compile it always scales.)
        unit = upstream.dim() == 0 and not torch.compiler.is_compiling() \
            and bool(upstream == 1.0)
        if unit and dtype == torch.float32:
            return grad, None, None, None, None, None
        code = _NATIVE.index(dtype) if dtype in _NATIVE else 0
        grad = _traced(_regression_loss_bwd_op, _C.regression_loss_bwd)(grad, upstream.detach(),
                                                                        code)
        return grad.to(dtype), None, None, None, None, None


def _native_loss_input(x: Tensor) -> Tensor:
    if x.dtype not in _NATIVE:
        x = x.float()
    return x.detach().contiguous()


def regression_loss(pred: Tensor, target: Tensor, *, beta: float, scale: float = 1.0,
                    reduction: str = "sum") -> Tensor:
    """Squared error (beta == 0) or smooth L1 (beta > 0), summed over C, times scale, in fp32.

    Args:
        pred: [M, C] any float dtype; the loss is differentiable in it.
        target: [M, C] any float dtype (not differentiated).
        beta: 0 for squared error, else the smooth-L1 threshold.
        scale: multiplies each row's sum.
        reduction: "sum" | "mean" over rows (the mean of zero rows is 0) | "none" ([M]).

    Returns:
        fp32 scalar, or [M] fp32 for reduction "none".
    """
    check_loss_args(pred, target, beta, reduction)
    _require_cpu("regression_loss", pred)
    # (Inside forward, needs_input_grad ignores torch.no_grad(): decide here whether the kernel
    # writes a gradient.)
    need_grad = pred.requires_grad and torch.is_grad_enabled()
    return RegressionLossFunction.apply(pred, target, beta, scale, reduction, need_grad)
