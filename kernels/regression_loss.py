"""Fused regression loss: the loss rows and the gradient in one pass over pred and target.

With x = pred - target (fp32 whatever the input dtypes):

    beta == 0 (squared error):  l(x) = x^2                                     l'(x) = 2 x
    beta > 0  (smooth L1):      l(x) = 0.5 x^2 / beta   if |x| < beta          l'(x) = x / beta
                                       |x| - 0.5 beta   otherwise                      sign(x)
    rows[m] = scale * sum_c l(x[m, c])          grad[m, c] = scale * l'(x[m, c])

`reduction` is applied to `rows` afterwards ("sum", "mean" over rows with the mean of zero rows = 0,
"none"). The forward stores `grad` in fp32, so the backward is a scale by the upstream gradient:
pred and target are read once in all, and nothing else is kept for the backward. fp32 rather than
pred's dtype because the scaled gradient is then rounded once, like PyTorch's: a bf16 copy would
be rounded twice, up to twice PyTorch's error, for 4 bytes less per element in total.

Layout: Triton kernel -> launcher (2-D [M, C], any strides) -> `torch.library.triton_op`
registration (so that `torch.compile` sees the kernel) -> `RegressionLossFunction`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from d2v_engine.kernels._rounding import round_to

__all__ = ["RegressionLossFunction", "regression_loss"]

# Elements per program: enough in flight to hide latency on a GPU, few programs in the interpreter.
_TILE = 4096
_MAX_BLOCK_C = 1024


# ---------------------------------------------------------------------------------- Triton kernel
@triton.jit
def _regression_loss_fwd_kernel(pred_ptr, target_ptr, rows_ptr, grad_ptr, M, C,
                                stride_pm, stride_pc, stride_tm, stride_tc,
                                beta, scale,
                                SMOOTH: tl.constexpr, STORE_GRAD: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: BLOCK_M rows, looping over C in BLOCK_C chunks; writes rows[] and grad[]."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)  # M * C may pass 2^31 elements
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < C)[None, :]
        p = tl.load(pred_ptr + rows64[:, None] * stride_pm + cols[None, :] * stride_pc,
                    mask=ok, other=0.0).to(tl.float32)
        t = tl.load(target_ptr + rows64[:, None] * stride_tm + cols[None, :] * stride_tc,
                    mask=ok, other=0.0).to(tl.float32)
        x = p - t
        if SMOOTH:
            magnitude = tl.abs(x)
            small = magnitude < beta
            loss = tl.where(small, 0.5 * x * x / beta, magnitude - 0.5 * beta)
            slope = tl.where(small, x / beta, tl.where(x > 0, 1.0, -1.0))
        else:
            loss = x * x
            slope = 2.0 * x
        # Masked lanes load 0 - 0, whose loss is 0 in both formulas: no extra select needed.
        total += tl.sum(loss, axis=1)
        if STORE_GRAD:
            # grad is a fresh contiguous fp32 [M, C] buffer.
            tl.store(grad_ptr + rows64[:, None] * C + cols[None, :], slope * scale, mask=ok)
    tl.store(rows_ptr + rows, total * scale, mask=row_ok)


@triton.jit
def _regression_loss_bwd_kernel(grad_ptr, upstream_ptr, out_ptr, M, C, factor,
                                ROW_WISE: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_C: tl.constexpr):
    """out = grad * upstream * factor (upstream: one value, or one per row), fp32 math."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    if ROW_WISE:
        up = tl.load(upstream_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) * factor
    else:
        up = tl.load(upstream_ptr).to(tl.float32) * factor + tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < C)[None, :]
        offs = rows64[:, None] * C + cols[None, :]
        g = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, round_to(g * up[:, None], out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------- launcher
def _blocks(rows: int, channels: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C): a tile of about _TILE elements, C first (the contiguous axis)."""
    block_c = min(triton.next_power_of_2(max(channels, 1)), _MAX_BLOCK_C)
    block_m = max(1, min(_TILE // block_c, triton.next_power_of_2(max(rows, 1))))
    return block_m, block_c


@torch.library.triton_op("d2v_triton::regression_loss_fwd", mutates_args=())
def regression_loss_fwd(pred: Tensor, target: Tensor, beta: float, scale: float,
                        need_grad: bool) -> tuple[Tensor, Tensor]:
    """Loss rows and d(rows)/d(pred) for pred, target [M, C] (any strides, any float dtypes).

    Returns:
        (rows [M] fp32, grad [M, C] fp32); grad is a 1-element placeholder when `need_grad` is
        False (no gradient is written then).
    """
    m, c = pred.shape
    rows = torch.empty(m, dtype=torch.float32, device=pred.device)
    # The placeholder keeps the kernel's grad pointer valid without writing [M, C] for nothing.
    grad = torch.empty((m, c) if need_grad else (1,), dtype=torch.float32, device=pred.device)
    if m == 0:
        return rows, grad
    if c == 0:
        return rows.zero_(), grad
    block_m, block_c = _blocks(m, c)
    grid = ((m + block_m - 1) // block_m,)
    torch.library.wrap_triton(_regression_loss_fwd_kernel)[grid](
        pred, target, rows, grad, m, c,
        pred.stride(0), pred.stride(1), target.stride(0), target.stride(1),
        float(beta), float(scale),
        SMOOTH=beta > 0, STORE_GRAD=need_grad, BLOCK_M=block_m, BLOCK_C=block_c)
    return rows, grad


@regression_loss_fwd.register_fake
def _(pred, target, beta, scale, need_grad):
    # Written out rather than derived by tracing the body: under TRITON_INTERPRET=1 the kernel is
    # a plain Python function that cannot run on fake tensors.
    m, c = pred.shape
    rows = pred.new_empty((m,), dtype=torch.float32)
    return rows, pred.new_empty((m, c) if need_grad else (1,), dtype=torch.float32)


@torch.library.triton_op("d2v_triton::regression_loss_bwd", mutates_args=())
def regression_loss_bwd(grad: Tensor, upstream: Tensor, factor: float,
                        dtype: torch.dtype) -> Tensor:
    """grad [M, C] fp32 (contiguous) times upstream (0-d, or [M] per row) times factor.

    Returns:
        [M, C] in `dtype` (pred's), rounded once.
    """
    m, c = grad.shape
    out = torch.empty((m, c), dtype=dtype, device=grad.device)
    if m == 0 or c == 0:
        return out
    block_m, block_c = _blocks(m, c)
    grid = ((m + block_m - 1) // block_m,)
    torch.library.wrap_triton(_regression_loss_bwd_kernel)[grid](
        grad, upstream, out, m, c, float(factor),
        ROW_WISE=upstream.dim() == 1, BLOCK_M=block_m, BLOCK_C=block_c)
    return out


@regression_loss_bwd.register_fake
def _(grad, upstream, factor, dtype):
    return grad.new_empty(grad.shape, dtype=dtype)


# ---------------------------------------------------------------------------------- autograd
class RegressionLossFunction(torch.autograd.Function):
    """Loss with the gradient precomputed in the forward; the backward only scales it."""

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, beta: float, scale: float,
                reduction: str) -> Tensor:
        need_grad = ctx.needs_input_grad[0]
        rows, grad = torch.ops.d2v_triton.regression_loss_fwd(pred, target, beta, scale,
                                                             need_grad)
        ctx.reduction, ctx.rows, ctx.dtype = reduction, rows.shape[0], pred.dtype
        if need_grad:
            ctx.save_for_backward(grad)
        if reduction == "none":
            return rows
        total = rows.sum()
        return total / max(rows.shape[0], 1) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, upstream: Tensor):
        (grad,) = ctx.saved_tensors
        factor = 1.0 / max(ctx.rows, 1) if ctx.reduction == "mean" else 1.0
        # The only work of the backward: one read and one write of an [M, C] tensor. A fresh
        # output, not in place: a second backward (retain_graph=True) needs the saved gradient.
        scaled = torch.ops.d2v_triton.regression_loss_bwd(grad, upstream.contiguous(), factor,
                                                          ctx.dtype)
        return scaled, None, None, None, None


def regression_loss(pred: Tensor, target: Tensor, *, beta: float, scale: float = 1.0,
                    reduction: str = "sum") -> Tensor:
    """Squared error (beta == 0) or smooth L1 (beta > 0), summed over C, times scale, fp32 math.

    Args:
        pred: [M, C] any float dtype, differentiable.
        target: [M, C] any float dtype (a constant: it gets no gradient).
        beta: 0 for squared error, else the smooth-L1 threshold.
        scale: multiplies each row's sum.
        reduction: "sum" | "mean" over rows (the mean of zero rows is 0) | "none".

    Returns:
        fp32 scalar, or [M] fp32 for reduction "none".
    """
    return RegressionLossFunction.apply(pred, target, float(beta), float(scale), reduction)
