"""CTC fine-tuning pieces: the letter vocabulary, the loss, greedy decoding and WER/CER.

The vocabulary follows `transformers`' `Wav2Vec2CTCTokenizer`: `<pad>` (id 0, also the CTC blank),
`<s>`, `</s>`, `<unk>`, the word delimiter `|`, then the apostrophe and the letters a-z, so that
`CharVocab().to_dict()` is a `vocab.json` that tokenizer loads. Error rates follow `jiwer` (what
Hugging Face `evaluate` computes): edits summed over the corpus, divided by the reference's length.
"""
from __future__ import annotations

import string
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
DELIMITER = "|"
LETTERS = ("'",) + tuple(string.ascii_lowercase)
BLANK = 0
"""The CTC blank: the id of `<pad>`, as in wav2vec 2.0's fine-tuning."""


class CharVocab:
    """Lowercase letters and the apostrophe, words separated by `|`, behind four special tokens."""

    def __init__(self):
        self.tokens = SPECIALS + (DELIMITER,) + LETTERS
        self.ids = {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def to_dict(self) -> dict[str, int]:
        """token -> id, the content of a Hugging Face `vocab.json`."""
        return dict(self.ids)

    def encode(self, text: str) -> list[int]:
        """Letter ids of `text`: lowercased, runs of whitespace -> one `|`, ends stripped.

        Raises:
            ValueError: a character outside the vocabulary (the message names it).
        """
        normal = DELIMITER.join(text.lower().split())
        unknown = sorted(set(normal) - set(LETTERS) - {DELIMITER})
        if unknown:
            raise ValueError(f"characters outside the vocabulary: {' '.join(map(repr, unknown))}")
        return [self.ids[c] for c in normal]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of letter ids: `|` -> a space, special tokens dropped, spaces collapsed and stripped."""
        chars = [self.tokens[i] for i in ids if i >= len(SPECIALS)]
        return " ".join("".join(chars).replace(DELIMITER, " ").split())


def ctc_loss(log_probs: Tensor, frame_lengths: Tensor, targets: Tensor | list[list[int]],
             target_lengths: Tensor | None = None) -> Tensor:
    """CTC loss of a batch, blank 0, in fp32; each utterance's loss over its target length, then the
    batch mean (`reduction="mean"`, Hugging Face's `ctc_loss_reduction="mean"`).

    Alignments that cannot fit (more letters than frames) give zero instead of inf (`zero_infinity`).

    Args:
        log_probs: [B, T, V] log-softmax outputs (any float dtype; computed in fp32).
        frame_lengths: [B] valid frames per row.
        targets: B lists of letter ids, or [B, S] padded ids with `target_lengths`.
        target_lengths: [B] letters per row; None when `targets` are lists.
    Returns:
        The scalar loss.
    """
    if isinstance(targets, Tensor):
        if target_lengths is None:
            raise ValueError("padded targets need target_lengths")
        flat = targets
    else:
        target_lengths = torch.tensor([len(t) for t in targets])
        flat = torch.tensor([i for t in targets for i in t], dtype=torch.long)
    device = log_probs.device
    # F.ctc_loss takes time first: [T, B, V].
    return F.ctc_loss(log_probs.float().transpose(0, 1), flat.to(device=device, dtype=torch.long),
                      frame_lengths.to(device=device, dtype=torch.long),
                      target_lengths.to(device=device, dtype=torch.long),
                      blank=BLANK, reduction="mean", zero_infinity=True)


def greedy_decode(log_probs: Tensor, lengths: Tensor | None = None, blank: int = BLANK) -> list[list[int]]:
    """Best path decoding: the argmax of every frame, repeats collapsed, then blanks dropped.

    Args:
        log_probs: [B, T, V] scores (log-probabilities or logits: only the argmax counts).
        lengths: [B] valid frames per row; None = all T.
        blank: the blank's id.
    Returns:
        B lists of ids.
    """
    best = log_probs.argmax(-1).cpu()
    batch, frames = best.shape
    valid = torch.arange(frames) < (lengths.cpu()[:, None] if lengths is not None else frames)
    previous = torch.cat([torch.full((batch, 1), -1, dtype=best.dtype), best[:, :-1]], dim=1)
    keep = valid & (best != previous) & (best != blank)
    return [row[k].tolist() for row, k in zip(best, keep)]


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1) of two sequences."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


def error_rates(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Word and character error rates of a corpus, as `jiwer` and Hugging Face `evaluate` count them.

    Both strings are stripped and their runs of whitespace collapsed to one space. WER: word edits
    over all utterances / reference words. CER: character edits / reference characters, the spaces
    between words included.

    Args:
        hyps: decoded texts.
        refs: the reference transcripts, one per hypothesis.
    Returns:
        {"wer": float, "cer": float, "words": reference words, "chars": reference characters}.
    """
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    word_edits = char_edits = words = chars = 0
    for hyp, ref in zip(hyps, refs):
        hyp_words, ref_words = hyp.split(), ref.split()
        word_edits += edit_distance(hyp_words, ref_words)
        char_edits += edit_distance(" ".join(hyp_words), " ".join(ref_words))
        words += len(ref_words)
        chars += len(" ".join(ref_words))
    if words == 0:
        raise ValueError("the references hold no words")
    return {"wer": word_edits / words, "cer": char_edits / chars, "words": words, "chars": chars}
