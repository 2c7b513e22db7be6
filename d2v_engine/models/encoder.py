"""The Transformer shared by all modalities: one block class (pre-LN or post-LN) and the block stack.

Images use pre-LN blocks with layer scale and a shared relative position bias (BEiT); audio and text
use post-LN blocks (wav2vec 2.0 / RoBERTa). Every block hands out a *target output* next to its new
hidden state: the FFN output before dropout and residual (`ffn`) or the end of the block (`block`),
which the teacher averages over its top K blocks.

Parameter names follow Hugging Face's Data2VecAudio layer (`attention.{q,k,v,out}_proj`, `layer_norm`,
`feed_forward.{intermediate,output}_dense`, `final_layer_norm`) and Data2VecVision's layer scale
(`lambda_1`, `lambda_2`), so weight import is a renaming.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from d2v_engine.models.spec import TransformerSpec

LayerCallback = Callable[[int, Tensor], None]
"""`on_layer(i, out)`: receives block i's target output [B, T, C] as soon as the block finishes."""

BiasFactory = Callable[[], nn.Module]
"""Builds one block's own attention-bias module, whose `forward()` returns [1, H, T, T]."""


@dataclass
class Views:
    """What the student and the teacher encode for one batch (see `Encoder.views`)."""

    student: Tensor
    """Student input: pixels [B, 3, H, W] | CNN features [B, T, C] | BERT-masked ids [B, T]."""
    teacher: Tensor
    """Teacher input (the clean view): same layout as `student`."""
    padding_mask: Tensor | None
    """[B, T] bool, True = padding (audio: frame level), or None."""
    embed_mask: Tensor | None
    """[B, T] bool, True = replace the embedding by the learned mask embedding (student only), or None."""


@dataclass
class Visible:
    """Which tokens the data2vec 2.0 student encodes: clone row r is a masked copy of sample rows[r],
    and the student sees only its steps keep[r] (see `visible_index`)."""

    rows: Tensor
    """[R] int64: the sample (batch row) each clone row copies; R = B * M, rows = arange(R) // M."""
    keep: Tensor
    """[R, V] int64: the visible steps of each clone row, ascending (slots past its count: any step)."""
    padding: Tensor | None
    """[R, V] bool, True = a slot past the row's visible count (attention ignores it), or None."""
    mask: Tensor
    """[R, T] bool, True = masked: the steps the student never sees."""


def visible_index(mask: Tensor, padding_mask: Tensor | None, clones: int) -> Visible:
    """The visible steps of every clone row, as gather indices.

    Args:
        mask: [R, T] bool, True = masked (R = B * clones, clones of a sample adjacent).
        padding_mask: [R, T] bool, True = padding, or None.
        clones: M, masked copies per sample.
    Returns:
        `Visible`; `padding` is None when every row has the same number of visible steps (images,
        and audio cropped to the shortest clip), the common case.
    """
    hidden = mask if padding_mask is None else mask | padding_mask
    counts = (~hidden).sum(dim=1)
    width = int(counts.max())  # a sync point: the visible length decides the student's shapes
    # A stable sort of the hidden flags puts the visible steps first, in their order.
    keep = hidden.to(torch.uint8).argsort(dim=1, stable=True)[:, :width]
    padding = torch.arange(width, device=mask.device)[None, :] >= counts[:, None]
    rows = torch.arange(mask.shape[0], device=mask.device) // clones
    return Visible(rows, keep, padding if bool(padding.any()) else None, mask)


def gather_visible(h: Tensor, visible: Visible, per_copy: bool = False) -> Tensor:
    """The visible tokens of every copy, [R, V, C].

    Args:
        h: [B, T, C] tokens computed once per sample and shared by its copies, or with `per_copy`
            [R, T, C] tokens computed for each copy (audio: the position convolution of a copy).
        visible: the copies' visible steps.
    """
    rows = torch.arange(h.shape[0], device=h.device) if per_copy else visible.rows
    return h[rows[:, None], visible.keep]


@dataclass
class EncoderOutput:
    """One encoder pass."""

    x: Tensor
    """[B, T, C] final output (images: patch tokens only, CLS dropped)."""
    layer_results: list[Tensor]
    """The last `top_k` blocks' target outputs, each [B, T, C], oldest first (empty with `on_layer`)."""
    padding_mask: Tensor | None
    """[B, T] bool, True = padding, or None."""
    cls: Tensor | None = None
    """Images: [B, C] final CLS token; None otherwise."""


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero a whole sample's residual branch with probability p, rescale the rest.

    Args:
        x: [B, ...] the residual branch.
        p: drop probability.
        training: only drops in training.
    Returns:
        Tensor shaped like x.
    """
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def build_attn_mask(attn_bias: Tensor | None, padding_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The additive attention mask shared by all blocks: position bias plus key padding.

    Built once per forward rather than in every block.

    Args:
        attn_bias: [B or 1, H, T, T] float additive bias (images: relative positions), or None.
        padding_mask: [B, T] bool, True = padding key, or None.
        dtype: dtype of the result.
    Returns:
        [B or 1, H or 1, T or 1, T] float mask, or None when both inputs are None.
    """
    if padding_mask is None:
        return None if attn_bias is None else attn_bias.to(dtype)
    # finfo.min rather than -inf: a fully padded row then gives uniform weights instead of NaN.
    pad = torch.zeros(padding_mask.shape, dtype=dtype, device=padding_mask.device)
    pad = pad.masked_fill(padding_mask, torch.finfo(dtype).min)[:, None, None, :]
    return pad if attn_bias is None else attn_bias.to(dtype) + pad


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v over [B, H, T, D] heads.

    `F.scaled_dot_product_attention`, except for bf16 and fp16 on a CPU: there its fused kernel
    and its math fallback took 2.1-2.9x the time of two batched matmuls and a softmax in the input
    dtype in the forward, and 2.2-4.5x forward + backward, at the `image_small` and `image_base`
    shapes (`benchmarks/bench_encoder.py`). The softmax runs in the input dtype.
    """
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    if attn_mask is not None:
        scores = scores + attn_mask
    weights = scores.softmax(dim=-1)
    if dropout_p:
        weights = F.dropout(weights, dropout_p)
    return torch.matmul(weights, v)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections, on `F.scaled_dot_product_attention`.

    `bias`, if given, builds this block's own additive attention bias (the per-block relative
    position bias of fine-tuned BEiT models), added to the mask the whole stack shares.
    """

    def __init__(self, dim: int, heads: int, attn_dropout: float, key_bias: bool = True,
                 bias: BiasFactory | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.attn_dropout = heads, attn_dropout
        self.q_proj = nn.Linear(dim, dim)
        # BEiT has no key bias: it would add the same logit to every key of a query (softmax-invariant).
        self.k_proj = nn.Linear(dim, dim, bias=key_bias)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.relative_position_bias = bias() if bias is not None else None

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Attend.

        Args:
            x: [B, T, C].
            attn_mask: [B or 1, H or 1, T or 1, T] additive float mask (see `build_attn_mask`), or None.
        Returns:
            [B, T, C].
        """
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if attn_mask is not None:
            # Under autocast q is bf16/fp16 while the mask was built in the hidden state's dtype.
            attn_mask = attn_mask.to(q.dtype)
        if self.relative_position_bias is not None:
            own = self.relative_position_bias().to(q.dtype)
            attn_mask = own if attn_mask is None else attn_mask + own
        p = self.attn_dropout if self.training else 0.0
        out = attend(q, k, v, attn_mask, p)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    """Linear -> GELU -> dropout -> Linear (no dropout after the second Linear: the block applies it)."""

    def __init__(self, dim: int, hidden: int, act_dropout: float):
        super().__init__()
        self.intermediate_dense = nn.Linear(dim, hidden)
        self.intermediate_dropout = nn.Dropout(act_dropout)
        self.output_dense = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, T, C] -> [B, T, C]."""
        return self.output_dense(self.intermediate_dropout(F.gelu(self.intermediate_dense(x))))


class TransformerBlock(nn.Module):
    """One block, pre-LN (BEiT) or post-LN (wav2vec 2.0 / RoBERTa), with optional layer scale.

    `layer_norm` belongs to the attention sub-layer and `final_layer_norm` to the FFN sub-layer, before
    them (pre-LN) or after their residual add (post-LN).
    """

    def __init__(self, spec: TransformerSpec, drop_path: float = 0.0, attn_bias: BiasFactory | None = None):
        super().__init__()
        self.pre_ln, self.target_output, self.drop_path = spec.pre_ln, spec.target_output, drop_path
        self.attention = Attention(spec.dim, spec.heads, spec.attn_dropout, spec.key_bias, attn_bias)
        self.layer_norm = nn.LayerNorm(spec.dim, eps=spec.norm_eps)
        self.feed_forward = FeedForward(spec.dim, spec.ffn_dim, spec.act_dropout)
        self.final_layer_norm = nn.LayerNorm(spec.dim, eps=spec.norm_eps)
        self.dropout = nn.Dropout(spec.dropout)
        if spec.layer_scale > 0:
            self.lambda_1 = nn.Parameter(torch.full((spec.dim,), spec.layer_scale))
            self.lambda_2 = nn.Parameter(torch.full((spec.dim,), spec.layer_scale))
        else:
            self.lambda_1 = self.lambda_2 = None

    def _scale(self, x: Tensor, gamma: Tensor | None) -> Tensor:
        return x if gamma is None else gamma * x

    def forward(self, h: Tensor, attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the block.

        Args:
            h: [B, T, C] hidden state.
            attn_mask: additive attention mask from `build_attn_mask`, or None.
        Returns:
            (new hidden state [B, T, C], target output [B, T, C]: the FFN output before dropout and
            residual (pre-LN: times lambda_2), or the new hidden state, per `spec.target_output`).
        """
        if self.pre_ln:
            a = self._scale(self.dropout(self.attention(self.layer_norm(h), attn_mask)), self.lambda_1)
            h = h + drop_path(a, self.drop_path, self.training)
            ffn = self._scale(self.feed_forward(self.final_layer_norm(h)), self.lambda_2)
            h = h + drop_path(self.dropout(ffn), self.drop_path, self.training)
        else:
            a = self._scale(self.dropout(self.attention(h, attn_mask)), self.lambda_1)
            h = self.layer_norm(h + drop_path(a, self.drop_path, self.training))
            ffn = self._scale(self.feed_forward(h), self.lambda_2)
            h = self.final_layer_norm(h + drop_path(self.dropout(ffn), self.drop_path, self.training))
        return h, (ffn if self.target_output == "ffn" else h)


class TransformerEncoder(nn.Module):
    """A stack of `TransformerBlock`s with stochastic depth, layerdrop and activation checkpointing.

    A plain `nn.ModuleList` (not `nn.TransformerEncoder`) so that DeepSpeed's `zero.Init` can
    partition it. `layer_bias`, if given, gives every block its own attention-bias module.
    """

    def __init__(self, spec: TransformerSpec, layer_bias: BiasFactory | None = None):
        super().__init__()
        self.layerdrop = spec.layerdrop
        # Stochastic depth grows linearly from 0 at the first block to spec.drop_path at the last.
        rates = [spec.drop_path * i / max(spec.depth - 1, 1) for i in range(spec.depth)]
        self.layers = nn.ModuleList(TransformerBlock(spec, r, layer_bias) for r in rates)

    def forward(self, h: Tensor, *, attn_bias: Tensor | None = None, padding_mask: Tensor | None = None,
                top_k: int = 0, grad_checkpointing: bool = False,
                on_layer: LayerCallback | None = None) -> tuple[Tensor, list[Tensor]]:
        """Run all blocks, collecting the target outputs of the last `top_k`.

        A block whose output is collected is never skipped by layerdrop, so exactly `top_k` outputs
        come back; layerdrop acts only in training mode (the teacher runs in eval mode).

        Args:
            h: [B, T, C] input tokens.
            attn_bias: [B or 1, H, T, T] additive attention bias shared by all blocks, or None.
            padding_mask: [B, T] bool, True = padding (masked out as attention keys), or None.
            top_k: number of final blocks whose target outputs are collected (0..depth).
            grad_checkpointing: recompute each block in backward instead of storing its activations.
            on_layer: if given, called as `on_layer(i, out)` with block index i (0-based, of all
                blocks) and its target output [B, T, C] instead of collecting the list, so that a
                streaming accumulator never holds all K outputs at once.
        Returns:
            (h [B, T, C] output of the last block, list of top_k target outputs [B, T, C], oldest
            first; empty when `on_layer` is given).
        """
        depth = len(self.layers)
        if not 0 <= top_k <= depth:
            raise ValueError(f"top_k={top_k} must be between 0 and the {depth} blocks")
        attn_mask = build_attn_mask(attn_bias, padding_mask, h.dtype)
        first_kept = depth - top_k
        collected: list[Tensor] = []
        for i, block in enumerate(self.layers):
            if i < first_kept and self._skip():
                continue
            if grad_checkpointing and torch.is_grad_enabled():
                h, out = checkpoint(block, h, attn_mask, use_reentrant=False)
            else:
                h, out = block(h, attn_mask)
            if i >= first_kept:
                if on_layer is not None:
                    on_layer(i, out)
                else:
                    collected.append(out)
        return h, collected

    def _skip(self) -> bool:
        """Layerdrop: draw whether to skip the next block (training only)."""
        # The draw is on the CPU generator: no device sync, and every rank may skip different blocks.
        return self.training and self.layerdrop > 0 and float(torch.rand(())) < self.layerdrop


def init_linear_(module: nn.Module, std: float = 0.02, trunc: bool = False) -> None:
    """Normal (or truncated normal) init with std `std` and zero bias for every Linear under `module`."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if trunc:
                # Bounds +-2 (absolute), as in BEiT: at std 0.02 this is a normal with its rare
                # outliers clipped, not a 2-sigma truncation.
                nn.init.trunc_normal_(m.weight, std=std)
            else:
                nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
