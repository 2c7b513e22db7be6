"""Image encoder of data2vec-vision 1.0 (a BEiT ViT) and of data2vec 2.0.

1.0: Conv2d patch embedding, a CLS token, a learned mask token that replaces masked patch embeddings,
no absolute positions but one relative position bias shared by all blocks, pre-LN blocks with layer
scale and stochastic depth, a final LayerNorm. Outputs are the patch tokens (CLS dropped), plus CLS.
The fine-tuned data2vec-vision checkpoints' variants are spec options: a relative position bias per
block (`rel_pos_bias="layer"`) and no final LayerNorm (`pooling="mean"`).

2.0 (`image_*_v2`, fairseq `modalities/images.py`) is the same module with other spec options: fixed
sin-cos positions added to the patch embeddings (`pos_embed`), a LayerNorm before the first block
(`embed_norm`), post-LN blocks with q/k/v biases, no layer scale, no relative position bias, no final
norm, data2vec 2.0's initialisation. Given `visible`, the encoder drops the masked patches right
after the patch embedding and encodes CLS + the visible ones (any variant: a shared relative position
bias is gathered for the visible pairs).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from d2v_engine.models.encoder import (EncoderOutput, LayerCallback, TransformerEncoder, Views, Visible,
                                       gather_visible, init_linear_)
from d2v_engine.models.spec import ModelSpec


def relative_position_index(grid: tuple[int, int]) -> Tensor:
    """Row of the relative position bias table for every (query, key) pair of CLS + patch tokens.

    Patch pairs index by their 2-D offset, (dh + Wh - 1) * (2Ww - 1) + (dw + Ww - 1); the last three
    rows are CLS-to-patch (query CLS), patch-to-CLS (key CLS) and CLS-to-CLS, the BEiT layout.

    Args:
        grid: (Wh, Ww) patches per column and per row.
    Returns:
        [N + 1, N + 1] int64, N = Wh * Ww, token 0 = CLS, patches row-major.
    """
    wh, ww = grid
    rows, cols = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    dh = rows[:, None] - rows[None, :] + wh - 1
    dw = cols[:, None] - cols[None, :] + ww - 1
    n_rel = (2 * wh - 1) * (2 * ww - 1)
    index = torch.empty(wh * ww + 1, wh * ww + 1, dtype=torch.long)
    index[1:, 1:] = dh * (2 * ww - 1) + dw
    index[0, :] = n_rel
    index[:, 0] = n_rel + 1
    index[0, 0] = n_rel + 2
    return index


class RelativePositionBias(nn.Module):
    """One learned relative position bias per head: shared by every block, or one per block."""

    def __init__(self, grid: tuple[int, int], heads: int):
        super().__init__()
        n_rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n_rows, heads))
        # Not persistent: it is a pure function of the grid and would only bloat checkpoints.
        self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)

    def forward(self, keep: Tensor | None = None) -> Tensor:
        """The bias of all tokens, or of CLS and the patches `keep` (2.0: the visible ones).

        Args:
            keep: [R, V] int64 patch indices, or None for all patches.
        Returns:
            [1, H, N + 1, N + 1], or [R, H, V + 1, V + 1] with `keep`, additive attention bias.
        """
        index = self.relative_position_index
        if keep is None:
            n = index.shape[0]
            bias = self.relative_position_bias_table[index.view(-1)]
            return bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        tokens = torch.cat([keep.new_zeros(keep.shape[0], 1), keep + 1], dim=1)   # token 0 = CLS
        pairs = index[tokens[:, :, None], tokens[:, None, :]]                     # [R, V + 1, V + 1]
        return self.relative_position_bias_table[pairs].permute(0, 3, 1, 2)


def sincos_positions(grid: tuple[int, int], dim: int) -> Tensor:
    """Fixed 2-D sin-cos position table (MAE's `get_2d_sincos_pos_embed`, used by data2vec 2.0).

    The first half of the channels encodes a patch's column, the second half its row, each as
    [sin(pos * w_i), cos(pos * w_i)] with w_i = 10000^(-i / (dim / 4)), i < dim / 4.

    Args:
        grid: (Wh, Ww) patches per column and per row.
        dim: model width, a multiple of 4.
    Returns:
        [Wh * Ww, dim] float32, patches row-major.
    """
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.flatten().double()[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class ImageEmbeddings(nn.Module):
    """Patch embedding (+ fixed positions), mask token and CLS token."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        dim, p = spec.transformer.dim, spec.patch_size
        self.projection = nn.Conv2d(spec.in_chans, dim, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        grid = (spec.image_size // p,) * 2
        if spec.pos_embed == "sincos":
            # Not persistent: a pure function of the grid (and never trained).
            self.register_buffer("position_embeddings", sincos_positions(grid, dim)[None], persistent=False)
        else:
            self.position_embeddings = None

    def forward(self, images: Tensor, mask: Tensor | None = None, visible: Visible | None = None) -> Tensor:
        """Embed.

        Args:
            images: [B, C_in, H, W].
            mask: [B, N] bool, True = replace the patch embedding by the mask token, or None.
            visible: 2.0: keep only each clone row's visible patches (the mask token is not used).
        Returns:
            [B, 1 + N, C] (or [R, 1 + V, C] with `visible`): CLS, then the patches in order.
        """
        # A teacher kept in bf16 still receives fp32 pixels: compute in the weights' dtype.
        x = self.projection(images.to(self.projection.weight.dtype)).flatten(2).transpose(1, 2)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings.to(x.dtype)
        if visible is not None:
            # The patches are embedded once per image; each clone gathers its visible ones.
            x = gather_visible(x, visible)
        elif mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        return torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)


class ImageEncoder(nn.Module):
    """BEiT / data2vec-vision 1.0 encoder.

    Attributes follow `d2v_interfaces`: `modality`, `spec`, `dim`, `num_layers`, `teacher_exclude`,
    `teacher_copy`, `grad_checkpointing`. The teacher is a full copy: nothing is shared.
    """

    modality = "image"
    teacher_exclude: tuple[str, ...] = ()
    teacher_copy: tuple[str, ...] = ()
    teacher_copy_v2: tuple[str, ...] = ()
    """data2vec 2.0 averages the whole image model too (`ema_local_encoder`: its own patch embedding)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        t = spec.transformer
        if spec.image_size % spec.patch_size:
            raise ValueError(f"image size {spec.image_size} is not a multiple of patch size {spec.patch_size}")
        self.spec, self.dim, self.num_layers = spec, t.dim, t.depth
        self.grad_checkpointing = False
        self.grid = (spec.image_size // spec.patch_size,) * 2
        self.embeddings = ImageEmbeddings(spec)
        shared, per_block = spec.rel_pos_bias == "shared", spec.rel_pos_bias == "layer"
        self.relative_position_bias = RelativePositionBias(self.grid, t.heads) if shared else None
        self.embed_norm = nn.LayerNorm(t.dim, eps=t.norm_eps) if spec.embed_norm else None
        self.encoder = TransformerEncoder(
            t, layer_bias=(lambda: RelativePositionBias(self.grid, t.heads)) if per_block else None)
        self.layernorm = nn.LayerNorm(t.dim, eps=t.norm_eps) if spec.pooling == "cls" else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """BEiT init: trunc-normal(0.02) weights, zero biases, zero position bias, depth-scaled outputs;
        or data2vec 2.0's (`spec.init`).

        Idempotent; a ZeRO-3 caller may re-run it while the parameters are gathered.
        """
        if self.spec.init == "data2vec2":
            self._init_data2vec2()
            return
        init_linear_(self, trunc=True)
        for tensor in (self.embeddings.projection.weight, self.embeddings.cls_token, self.embeddings.mask_token):
            nn.init.trunc_normal_(tensor, std=0.02)
        nn.init.zeros_(self.embeddings.projection.bias)
        self._reset_norms_and_scales()
        for layer_id, block in enumerate(self.encoder.layers, start=1):
            # BEiT's fix_init_weight: keep the residual stream's variance from growing with depth.
            block.attention.out_proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.feed_forward.output_dense.weight.div_(math.sqrt(2.0 * layer_id))

    def _reset_norms_and_scales(self) -> None:
        """LayerNorms at 1 and 0, relative-position tables at zero, layer scales at their config value."""
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, RelativePositionBias):
                nn.init.zeros_(m.relative_position_bias_table)
                # Rebuilt here too so that a model materialised from the meta device (`to_empty`) is correct.
                m.relative_position_index.copy_(relative_position_index(self.grid))
        for block in self.encoder.layers:
            if block.lambda_1 is not None:
                block.lambda_1.fill_(self.spec.transformer.layer_scale)
                block.lambda_2.fill_(self.spec.transformer.layer_scale)

    def _init_data2vec2(self) -> None:
        """fairseq data2vec 2.0: BERT init (normal(0.02) Linear weights, zero biases), Xavier-uniform on
        the flattened patch projection (MAE), the CLS token N(0, 1), LayerNorms at 1 and 0."""
        init_linear_(self)
        emb = self.embeddings
        nn.init.xavier_uniform_(emb.projection.weight.view(emb.projection.weight.shape[0], -1))
        nn.init.zeros_(emb.projection.bias)
        nn.init.normal_(emb.cls_token)
        nn.init.trunc_normal_(emb.mask_token, std=0.02)
        self._reset_norms_and_scales()
        if emb.position_embeddings is not None:
            emb.position_embeddings.copy_(sincos_positions(self.grid, self.dim)[None])

    def views(self, batch: dict[str, Tensor]) -> Views:
        """Student and teacher see the same pixels; the student's patches are masked in `forward`.

        Args:
            batch: `images` [B, 3, H, W], `mask` [B, N] bool.
        Returns:
            Views(images, images, None, mask).
        """
        return Views(batch["images"], batch["images"], None, batch["mask"])

    def forward(self, x: Tensor, *, mask: Tensor | None = None, padding_mask: Tensor | None = None,
                top_k: int = 0, on_layer: LayerCallback | None = None,
                visible: Visible | None = None) -> EncoderOutput:
        """Encode images.

        Args:
            x: [B, 3, H, W] normalised pixels, H = W = spec.image_size.
            mask: [B, N] bool, True = patch embedding replaced by the mask token, or None.
            padding_mask: must be None (images have no padding; accepted for a uniform signature).
            top_k: number of final blocks whose target outputs are returned.
            on_layer: streaming alternative to `layer_results`, called as `on_layer(i, out)` with the
                patch tokens [B, N, C] of each of the top_k blocks (see `TransformerEncoder.forward`).
            visible: 2.0 student: encode CLS + each clone row's visible patches only (`mask` unused).
        Returns:
            EncoderOutput: x [B, N, C] (or [R, V, C] with `visible`) after the final LayerNorm (none
            with `pooling="mean"`), layer_results top_k x [B, N, C] (patch tokens, before the final
            LayerNorm), padding_mask None, cls [B, C] (or [R, C]).
        """
        if padding_mask is not None:
            raise ValueError("images have no padding: pass padding_mask=None")
        if tuple(x.shape[-2:]) != (self.spec.image_size,) * 2:
            raise ValueError(f"expected {self.spec.image_size}x{self.spec.image_size} images, got {tuple(x.shape)}")
        h = self.embeddings(x, mask, visible)
        if self.embed_norm is not None:
            h = self.embed_norm(h)
        patch_cb = None if on_layer is None else (lambda i, out: on_layer(i, out[:, 1:]))
        keep = None if visible is None else visible.keep
        shared = self.relative_position_bias(keep) if self.relative_position_bias is not None else None
        # Rows with fewer visible patches than others (masks without exact counts) pad their slots.
        slots = None if visible is None else visible.padding
        keys = None if slots is None else torch.cat([slots.new_zeros(slots.shape[0], 1), slots], dim=1)
        h, layers = self.encoder(h, attn_bias=shared, padding_mask=keys, top_k=top_k,
                                 grad_checkpointing=self.grad_checkpointing, on_layer=patch_cb)
        h = self.layernorm(h)
        return EncoderOutput(x=h[:, 1:], layer_results=[out[:, 1:] for out in layers], padding_mask=slots,
                             cls=h[:, 0])
