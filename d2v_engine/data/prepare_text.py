"""text-corpus: WordNet glosses, the King James Bible and fortunes, plus a byte-level BPE tokenizer.

- `train/`: every text of the three sources, shuffled, except the glosses held out for probe testing;
- `probe_train/`, `probe_test/`: WordNet glosses labelled with their lexicographer file (45 classes:
  adj.all, ..., noun.animal, ..., verb.weather), disjoint;
- `tokenizer.json`: byte-level BPE (about 8k entries) trained on `train/`, whose first ids are
  RoBERTa's `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, then `<mask>`=4.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from d2v_engine.data.shards import ShardSetWriter
from d2v_engine.errors import UserError

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNE_DIR = Path("/usr/share/games/fortunes")
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
VOCAB_SIZE = 8192
PROBE_SIZES = {"probe_train": 20000, "probe_test": 5000}
"""Glosses per probe split of the full set (of 117,659)."""

_OVERSTRIKE = re.compile(r".\x08")
_VERSE = re.compile(r"^\s+\d+ (.+)$")


def _missing(what: str, package: str) -> UserError:
    return UserError(f"{what} is missing; install it with `apt-get install -y --no-install-recommends "
                     f"{package}`.")


def read_wordnet() -> list[tuple[str, int]]:
    """(gloss, lexicographer file number 0-44) for every synset of WordNet 3.0."""
    glosses = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = WORDNET_DIR / f"data.{pos}"
        if not path.is_file():
            raise _missing(str(path), "wordnet-base")
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  "):  # the licence header
                continue
            fields, _, gloss = line.partition(" | ")
            gloss = gloss.strip()
            if gloss:
                # synset_offset lex_filenum ss_type ...: the second field is the class.
                glosses.append((gloss, int(fields.split(" ", 2)[1])))
    return glosses


def read_bible() -> list[str]:
    """The 31,102 verses of the King James Bible, from the `bible` program (one verse each)."""
    if shutil.which("bible") is None:
        raise _missing("the `bible` program", "bible-kjv")
    # Output: "Genesis 1" headers, blank lines, and "  <verse number> <text>" lines.
    listing = subprocess.run(["bible", "-l100000", "gen1:1-rev22:21"], capture_output=True,
                             text=True, check=True).stdout
    return [m.group(1).strip() for m in map(_VERSE.match, listing.splitlines()) if m]


def read_fortunes() -> list[str]:
    """Every fortune of /usr/share/games/fortunes (`%`-separated items; overstrikes removed)."""
    if not FORTUNE_DIR.is_dir():
        raise _missing(str(FORTUNE_DIR), "fortunes")
    items = []
    for path in sorted(FORTUNE_DIR.iterdir()):
        # .dat are strfile indexes and .u8 links to the same files.
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
            continue
        text = _OVERSTRIKE.sub("", path.read_text(encoding="utf-8", errors="replace"))
        items += [item.strip() for item in re.split(r"^%$", text, flags=re.M) if item.strip()]
    return items


def train_tokenizer(texts: list[str], path: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Train and save a byte-level BPE whose first ids are SPECIAL_TOKENS in order.

    Args:
        texts: the training texts.
        path: where `tokenizer.json` goes.
        vocab_size: target size, specials included.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    # RoBERTa's template, for users who encode with special tokens (the reader adds them itself).
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special token ids {ids} are not 0..{len(SPECIAL_TOKENS) - 1}")
    tokenizer.save(str(path))


def _write(folder: Path, texts: list[str], labels: list[int] | None, shard_size: int, extra: dict) -> int:
    with ShardSetWriter(folder, modality="text", shard_size=shard_size, extra=extra) as writer:
        for i, text in enumerate(texts):
            fields = {"txt": text} if labels is None else {"txt": text, "cls": labels[i]}
            writer.write(f"{i:07d}", **fields)
    return len(texts)


def prepare_text_corpus(out: Path, opts) -> dict[str, int]:
    """Write the splits and the tokenizer of text-corpus under `out`.

    Args:
        out: the data set's (temporary) folder.
        opts: `PrepareOptions` (limit caps every split; seed fixes the shuffles).
    Returns:
        Texts per split.
    """
    glosses, verses, fortunes = read_wordnet(), read_bible(), read_fortunes()
    rng = np.random.default_rng([opts.seed, 0x7E47])
    order = rng.permutation(len(glosses))
    n_test, n_train = opts.cap(PROBE_SIZES["probe_test"]), opts.cap(PROBE_SIZES["probe_train"])
    test, probe = order[:n_test], order[n_test:n_test + n_train]
    # Probe-test glosses stay out of pretraining, as Fashion-MNIST's test images do.
    held = set(test.tolist())
    corpus = [g for i, (g, _) in enumerate(glosses) if i not in held] + verses + fortunes
    corpus = [corpus[i] for i in rng.permutation(len(corpus))[: opts.cap(len(corpus))]]
    extra = {"source": "wordnet+kjv+fortunes", "limit": opts.limit, "seed": opts.seed}
    counts = {"train": _write(out / "train", corpus, None, opts.shard_size,
                              {**extra, "split": "train", "sources": {
                                  "wordnet": len(glosses) - len(held), "kjv": len(verses),
                                  "fortunes": len(fortunes)}})}
    for split, rows in (("probe_train", probe), ("probe_test", test)):
        counts[split] = _write(out / split, [glosses[i][0] for i in rows],
                               [glosses[i][1] for i in rows], opts.shard_size,
                               {**extra, "split": split, "labels": "wordnet lexicographer file 0-44"})
    train_tokenizer(corpus, out / "tokenizer.json")
    return counts
