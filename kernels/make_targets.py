"""Fused data2vec targets: per-layer norm, average over the top K layers, final norm, masked rows.

For K layers x_k [B, T, C] (any float dtype, any strides), in fp32:

    instance norm  n(x)[b, t, c] = (x[b, t, c] - mu[b, c]) / sqrt(var[b, c] + eps), with mu and
                   the biased var taken over the valid (non-padding) steps t of (b, c)
    layer norm     n(x)[b, t, c] = (x[b, t, c] - mu[b, t]) / sqrt(var[b, t] + eps), over c
    y = final_norm( (sum_k layer_norm(x_k)) / K ),   y[padded (b, t)] = 0
    output: y[mask] as [M, C] (rows in row-major (b, t) order), or y as [B, T, C] when mask is None;
            with repeat R (data2vec 2.0's masked clones), mask is [B*R, T] and its row (r, t) is
            y[r // R, t]

Statistics are shifted (by the first valid element of the row or column: the subtraction of two
close floats is exact, so a large common offset such as 1e4 + noise keeps its precision) and, over
time, combined chunk by chunk with Chan's parallel formula: never the naive E[x^2] - E[x]^2.

Memory traffic: each layer is read at most twice - the instance-norm statistics read the valid steps
once (`_make_targets_stats_kernel`), the row kernel (`_make_targets_fwd_kernel`) reads only the
output rows once - and only the output rows are written. A final instance norm needs the statistics
of the average, so then the average is written to an fp32 scratch [B, T, C] first and normalised
from there (the layers are still read at most twice). With repeat R the row table maps each output
row to its source row, which is computed again for each clone that masks it: the clones of a
sample are adjacent output rows, so the programs in flight share one sample's K rows of [T, C]
(3 MiB at image base), and the re-reads come from L2, not from memory.

Layout: Triton kernels -> launchers (layers as a device table of addresses and strides) ->
`torch.library.custom_op` registration with a fake whose row count is a dynamic size (so that
`torch.compile` can trace a caller; the op is opaque to it because the kernel reaches the K layers
through raw addresses) -> `make_targets`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["make_targets", "TargetKernels", "finish_targets", "row_table"]

NORM_CODES = {"none": 0, "layer": 1, "instance": 2}
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64}
# About this many elements per program in the row kernel (rows x padded C).
_ROW_TILE = 4096
_STATS_BLOCK_T, _STATS_BLOCK_C = 32, 128


# ---------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _layer_ref(addr_ptr, strides_ptr, k, LAYER_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
               VEC: tl.constexpr):
    """Layer k's data pointer and (b, t, c) strides from the tables."""
    x_ptr = tl.load(addr_ptr + k).to(tl.pointer_type(LAYER_DTYPE))
    stride_b = tl.load(strides_ptr + 3 * k)
    stride_t = tl.load(strides_ptr + 3 * k + 1)
    stride_c = tl.load(strides_ptr + 3 * k + 2)
    if ALIGNED:
        # 16-byte aligned layer and row starts (checked by the launcher): values read from memory
        # have no known alignment, and without it the compiler cannot use 128-bit accesses.
        x_ptr = tl.multiple_of(x_ptr, 16)
        stride_b = tl.multiple_of(stride_b, VEC)
        stride_t = tl.multiple_of(stride_t, VEC)
    return x_ptr, stride_b, stride_t, stride_c


@triton.jit
def _layer_norm_rows(x, cols, c_ok, C, eps):
    """Layer norm of each row of x [R, BLOCK_C] over its C valid columns (shifted two-pass)."""
    first = tl.sum(tl.where(cols[None, :] == 0, x, 0.0), axis=1)
    shifted = tl.where(c_ok[None, :], x - first[:, None], 0.0)
    mean = tl.sum(shifted, axis=1) / C
    centred = tl.where(c_ok[None, :], shifted - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / C
    return centred / tl.sqrt_rn(var + eps)[:, None]


@triton.jit
def _make_targets_stats_kernel(addr_ptr, strides_ptr, pad_ptr, first_ptr, stats_ptr,
                               B, T, C, eps,
                               LAYER_DTYPE: tl.constexpr, HAS_PADDING: tl.constexpr,
                               UNIT_STRIDE_C: tl.constexpr, ALIGNED: tl.constexpr,
                               VEC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Instance-norm statistics of layer k, batch b, a block of channels: one pass over T.

    Writes stats[k, b, :, c] = (shift, mean of x - shift, sqrt(var + eps)) over the valid steps.
    """
    k = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    x_ptr, stride_b, stride_t, stride_c = _layer_ref(addr_ptr, strides_ptr, k, LAYER_DTYPE,
                                                     ALIGNED, VEC)
    col = cols if UNIT_STRIDE_C else cols * stride_c
    column = x_ptr + b.to(tl.int64) * stride_b + col  # [BLOCK_C] pointers
    first = tl.load(first_ptr + b) if HAS_PADDING else 0
    shift = tl.load(column + first * stride_t, mask=c_ok, other=0.0).to(tl.float32)

    count = 0.0
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        steps = t0 + tl.arange(0, BLOCK_T)
        valid = steps < T
        if HAS_PADDING:
            valid &= tl.load(pad_ptr + b * T + steps, mask=valid, other=1) == 0
        weight = valid.to(tl.float32)
        x = tl.load(column[None, :] + steps.to(tl.int64)[:, None] * stride_t,
                    mask=valid[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        shifted = (x - shift[None, :]) * weight[:, None]
        # This chunk's statistics by the two-pass formula, in registers...
        n_chunk = tl.sum(weight, axis=0)
        mean_chunk = tl.sum(shifted, axis=0) / tl.maximum(n_chunk, 1.0)
        dev = (shifted - mean_chunk[None, :]) * weight[:, None]
        m2_chunk = tl.sum(dev * dev, axis=0)
        # ...merged into the running ones with Chan's formula (exact when a chunk is empty).
        total = count + n_chunk
        delta = mean_chunk - mean
        frac = n_chunk / tl.maximum(total, 1.0)
        mean += delta * frac
        m2 += m2_chunk + delta * delta * count * frac
        count = total
    std = tl.sqrt_rn(m2 / tl.maximum(count, 1.0) + eps)
    out = stats_ptr + (k * B + b).to(tl.int64) * 3 * C + cols
    tl.store(out, shift, mask=c_ok)
    tl.store(out + C, mean, mask=c_ok)
    tl.store(out + 2 * C, std, mask=c_ok)


@triton.jit
def _make_targets_fwd_kernel(addr_ptr, strides_ptr, stats_ptr, pad_ptr, rows_ptr, out_ptr,
                             R, B, T, C, K, divisor, eps,
                             LAYER_DTYPE: tl.constexpr, LAYER_NORM: tl.constexpr,
                             FINAL_LAYER_NORM: tl.constexpr, HAS_ROWS: tl.constexpr,
                             HAS_PADDING: tl.constexpr, ACCUMULATE: tl.constexpr,
                             UNIT_STRIDE_C: tl.constexpr, ALIGNED: tl.constexpr,
                             VEC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """BLOCK_R output rows: normalise and sum the K layers' rows, divide, final layer norm, store.

    Output row j is source row rows[j] (or j without a row table) of the flattened [B*T] grid.
    LAYER_NORM: 0 none, 1 layer, 2 instance (from stats). ACCUMULATE adds to what `out` holds.
    """
    j = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j_ok = j < R
    src = tl.load(rows_ptr + j, mask=j_ok, other=0) if HAS_ROWS else j.to(tl.int64)
    b = src // T
    t = src - b * T
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    ok = j_ok[:, None] & c_ok[None, :]
    out_offs = j.to(tl.int64)[:, None] * C + cols[None, :]
    if HAS_PADDING:
        padded = tl.load(pad_ptr + src, mask=j_ok, other=1) != 0
    if ACCUMULATE:
        total = tl.load(out_ptr + out_offs, mask=ok, other=0.0)
    else:
        total = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for k in range(K):
        x_ptr, stride_b, stride_t, stride_c = _layer_ref(addr_ptr, strides_ptr, k, LAYER_DTYPE,
                                                         ALIGNED, VEC)
        row = b * stride_b + t * stride_t
        col = cols if UNIT_STRIDE_C else cols * stride_c  # unit stride: vector loads along C
        x = tl.load(x_ptr + row[:, None] + col[None, :], mask=ok, other=0.0).to(tl.float32)
        if LAYER_NORM == 1:
            x = _layer_norm_rows(x, cols, c_ok, C, eps)
        elif LAYER_NORM == 2:
            stats = stats_ptr + ((k * B + b) * 3 * C)[:, None] + cols[None, :]
            shift = tl.load(stats, mask=ok, other=0.0)
            mean = tl.load(stats + C, mask=ok, other=0.0)
            std = tl.load(stats + 2 * C, mask=ok, other=1.0)
            x = ((x - shift) - mean) / std
            if HAS_PADDING:  # padding is outside the statistics and normalises to 0
                x = tl.where(padded[:, None], 0.0, x)
        total += x
    total = total / divisor
    if FINAL_LAYER_NORM:
        total = _layer_norm_rows(total, cols, c_ok, C, eps)
    if HAS_PADDING:
        total = tl.where(padded[:, None], 0.0, total)
    tl.store(out_ptr + out_offs, total, mask=ok)


# ---------------------------------------------------------------------------------- launchers
class TargetKernels:
    """Launchers over flattened [B*T, C] rows, shared by `make_targets` and the streaming form.

    Args:
        shape: (B, T, C) of every layer.
        padding_mask: [B, T] bool, True = padding, or None.
        eps: added to the variance.
    """

    def __init__(self, shape: tuple[int, int, int], padding_mask: Tensor | None, eps: float):
        self.batch, self.steps, self.channels = shape
        self.eps = float(eps)
        self.pad = None if padding_mask is None else padding_mask.contiguous().view(torch.uint8)
        # The instance-norm shift: the first valid step of each sequence (0 when none is valid).
        self.first = None if padding_mask is None else \
            (~padding_mask).to(torch.int32).argmax(dim=1).to(torch.int32)
        self.block_c = triton.next_power_of_2(max(self.channels, 1))
        self.block_r = max(1, _ROW_TILE // self.block_c)
        self.num_warps = 8 if self.block_c >= 2048 else 4

    def _table(self, layers: Sequence[Tensor]) -> tuple[Tensor, Tensor, dict]:
        """Device tables of the layers' addresses and (b, t, c) strides; the layout constants."""
        device = layers[0].device
        addrs = [x.data_ptr() for x in layers]
        strides = [x.stride() for x in layers]
        size = layers[0].element_size()
        vec = max(16 // size, 1)
        layout = dict(
            LAYER_DTYPE=_TL_DTYPES[layers[0].dtype],
            UNIT_STRIDE_C=all(s[2] == 1 or self.channels == 1 for s in strides),
            ALIGNED=all(a % 16 == 0 for a in addrs) and
            all(s[0] % vec == 0 and s[1] % vec == 0 for s in strides),
            VEC=vec)
        return (torch.tensor(addrs, dtype=torch.int64).to(device),
                torch.tensor(strides, dtype=torch.int64).to(device), layout)

    def stats(self, layers: Sequence[Tensor]) -> Tensor:
        """[K, B, 3, C] fp32 instance-norm statistics (shift, shifted mean, std) of each layer."""
        addrs, strides, layout = self._table(layers)
        out = torch.empty(len(layers), self.batch, 3, self.channels, dtype=torch.float32,
                          device=layers[0].device)
        grid = (len(layers), self.batch, triton.cdiv(self.channels, _STATS_BLOCK_C))
        _make_targets_stats_kernel[grid](
            addrs, strides, self._pad_arg(out), self._first_arg(out), out,
            self.batch, self.steps, self.channels, self.eps,
            HAS_PADDING=self.pad is not None, BLOCK_T=_STATS_BLOCK_T, BLOCK_C=_STATS_BLOCK_C,
            **layout)
        return out

    def rows(self, layers: Sequence[Tensor], out: Tensor, *, layer_norm: str,
             stats: Tensor | None = None, rows: Tensor | None = None, divisor: float = 1.0,
             final_layer_norm: bool = False, accumulate: bool = False,
             zero_padding: bool = True) -> Tensor:
        """Writes out[j] = final(sum_k norm(layers_k[row j]) / divisor) for the selected rows.

        Args:
            layers: K >= 1 tensors [B, T, C] of one dtype.
            out: [R, C] fp32, contiguous; R = len(rows), or B*T without `rows`.
            layer_norm: per-layer norm; "instance" needs `stats` from `stats(layers)`.
            rows: [R] int64 indices into the flattened B*T rows, or None for all rows in order.
            divisor: the sum is divided by it (K for the average).
            final_layer_norm: apply a layer norm to the result.
            accumulate: add to what `out` holds instead of overwriting it.
            zero_padding: write 0 to padded rows.
        """
        addrs, strides, layout = self._table(layers)
        count = out.shape[0]
        if count == 0:
            return out
        has_padding = self.pad is not None and (zero_padding or layer_norm == "instance")
        grid = (triton.cdiv(count, self.block_r),)
        _make_targets_fwd_kernel[grid](
            addrs, strides, out if stats is None else stats,
            self.pad if has_padding else out, out if rows is None else rows, out,
            count, self.batch, self.steps, self.channels, len(layers), float(divisor), self.eps,
            LAYER_NORM=NORM_CODES[layer_norm], FINAL_LAYER_NORM=final_layer_norm,
            HAS_ROWS=rows is not None, HAS_PADDING=has_padding, ACCUMULATE=accumulate,
            BLOCK_R=self.block_r, BLOCK_C=self.block_c, num_warps=self.num_warps, **layout)
        return out

    def _pad_arg(self, fallback: Tensor) -> Tensor:
        return self.pad if self.pad is not None else fallback

    def _first_arg(self, fallback: Tensor) -> Tensor:
        return self.first if self.first is not None else fallback


def _same_dtype(layers: Sequence[Tensor]) -> list[Tensor]:
    """The kernel reads all layers through one element type: mixed dtypes (rare) go to fp32."""
    if all(x.dtype == layers[0].dtype for x in layers) and layers[0].dtype in _TL_DTYPES:
        return list(layers)
    return [x.float() for x in layers]


def row_table(mask: Tensor | None, repeat: int = 1) -> Tensor | None:
    """[M] int64 source rows, in the flattened [B*T] grid, of the rows `mask` [B*repeat, T] selects
    (row r of the mask is a copy of sample r // repeat), or None for all rows.

    The fwd kernel reads each output row through this table, so a source row that several copies
    select is simply read again: nothing of size [B*repeat, T, C] exists.
    """
    # nonzero() is a device sync: the number of masked rows decides the output's size.
    if mask is None:
        return None
    if repeat == 1:
        return mask.reshape(-1).nonzero().squeeze(1)
    copy, step = mask.nonzero(as_tuple=True)
    return (copy // repeat) * mask.shape[1] + step


def finish_targets(kernels: TargetKernels, layers: Sequence[Tensor], *, layer_norm: str,
                   final_norm: str, rows: Tensor | None, divisor: float,
                   stats: Tensor | None = None, scratch: Tensor | None = None,
                   out: Tensor | None = None) -> Tensor:
    """The output rows: final_norm(sum_k layer_norm(layers_k) / divisor) at `rows`.

    Args:
        kernels: the launchers for the layers' shape and padding.
        layers: K >= 1 tensors [B, T, C] of one dtype.
        layer_norm: their per-layer norm ("instance" needs `stats`).
        final_norm: "none" | "layer" | "instance".
        rows: [R] int64 row indices into the flattened B*T, or None for all rows.
        divisor: the sum is divided by it.
        stats: `kernels.stats(layers)` for a per-layer instance norm.
        scratch: [B*T, C] fp32 for the average that a final instance norm needs, allocated when
            None; it may be the (only) layer itself, averaged in place (the streaming form).
        out: [R, C] fp32 for the result, allocated when None; it may be the only layer itself
            when `rows` is None (each program reads its rows before it writes them).

    Returns:
        `out`, [R, C] fp32.
    """
    b, t, c = kernels.batch, kernels.steps, kernels.channels
    device = layers[0].device
    if final_norm == "instance":
        # Statistics over time of the average need the whole average first.
        if scratch is None:
            scratch = torch.empty(b * t, c, dtype=torch.float32, device=device)
        kernels.rows(layers, scratch, layer_norm=layer_norm, stats=stats, divisor=divisor,
                     zero_padding=False)
        average = scratch.view(b, t, c)
        layers, layer_norm, divisor = [average], "instance", 1.0
        stats = kernels.stats(layers)
    if out is None:
        count = b * t if rows is None else rows.numel()
        out = torch.empty(count, c, dtype=torch.float32, device=device)
    return kernels.rows(layers, out, layer_norm=layer_norm, stats=stats, rows=rows,
                        divisor=divisor, final_layer_norm=final_norm == "layer")


def _make_targets_impl(layers: Sequence[Tensor], layer_norm: str, final_norm: str,
                       mask: Tensor | None, padding_mask: Tensor | None, eps: float,
                       repeat: int = 1) -> Tensor:
    layers = _same_dtype(layers)
    batch, steps, channels = layers[0].shape
    kernels = TargetKernels((batch, steps, channels), padding_mask, eps)
    stats = kernels.stats(layers) if layer_norm == "instance" else None
    out = finish_targets(kernels, layers, layer_norm=layer_norm, final_norm=final_norm,
                         rows=row_table(mask, repeat), divisor=float(len(layers)), stats=stats)
    return out.view(batch, steps, channels) if mask is None else out


# ---------------------------------------------------------------------------------- registration
@torch.library.custom_op("d2v_triton::make_targets", mutates_args=())
def _make_targets_op(layers: list[Tensor], layer_norm: str, final_norm: str, mask: Tensor | None,
                     padding_mask: Tensor | None, eps: float, repeat: int) -> Tensor:
    return _make_targets_impl(layers, layer_norm, final_norm, mask, padding_mask, eps, repeat)


@_make_targets_op.register_fake
def _(layers, layer_norm, final_norm, mask, padding_mask, eps, repeat):
    batch, steps, channels = layers[0].shape
    if mask is None:
        return layers[0].new_empty((batch, steps, channels), dtype=torch.float32)
    # The number of masked rows is only known from the data: a fresh symbolic size.
    rows = torch.library.get_ctx().new_dynamic_size()
    return layers[0].new_empty((rows, channels), dtype=torch.float32)


def make_targets(layers: Sequence[Tensor], *, layer_norm: str, final_norm: str = "none",
                 mask: Tensor | None = None, padding_mask: Tensor | None = None,
                 eps: float = 1e-5, repeat: int = 1) -> Tensor:
    """Average of the parameter-free normalised top-K teacher outputs, in fp32.

    Args:
        layers: K >= 1 tensors [B, T, C], any float dtype, any strides.
        layer_norm: "instance" (per (b, c) over the valid steps) | "layer" (per (b, t)) | "none".
        final_norm: the same choices, applied to the average.
        mask: [B * repeat, T] bool, True = masked: return only those rows (row r: a copy of
            sample r // repeat).
        padding_mask: [B, T] bool, True = padding, left out of the instance-norm statistics.
        eps: added to the variance.
        repeat: masked copies per sample (`row_table`).

    Returns:
        [M, C] fp32 rows at the masked positions in row-major order, or [B, T, C] fp32 when mask
        is None (padded rows are 0).
    """
    if torch.compiler.is_compiling():
        return torch.ops.d2v_triton.make_targets(list(layers), layer_norm, final_norm, mask,
                                                 padding_mask, float(eps), int(repeat))
    return _make_targets_impl(layers, layer_norm, final_norm, mask, padding_mask, eps, repeat)
