"""The data2vec student: an encoder, a regression head, and the loss against the teacher's targets.

`Data2Vec.forward` is the whole objective in three named calls:
    targets = teacher.targets(...)       # clean input, no grad, top-K normalised average [M, C]
    pred    = self.predict(...)          # masked input, head at the masked positions    [M, C]
    loss    = ops.regression_loss(...)   # smooth L1 / squared error, averaged over masked rows
The teacher is passed in, not owned: it is not trained, and DeepSpeed must neither optimise nor
(under ZeRO 0-2) replicate-reduce it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from d2v_engine import ops
from d2v_engine.config import LossConfig
from d2v_engine.models.encoder import Views

if TYPE_CHECKING:
    from d2v_engine.teacher import EMATeacher


def build_head(kind: str, dim: int) -> nn.Module:
    """The student's regression head: `linear` (images, audio) or a 2-layer `mlp` (text)."""
    if kind == "linear":
        return nn.Linear(dim, dim)
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


def loss_scale(kind: str, dim: int) -> float:
    """The factor on each row's sum over channels (`loss.scale`)."""
    return {"one": 1.0, "inv_sqrt_dim": 1.0 / math.sqrt(dim), "inv_dim": 1.0 / dim}[kind]


class Data2Vec(nn.Module):
    """Student encoder + head; `forward(batch, teacher)` returns the loss and detached diagnostics.

    Args:
        encoder: a modality encoder from `models.registry.build_encoder`.
        loss: the `loss` config section (beta, scale).
        backend: kernel backend of the fused ops.
    """

    version = 1
    clones = 1
    """One masked copy per sample (data2vec 2.0 has several: `Data2Vec2.clones`)."""

    def __init__(self, encoder: nn.Module, loss: LossConfig, backend: str = "auto"):
        super().__init__()
        self.encoder = encoder
        self.head = build_head(encoder.spec.head, encoder.dim)
        self.beta = loss.beta
        self.scale = loss_scale(loss.scale, encoder.dim)
        self.backend = backend

    @property
    def teacher_copy(self) -> tuple[str, ...]:
        """Encoder parts the teacher copies from the student instead of averaging (1.0's sharing)."""
        return self.encoder.teacher_copy

    def step_flops(self, batch: dict[str, Tensor]) -> float:
        """Training matmul FLOPs per sample of one batch (`flops.step_flops_per_sample`)."""
        from d2v_engine.flops import step_flops_per_sample

        return step_flops_per_sample(self.encoder.spec, batch)

    def predict(self, views: Views, mask: Tensor) -> Tensor:
        """Student predictions at the masked positions.

        Args:
            views: the encoder's views of the batch (student input, padding, embedding mask).
            mask: [B, T] bool, True = masked (loss) positions.
        Returns:
            [M, C] predictions, M = mask.sum(), rows in row-major order of `mask`.
        """
        out = self.encoder(views.student, mask=views.embed_mask, padding_mask=views.padding_mask)
        return self.head(out.x[mask])

    def forward(self, batch: dict[str, Tensor], teacher: "EMATeacher") -> tuple[Tensor, dict[str, Tensor]]:
        """One micro-batch of the objective.

        Args:
            batch: the collate's batch (layout in `d2v_engine.data`), on the model's device.
            teacher: the EMA teacher that builds the targets.
        Returns:
            (loss, stats): the scalar loss (mean over masked rows), detached `pred`/`target` [M, C] and
            the `mask` [B, T] that orders their rows.
        """
        views = self.encoder.views(batch)
        mask = batch["mask"]
        target = teacher.targets(views.teacher, mask=mask, padding_mask=views.padding_mask)
        pred = self.predict(views, mask)
        loss = ops.regression_loss(pred, target, beta=self.beta, scale=self.scale, reduction="mean",
                                   backend=self.backend)
        return loss, {"pred": pred.detach(), "target": target, "mask": mask}


def masked_std(x: Tensor) -> Tensor:
    """Mean over channels of each channel's standard deviation over rows (fairseq's `compute_var`).

    Args:
        x: [M, C] predictions or targets at the masked positions.
    Returns:
        A 0-d fp32 tensor; collapse shows as this falling towards 0.
    """
    x = x.float()
    if x.shape[0] < 2:
        return torch.zeros((), device=x.device)
    return torch.sqrt(x.var(dim=0) + 1e-6).mean()


def std_across_samples(x: Tensor, mask: Tensor) -> Tensor:
    """`masked_std` among the rows that share a position, averaged over positions and channels.

    `masked_std` cannot tell a target that carries the input from one that only encodes where a row
    sits (its frame or token index): both vary over rows. This spread compares rows of different
    samples at the same position, so a positional collapse (student and teacher agreeing on a
    function of the position alone, which the loss then fits almost exactly) shows as it going to 0
    while `masked_std` stays high. Instance-normalised audio targets are the usual victims.

    Args:
        x: [M, C] rows at the masked positions of `mask`, in its row-major order.
        mask: [B, T] bool, M True entries.
    Returns:
        A 0-d fp32 tensor: sqrt of the mean, over positions masked in two or more samples and over
        channels, of the variance across those samples; 0 when no position qualifies.
    """
    x = x.float()
    pos = mask.nonzero()[:, 1]
    count = torch.zeros(mask.shape[1], device=x.device).index_add_(0, pos, torch.ones_like(pos, dtype=x.dtype))
    s1 = torch.zeros(mask.shape[1], x.shape[1], device=x.device).index_add_(0, pos, x)
    s2 = torch.zeros_like(s1).index_add_(0, pos, x * x)
    keep = count >= 2
    if not bool(keep.any()):
        return torch.zeros((), device=x.device)
    n = count[keep, None]
    var = (s2[keep] - s1[keep] ** 2 / n) / (n - 1)
    return torch.sqrt(var.clamp_min(0).mean() + 1e-6)
