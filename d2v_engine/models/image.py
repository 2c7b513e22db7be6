"""Image encoder of data2vec-vision 1.0: a BEiT ViT.

Conv2d patch embedding, a CLS token, a learned mask token that replaces masked patch embeddings, no
absolute positions but one relative position bias shared by all blocks, pre-LN blocks with layer
scale and stochastic depth, a final LayerNorm. Outputs are the patch tokens (CLS dropped), plus CLS.
The fine-tuned data2vec-vision checkpoints' variants are spec options: a relative position bias per
block (`rel_pos_bias="layer"`) and no final LayerNorm (`pooling="mean"`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from d2v_engine.models.encoder import EncoderOutput, LayerCallback, TransformerEncoder, Views, init_linear_
from d2v_engine.models.registry import ModelSpec


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

    def forward(self) -> Tensor:
        """Returns: [1, H, N + 1, N + 1] additive attention bias."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)


class ImageEmbeddings(nn.Module):
    """Patch embedding, mask token and CLS token."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        dim, p = spec.transformer.dim, spec.patch_size
        self.projection = nn.Conv2d(spec.in_chans, dim, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, images: Tensor, mask: Tensor | None) -> Tensor:
        """Embed.

        Args:
            images: [B, C_in, H, W].
            mask: [B, N] bool, True = replace the patch embedding by the mask token, or None.
        Returns:
            [B, 1 + N, C]: CLS, then the patches row-major.
        """
        # A teacher kept in bf16 still receives fp32 pixels: compute in the weights' dtype.
        x = self.projection(images.to(self.projection.weight.dtype)).flatten(2).transpose(1, 2)
        if mask is not None:
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
        self.encoder = TransformerEncoder(
            t, layer_bias=(lambda: RelativePositionBias(self.grid, t.heads)) if per_block else None)
        self.layernorm = nn.LayerNorm(t.dim, eps=t.norm_eps) if spec.pooling == "cls" else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """BEiT init: trunc-normal(0.02) weights, zero biases, zero position bias, depth-scaled outputs.

        Idempotent; a ZeRO-3 caller may re-run it while the parameters are gathered.
        """
        init_linear_(self, trunc=True)
        for tensor in (self.embeddings.projection.weight, self.embeddings.cls_token, self.embeddings.mask_token):
            nn.init.trunc_normal_(tensor, std=0.02)
        nn.init.zeros_(self.embeddings.projection.bias)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, RelativePositionBias):
                nn.init.zeros_(m.relative_position_bias_table)
                # Rebuilt here too so that a model materialised from the meta device (`to_empty`) is correct.
                m.relative_position_index.copy_(relative_position_index(self.grid))
        for layer_id, block in enumerate(self.encoder.layers, start=1):
            if block.lambda_1 is not None:
                block.lambda_1.fill_(self.spec.transformer.layer_scale)
                block.lambda_2.fill_(self.spec.transformer.layer_scale)
            # BEiT's fix_init_weight: keep the residual stream's variance from growing with depth.
            block.attention.out_proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.feed_forward.output_dense.weight.div_(math.sqrt(2.0 * layer_id))

    def views(self, batch: dict[str, Tensor]) -> Views:
        """Student and teacher see the same pixels; the student's patches are masked in `forward`.

        Args:
            batch: `images` [B, 3, H, W], `mask` [B, N] bool.
        Returns:
            Views(images, images, None, mask).
        """
        return Views(batch["images"], batch["images"], None, batch["mask"])

    def forward(self, x: Tensor, *, mask: Tensor | None = None, padding_mask: Tensor | None = None,
                top_k: int = 0, on_layer: LayerCallback | None = None) -> EncoderOutput:
        """Encode images.

        Args:
            x: [B, 3, H, W] normalised pixels, H = W = spec.image_size.
            mask: [B, N] bool, True = patch embedding replaced by the mask token, or None.
            padding_mask: must be None (images have no padding; accepted for a uniform signature).
            top_k: number of final blocks whose target outputs are returned.
            on_layer: streaming alternative to `layer_results`, called as `on_layer(i, out)` with the
                patch tokens [B, N, C] of each of the top_k blocks (see `TransformerEncoder.forward`).
        Returns:
            EncoderOutput: x [B, N, C] after the final LayerNorm (none with `pooling="mean"`),
            layer_results top_k x [B, N, C] (patch tokens, before the final LayerNorm), padding_mask
            None, cls [B, C].
        """
        if padding_mask is not None:
            raise ValueError("images have no padding: pass padding_mask=None")
        if tuple(x.shape[-2:]) != (self.spec.image_size,) * 2:
            raise ValueError(f"expected {self.spec.image_size}x{self.spec.image_size} images, got {tuple(x.shape)}")
        h = self.embeddings(x, mask)
        patch_cb = None if on_layer is None else (lambda i, out: on_layer(i, out[:, 1:]))
        shared = self.relative_position_bias() if self.relative_position_bias is not None else None
        h, layers = self.encoder(h, attn_bias=shared, top_k=top_k,
                                 grad_checkpointing=self.grad_checkpointing, on_layer=patch_cb)
        h = self.layernorm(h)
        return EncoderOutput(x=h[:, 1:], layer_results=[out[:, 1:] for out in layers], padding_mask=None,
                             cls=h[:, 0])
