"""Text encoder of data2vec text 1.0 (RoBERTa layout, Hugging Face Data2VecText names).

Token embeddings + learned RoBERTa positions + LayerNorm + dropout, then post-LN Transformer blocks,
no final LayerNorm. The embeddings are shared with the teacher by copying (`teacher_copy`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from d2v_engine.models.encoder import (EncoderOutput, LayerCallback, TransformerEncoder, Views, Visible,
                                       gather_visible, init_linear_)
from d2v_engine.models.spec import ModelSpec


def roberta_positions(valid: Tensor, pad_idx: int) -> Tensor:
    """RoBERTa position ids: the i-th valid token (from 0) gets pad_idx + 1 + i, padding gets pad_idx.

    Args:
        valid: [B, T] bool, True = real token.
        pad_idx: the padding token id (its position row is the padding row).
    Returns:
        [B, T] int64 position ids.
    """
    valid = valid.long()
    return torch.cumsum(valid, dim=1) * valid + pad_idx


class TextEmbeddings(nn.Module):
    """word_embeddings + position_embeddings -> LayerNorm -> dropout (HF `embeddings.*`)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        t = spec.transformer
        self.pad_idx, self.max_positions = spec.pad_idx, spec.max_positions
        self.word_embeddings = nn.Embedding(spec.vocab_size, t.dim, padding_idx=spec.pad_idx)
        # Rows 0..pad_idx are never used by real tokens: positions start at pad_idx + 1 (514 rows for base).
        self.position_embeddings = nn.Embedding(spec.max_positions + spec.pad_idx + 1, t.dim,
                                                padding_idx=spec.pad_idx)
        self.LayerNorm = nn.LayerNorm(t.dim, eps=t.norm_eps)
        self.dropout = nn.Dropout(t.dropout)

    def forward(self, tokens: Tensor, valid: Tensor) -> Tensor:
        """Embed.

        Args:
            tokens: [B, T] int64 token ids.
            valid: [B, T] bool, True = real token (not padding).
        Returns:
            [B, T, C].
        """
        if tokens.shape[1] > self.max_positions:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds max_positions={self.max_positions}")
        x = self.word_embeddings(tokens) + self.position_embeddings(roberta_positions(valid, self.pad_idx))
        return self.dropout(self.LayerNorm(x))


class TextEncoder(nn.Module):
    """data2vec text 1.0 encoder (RoBERTa).

    Masking happens at the token level in the data collate (BERT 80/10/10 on `tokens`), so `forward`
    accepts `mask` for a uniform signature but ignores it: the student's input ids already carry it.
    """

    modality = "text"
    teacher_exclude: tuple[str, ...] = ()
    teacher_copy: tuple[str, ...] = ("embeddings",)
    teacher_copy_v2: tuple[str, ...] = ("embeddings",)
    """data2vec 2.0 text averages the blocks only (`ema_encoder_only`): the embeddings are shared."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        t = spec.transformer
        self.spec, self.dim, self.num_layers = spec, t.dim, t.depth
        self.grad_checkpointing = False
        self.embeddings = TextEmbeddings(spec)
        self.encoder = TransformerEncoder(t)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """BERT init: normal(0.02) Linear and embedding weights, zero biases and padding rows.

        Idempotent; a ZeRO-3 caller may re-run it while the parameters are gathered.
        """
        init_linear_(self)
        for emb in (self.embeddings.word_embeddings, self.embeddings.position_embeddings):
            nn.init.normal_(emb.weight, std=0.02)
            emb.weight[emb.padding_idx].zero_()
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    def views(self, batch: dict[str, Tensor]) -> Views:
        """The student reads the BERT-masked ids, the teacher the clean ones.

        Args:
            batch: `tokens` [B, T], `clean` [B, T], `padding_mask` [B, T] bool.
        Returns:
            Views(tokens, clean, padding_mask, None).
        """
        return Views(batch["tokens"], batch["clean"], batch["padding_mask"], None)

    def forward(self, x: Tensor, *, mask: Tensor | None = None, padding_mask: Tensor | None = None,
                top_k: int = 0, on_layer: LayerCallback | None = None,
                visible: Visible | None = None) -> EncoderOutput:
        """Encode token ids.

        Args:
            x: [B, T] int64 token ids.
            mask: ignored (the collate already replaced the selected tokens; see the class docstring).
            padding_mask: [B, T] bool, True = padding key (attention only: positions always skip
                `<pad>` tokens); None = derived from `spec.pad_idx`.
            top_k: number of final blocks whose target outputs are returned.
            on_layer: streaming alternative to `layer_results` (see `TransformerEncoder.forward`).
            visible: 2.0 student: embed the clean ids once, then encode each clone row's visible
                tokens only (at their original positions: the embedding adds them before the gather).
        Returns:
            EncoderOutput: x [B, T, C] (last block output; [R, V, C] with `visible`), layer_results
            top_k x [B, T, C], padding_mask as given (or derived; with `visible`: of the visible
            slots), cls None.
        """
        pads = x.eq(self.spec.pad_idx)
        if padding_mask is None:
            padding_mask = pads
        # Positions count non-<pad> tokens (fairseq's make_positions, Hugging Face's RoBERTa), whatever
        # the attention mask: the same thing in every batch the collate builds.
        h = self.embeddings(x, ~pads)
        if visible is not None:
            h, padding_mask = gather_visible(h, visible), visible.padding
        h, layers = self.encoder(h, padding_mask=padding_mask, top_k=top_k,
                                 grad_checkpointing=self.grad_checkpointing, on_layer=on_layer)
        return EncoderOutput(x=h, layer_results=layers, padding_mask=padding_mask)
