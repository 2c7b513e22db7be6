"""Fine-tuning tasks and their labelled data, held in memory and dealt out in seeded batches.

    FT_TASKS                  name -> FinetuneTask (its modality, splits, head kind and metric)
    load_split(...)           a split's decoded inputs and labels (classes or transcripts)
    LabelledSet               decoded samples + labels; `.batch(ids)` collates them with their ids
    batch_ids(step, ...)      the sample ids of one rank's micro-batch: a pure function of the step

Inputs are decoded once, with the probes' deterministic readers (`probes.ImageInputs`,
`AudioInputs`, `TextInputs`): the labelled sets are small, and the training-time randomness
(crops, flips, mixup, audio masks) is applied per batch in `heads`. Batches come from a seeded
permutation per epoch, so that the data position is the step and resuming needs no reader state.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from d2v_engine import probes
from d2v_engine.ctc import CharVocab
from d2v_engine.data.transcripts import read_transcribed
from d2v_engine.errors import UserError
from d2v_engine.eval import TASKS as PROBE_TASKS, Task, build_inputs, read_labelled


@dataclass(frozen=True)
class FinetuneTask:
    modality: str
    """The modality whose runs the task fine-tunes."""
    train: str
    """Labelled training shards, relative to the data root (or a path, for `custom`)."""
    test: str
    """Test shards, likewise."""
    prepare: str
    """The `d2v prepare` data set that provides them."""
    kind: str = "classify"
    """`classify` (a `.cls` per sample) or `ctc` (a `.txt` transcript per clip)."""
    snr_db: float | None = None
    """Audio: white noise at this SNR in both sets; None = clean."""

    @property
    def metric(self) -> str:
        """The figure that `finetune.json` reports: `accuracy`, or `cer` for CTC (`wer` beside it)."""
        return "cer" if self.kind == "ctc" else "accuracy"


def _from_probe(name: str, train: str | None = None) -> FinetuneTask:
    t = PROBE_TASKS[name]
    return FinetuneTask(t.modality, train or t.train, t.test, t.prepare, snr_db=t.snr_db)


FT_TASKS: dict[str, FinetuneTask] = {
    # every one of the 60k training images is a candidate label (the probe reads the first 10k)
    "fashion-mnist": _from_probe("fashion-mnist"),
    "spoken-digits": _from_probe("spoken-digits"),
    "spoken-digits-5db": _from_probe("spoken-digits-5db"),
    "spoken-words-ctc": FinetuneTask("audio", "spoken-words/ctc_train", "spoken-words/ctc_test",
                                     "spoken-words", kind="ctc"),
    "wordnet": _from_probe("wordnet"),
}


@dataclass
class LabelledSet:
    """Decoded samples and their labels.

    `items` are what the modality's `*Inputs.decode` returns (images are stacked into one tensor);
    `labels` are class ids 0..K-1 (int64 [N]) or, for CTC, the transcripts' id lists.
    """

    items: list | Tensor
    labels: np.ndarray | list[list[int]]
    collate: object
    texts: list[str] | None = None
    """CTC: the reference transcripts (for WER/CER)."""

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, ids: np.ndarray) -> dict[str, Tensor]:
        """Collate the samples `ids` (plus `index`, their ids; `labels`, or CTC `targets` + `target_lengths`)."""
        if isinstance(self.items, Tensor):
            out = {"images": self.items[torch.from_numpy(ids)]}
        else:
            out = self.collate([self.items[i] for i in ids])
        out["index"] = torch.from_numpy(ids.astype(np.int64))
        if isinstance(self.labels, np.ndarray):
            out["labels"] = torch.from_numpy(self.labels[ids])
        else:
            seqs = [self.labels[i] for i in ids]
            lengths = torch.tensor([len(s) for s in seqs])
            targets = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.int64)
            for row, s in enumerate(seqs):
                targets[row, :len(s)] = torch.tensor(s)
            out["targets"], out["target_lengths"] = targets, lengths
        return out


def choose_labels(n: int, labels: float, seed: int) -> np.ndarray:
    """The ids of the labelled training samples: `labels` of `n` (a count, a fraction, 0 = all), seeded.

    Raises:
        UserError: more labels asked for than the set holds.
    """
    count = n if labels == 0 else int(round(labels * n)) if labels < 1 else int(labels)
    if count > n:
        raise UserError(f"finetune.labels={labels:g} asks for more labelled samples than the {n} the "
                        f"task's training set holds; pass at most {n}.")
    if count < 1:
        raise UserError(f"finetune.labels={labels:g} leaves no labelled sample of the {n}; pass more.")
    order = np.random.default_rng([seed, 0xF17E]).permutation(n)
    return np.sort(order[:count])


def load_split(name: str, task: FinetuneTask, cfg, spec, root: Path, split: str, vocab: CharVocab | None,
               echo=print) -> LabelledSet:
    """A split's decoded inputs and labels.

    Args:
        name: the task's name (`custom` reads paths as given); task: what to read.
        cfg: the fine-tuning config (normalisation, tokenizer, labels, seed); spec: the model's spec.
        root: the data root; split: `train` (the label budget applies) or `test` (`test_limit`).
        vocab: CTC's letters; None for classification.
        echo: where a line about skipped samples goes.
    Returns:
        The LabelledSet (class ids as read; `remap_classes` numbers them).
    """
    folder = Path(getattr(task, split)) if name == "custom" else root / getattr(task, split)
    if task.kind == "ctc":   # whole clips: a crop would cut words out of the transcript
        inputs = probes.AudioInputs(cfg.data.sample_rate, 2**62, task.snr_db, cfg.seed)
    else:
        inputs = build_inputs(cfg, spec, Task(task.modality, task.train, task.test, task.prepare,
                                              snr_db=task.snr_db))
    ft = cfg.finetune
    if task.kind == "ctc":
        seconds = ft.label_seconds if split == "train" and ft.label_seconds > 0 else None
        raws, texts, empty = read_transcribed(folder, seconds, name, task.prepare)
        if empty:
            echo(f"finetune: skipped {empty} sample(s) with an empty transcript in '{folder}'")
        raws, texts, labels = _encode_transcripts(raws, texts, vocab, folder, echo)
        if split == "train" and ft.labels:
            keep = choose_labels(len(raws), ft.labels, cfg.seed)
            raws, texts, labels = [raws[i] for i in keep], [texts[i] for i in keep], [labels[i] for i in keep]
    else:
        if ft.label_seconds:
            raise UserError(f"finetune.label_seconds (a --labels duration) budgets transcribed audio; task "
                            f"'{name}' classifies, so pass a count or a fraction of its samples.")
        raws, labels = read_labelled(folder, None, name, task.prepare)
        texts = None
        if split == "train":
            keep = choose_labels(len(raws), ft.labels, cfg.seed)
            raws, labels = [raws[i] for i in keep], labels[keep]
    if split == "test" and ft.test_limit:
        raws, labels = raws[:ft.test_limit], labels[:ft.test_limit]
        texts = texts[:ft.test_limit] if texts is not None else None
    items = [inputs.decode(raw, i) for i, raw in enumerate(raws)]
    if task.modality == "image":
        items = torch.stack(items)
    return LabelledSet(items, labels, inputs.collate, texts)


def _encode_transcripts(raws, texts, vocab: CharVocab, folder: Path, echo):
    """Transcripts -> letter ids; a transcript with a letter outside the vocabulary is skipped and counted."""
    kept_raws, kept_texts, ids, bad = [], [], [], []
    for raw, text in zip(raws, texts):
        try:
            ids.append(vocab.encode(text))
        except ValueError as err:
            bad.append(str(err))
            continue
        kept_raws.append(raw)
        kept_texts.append(vocab.decode(ids[-1]))
    if bad:
        echo(f"finetune: skipped {len(bad)} transcript(s) in '{folder}' with characters outside the "
             f"letter vocabulary (first: {bad[0]})")
    if not ids:
        raise UserError(f"no transcript in '{folder}' can be written in the letter vocabulary "
                        f"(a-z, apostrophe, space); check the .txt files.")
    return kept_raws, kept_texts, ids


def remap_classes(train: LabelledSet, test: LabelledSet, name: str, echo=print) -> list[int]:
    """Number the classes of both sets 0..K-1 (the head has K outputs); returns the class ids in order.

    A test class that no labelled training sample shows (a small label budget of a long-tailed
    task) keeps its head output, which never learns: its test samples count as errors, and one
    line says how many there are.
    """
    classes = np.unique(np.concatenate([train.labels, test.labels]))
    unseen = sorted(set(np.unique(test.labels).tolist()) - set(np.unique(train.labels).tolist()))
    if unseen:
        count = int(np.isin(test.labels, unseen).sum())
        echo(f"finetune: task '{name}': {count} test sample(s) are of {len(unseen)} class(es) that none of "
             f"the {len(train)} labelled training samples has (first: {unseen[:5]}); they count as errors.")
    train.labels = np.searchsorted(classes, train.labels)
    test.labels = np.searchsorted(classes, test.labels)
    return classes.tolist()


def batch_ids(step: int, micro: int, n: int, batch_size: int, rank: int, world_size: int, accum: int,
              seed: int) -> np.ndarray:
    """The sample ids of one rank's micro-batch `micro` of optimizer step `step`.

    The global batches walk through one seeded permutation of the n samples per epoch, each
    batch split into `accum` micro-batches and those into `world_size` rank slices.
    """
    per_rank = batch_size // (accum * world_size)
    start = step * batch_size + (micro * world_size + rank) * per_rank
    ids = np.empty(per_rank, dtype=np.int64)
    for k in range(per_rank):
        epoch, pos = divmod(start + k, n)
        ids[k] = _permutation(seed, epoch, n)[pos]
    return ids


_PERMS: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _PERMS:
        if len(_PERMS) > 4:
            _PERMS.clear()
        _PERMS[key] = np.random.default_rng([seed, epoch, 0xBA7C]).permutation(n)
    return _PERMS[key]


def custom_task(modality: str, train: str, test: str, kind: str) -> FinetuneTask:
    """The `custom` task: the user's labelled (or, CTC, transcribed) shard folders."""
    return FinetuneTask(modality, train, test, "", kind=kind)

