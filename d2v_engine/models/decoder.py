"""data2vec 2.0's light decoder: conv blocks over the restored sequence, then a projection.

The student encodes only the visible tokens. `decoder_input` puts its outputs back at their steps
and fills every masked step with a little Gaussian noise (fairseq `decoder_input`), so that the
decoder sees the sequence in its order; `ConvDecoder` then runs `layers` blocks of
Conv (kernel k, padding k // 2, groups) -> LayerNorm over channels (no affine) -> GELU, adding each
block's input where the shapes match, and projects to the model width (fairseq `Decoder1d` for audio
and text, `Decoder2d` on the patch grid for images). Predictions are read at the masked steps.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from d2v_engine.config import DecoderConfig
from d2v_engine.models.encoder import Visible


def decoder_input(x: Tensor, visible: Visible, steps: int, *, noise_std: float,
                  padding_mask: Tensor | None = None) -> Tensor:
    """The student's visible outputs at their steps, noise at the masked ones, zeros at padding.

    Args:
        x: [R, V, C] the encoder's outputs for the visible slots (`visible.keep`).
        visible: which steps the slots came from.
        steps: T, the full sequence length.
        noise_std: standard deviation of the N(0, std^2) noise at the masked steps.
        padding_mask: [R, T] bool, True = padding step (set to 0), or None.
    Returns:
        [R, T, C].
    """
    rows, width, channels = x.shape
    full = x.new_empty(rows, steps + 1, channels).normal_(0.0, noise_std)
    keep = visible.keep
    if visible.padding is not None:
        keep = keep.masked_fill(visible.padding, steps)  # slots past a row's count land in column T
    full.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, channels), x)
    full = full[:, :steps]
    if padding_mask is not None:
        full = full.masked_fill(padding_mask.unsqueeze(-1), 0.0)
    return full


class DecoderBlock(nn.Module):
    """Conv (1-D or 2-D, 'same' length) -> LayerNorm over channels without affine -> GELU."""

    def __init__(self, in_dim: int, dim: int, kernel: int, groups: int, dims: int):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.conv = conv(in_dim, dim, kernel, padding=kernel // 2, groups=groups)
        # An even kernel with padding k // 2 yields one step too many per side it pads: drop the last.
        self.trim = 1 if kernel % 2 == 0 else 0
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        """x: [R, C_in, T] or [R, C_in, H, W] -> the same layout with `dim` channels."""
        x = self.conv(x)
        if self.trim:
            x = x[..., :-1, :-1] if self.dims == 2 else x[..., :-1]
        x = F.layer_norm(x.movedim(1, -1), (x.shape[1],)).movedim(-1, 1)
        return F.gelu(x)


class ConvDecoder(nn.Module):
    """fairseq's `Decoder1d` (`grid` None) or `Decoder2d` (`grid` = the patch grid).

    Args:
        cfg: the `decoder` config section.
        dim: the model width (input and output channels).
        grid: (H, W) for images: the sequence is the row-major patch grid; None: 1-D.
    """

    def __init__(self, cfg: DecoderConfig, dim: int, grid: tuple[int, int] | None = None):
        super().__init__()
        self.grid, self.residual = grid, cfg.residual
        dims = 1 if grid is None else 2
        self.blocks = nn.ModuleList(
            DecoderBlock(dim if i == 0 else cfg.dim, cfg.dim, cfg.kernel, cfg.groups, dims)
            for i in range(cfg.layers))
        if cfg.projection_layers == 1:
            self.proj = nn.Linear(cfg.dim, dim)
        else:  # text: Linear -> GELU -> Linear, through projection_ratio x dim channels
            hidden = int(cfg.dim * cfg.projection_ratio)
            self.proj = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: [R, T, C] (T = H * W for images) -> [R, T, C] predictions at every step."""
        rows, steps, channels = x.shape
        if self.grid is not None:
            # A view with channels-last strides, no copy: oneDNN's grouped 2-D convolutions run about
            # 2.5x faster in that layout on CPUs (fwd + bwd of the default_v2 decoder), and cuDNN's too.
            x = x.view(rows, *self.grid, channels).permute(0, 3, 1, 2)
        else:
            x = x.transpose(1, 2)
        for block in self.blocks:
            out = block(x)
            x = out + x if self.residual and out.shape == x.shape else out
        return self.proj(x.movedim(1, -1).reshape(rows, steps, -1))

