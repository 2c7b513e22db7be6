"""The data2vec 2.0 student: the encoder on visible tokens only, a conv decoder, the loss.

data2vec 2.0 (arXiv 2212.07525; fairseq `examples/data2vec/models/data2vec2.py`) keeps the method of
1.0 and moves the compute: every sample comes as M masked copies ("clones", `method.clones`), the
teacher encodes the clean sample once and its targets serve all M, the student encodes only the
visible tokens of each copy, and a light conv decoder predicts the targets at the masked steps.
`Data2Vec2.forward` is the objective in four named calls:

    targets = teacher.targets(..., repeat=M)    # clean input, once per sample -> rows of all M copies
    x       = self.encoder(..., visible=...)    # the student on each copy's visible tokens
    pred    = self.decode(...)                  # restore the order, noise at masked steps, conv decoder
    loss    = ops.regression_loss(...)          # squared error x 1/sqrt(C), mean over masked rows
                                                # (+ images: the CLS loss)

The batch carries the masks as [B, M, T] (the collate draws them); row b * M + j of every [R, ...]
tensor (R = B * M) is copy j of sample b.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from d2v_engine import ops
from d2v_engine.config import DecoderConfig, LossConfig
from d2v_engine.models.data2vec import loss_scale
from d2v_engine.models.decoder import ConvDecoder, decoder_input
from d2v_engine.models.encoder import Views, visible_index

if TYPE_CHECKING:
    from d2v_engine.teacher import EMATeacher


class Data2Vec2(nn.Module):
    """Student encoder + decoder; `forward(batch, teacher)` returns the loss and detached diagnostics.

    Args:
        encoder: a modality encoder from `models.registry.build_encoder`.
        decoder: the `decoder` config section.
        loss: the `loss` config section (beta, scale, cls_weight).
        clones: M, masked copies per sample (the batch's masks must have M rows per sample).
        backend: kernel backend of the fused ops.
    """

    version = 2

    def __init__(self, encoder: nn.Module, decoder: DecoderConfig, loss: LossConfig, clones: int,
                 backend: str = "auto"):
        super().__init__()
        self.encoder = encoder
        grid = getattr(encoder, "grid", None) if encoder.modality == "image" else None
        self.decoder = ConvDecoder(decoder, encoder.dim, grid)
        self.input_dropout = nn.Dropout(decoder.input_dropout)
        self.noise_std = decoder.mask_noise_std
        self.beta, self.scale = loss.beta, loss_scale(loss.scale, encoder.dim)
        self.cls_weight = loss.cls_weight
        self.clones, self.backend = clones, backend
        if self.cls_weight > 0 and encoder.modality != "image":
            raise ValueError("the CLS loss needs a CLS token: images only")

    @property
    def teacher_copy(self) -> tuple[str, ...]:
        """Encoder parts the teacher copies from the student instead of averaging (2.0's EMA scope)."""
        return self.encoder.teacher_copy_v2

    def forward(self, batch: dict[str, Tensor], teacher: "EMATeacher") -> tuple[Tensor, dict[str, Tensor]]:
        """One micro-batch of the 2.0 objective.

        Args:
            batch: the collate's batch, `mask` [B, M, T] bool (True = masked), on the model's device.
            teacher: the EMA teacher that builds the targets.
        Returns:
            (loss, stats): the scalar loss, detached `pred`/`target` [N, C] (N masked rows of all
            copies) and the `mask` [B * M, T] that orders their rows.
        """
        views = self.encoder.views(batch)
        clones = batch["mask"].shape[1]
        if clones != self.clones:
            raise ValueError(f"the batch has {clones} masks per sample, the model expects {self.clones}")
        mask = batch["mask"].flatten(0, 1)                                       # [R, T]
        want_mean = self.cls_weight > 0
        targets = teacher.targets(views.teacher, mask=mask, padding_mask=views.padding_mask,
                                  repeat=clones, token_mean=want_mean)
        target, cls_target = targets if want_mean else (targets, None)
        pred, cls = self.predict(views, mask)
        loss = ops.regression_loss(pred, target, beta=self.beta, scale=self.scale, reduction="mean",
                                   backend=self.backend)
        if want_mean:
            loss = loss + self.cls_weight * self.cls_loss(cls, cls_target)
        return loss, {"pred": pred.detach(), "target": target, "mask": mask}

    def predict(self, views: Views, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """Predictions at the masked steps of every copy, and the copies' CLS outputs.

        Args:
            views: the encoder's views of the batch.
            mask: [R, T] bool, True = masked.
        Returns:
            ([N, C] predictions, rows in row-major order of `mask`; [R, C] CLS outputs or None).
        """
        padding = None if views.padding_mask is None else views.padding_mask.repeat_interleave(self.clones, 0)
        visible = visible_index(mask, padding, self.clones)
        out = self.encoder(views.student, padding_mask=views.padding_mask, visible=visible)
        x = decoder_input(self.input_dropout(out.x), visible, mask.shape[1], noise_std=self.noise_std,
                          padding_mask=padding)
        return self.decoder(x)[mask], out.cls

    def cls_loss(self, cls: Tensor, cls_target: Tensor) -> Tensor:
        """The CLS term: the student's CLS output of every copy regresses the mean target of its
        sample; the mean over copies (see `LossConfig.cls_weight` for fairseq's equivalent)."""
        target = cls_target.repeat_interleave(self.clones, 0)
        return ops.regression_loss(cls, target, beta=self.beta, scale=self.scale, reduction="mean",
                                   backend=self.backend)

    def step_flops(self, batch: dict[str, Tensor]) -> float:
        """Training matmul FLOPs per sample of one batch (`flops.step_flops_per_sample_v2`)."""
        from d2v_engine.flops import step_flops_per_sample_v2

        return step_flops_per_sample_v2(self.encoder.spec, self.decoder, batch)

