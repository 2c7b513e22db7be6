"""The CTC pieces: vocabulary, greedy decoding of known alignments, edit distance, WER/CER, the loss."""
from __future__ import annotations

import itertools
import json
import math
from functools import lru_cache

import numpy as np
import pytest
import torch
from asserts import assert_close

from d2v_engine.ctc import BLANK, CharVocab, ctc_loss, edit_distance, error_rates, greedy_decode

VOCAB = CharVocab()
ALPHABET = "abcdefghijklmnopqrstuvwxyz'"


def random_phrase(rng: np.random.Generator) -> str:
    """Words of random letters (some capitals), joined by runs of spaces, tabs and stray ends."""
    words = ["".join(rng.choice(list(ALPHABET + "ABCXYZ"), int(rng.integers(1, 8))))
             for _ in range(int(rng.integers(1, 6)))]
    gaps = [rng.choice([" ", "  ", "\t", " \n "]) for _ in words]
    return rng.choice(["", " "]) + "".join(w + g for w, g in zip(words, gaps))


def one_hot_frames(path: list[int], frames: int, rng: np.random.Generator) -> torch.Tensor:
    """[frames, V] log-probs whose argmax follows `path`, then random frames beyond it."""
    generator = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    scores = torch.randn(frames, len(VOCAB), generator=generator)
    scores[torch.arange(len(path)), torch.tensor(path, dtype=torch.long)] += 20.0
    return scores.log_softmax(-1)


def alignment(labels: list[int], rng: np.random.Generator) -> list[int]:
    """A CTC path of `labels`: each repeated 1-3 times, blanks at random and between equal neighbours."""
    path = []
    for k, label in enumerate(labels):
        if rng.random() < 0.4 or (k and labels[k - 1] == label):
            path += [BLANK] * int(rng.integers(1, 3))
        path += [label] * int(rng.integers(1, 4))
    return path + [BLANK] * int(rng.integers(0, 3))


def test_vocab_layout_is_wav2vec2s():
    ids = VOCAB.to_dict()
    assert len(VOCAB) == 32 == len(ids) and sorted(ids.values()) == list(range(32))
    assert [ids[t] for t in ("<pad>", "<s>", "</s>", "<unk>", "|")] == [0, 1, 2, 3, 4] and BLANK == 0
    assert set(ids) - {"<pad>", "<s>", "</s>", "<unk>", "|"} == set(ALPHABET)


def test_encode_decode_round_trip():
    rng = np.random.default_rng(11)
    for _ in range(200):
        text = random_phrase(rng)
        ids = VOCAB.encode(text)
        normal = " ".join(text.lower().split())
        assert VOCAB.decode(ids) == normal and len(ids) == len(normal)
        assert ids[0] != 4 and ids[-1] != 4 and all(a != 4 or b != 4 for a, b in zip(ids, ids[1:]))
    assert VOCAB.encode("Hi  you") == [VOCAB.to_dict()[c] for c in "hi|you"]
    # Special tokens the model may emit are not text.
    assert VOCAB.decode([1, 13, 3, 14, 4, 4, 2, 0]) == "hi"


def test_vocab_matches_the_hugging_face_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB.to_dict()))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"))
    rng = np.random.default_rng(12)
    for _ in range(20):
        text = " ".join(random_phrase(rng).lower().split())
        assert tokenizer(text).input_ids == VOCAB.encode(text)


@pytest.mark.parametrize("text, bad", [("café", "'é'"), ("a-b", "'-'"), ("1 2", "'1'")])
def test_unknown_character_raises_and_names_it(text, bad):
    with pytest.raises(ValueError, match=bad):
        VOCAB.encode(text)


def test_greedy_decode_recovers_known_alignments():
    rng = np.random.default_rng(13)
    labels = [VOCAB.encode("hello all"), VOCAB.encode("b")]
    labels += [[int(i) for i in rng.integers(4, len(VOCAB), int(rng.integers(1, 12)))] for _ in range(14)]
    paths = [alignment(lab, rng) for lab in labels]
    frames = max(map(len, paths)) + 5
    log_probs = torch.stack([one_hot_frames(p, frames, rng) for p in paths])
    lengths = torch.tensor([len(p) for p in paths])
    assert greedy_decode(log_probs, lengths) == labels
    assert VOCAB.decode(greedy_decode(log_probs[:1], lengths[:1])[0]) == "hello all"
    # The frames past each row's length are random: decoding all of them changes the rows.
    assert greedy_decode(log_probs) != labels


def test_greedy_decode_collapses_before_dropping_blanks():
    path = [5, 5, 0, 5, 6, 0, 0, 6, 6, 7]
    log_probs = torch.nn.functional.one_hot(torch.tensor(path), 8).float()[None].log()
    assert greedy_decode(log_probs, torch.tensor([10])) == [[5, 5, 6, 6, 7]]
    assert greedy_decode(log_probs, torch.tensor([1])) == [[5]]
    assert greedy_decode(log_probs, torch.tensor([0])) == [[]]


def edit_distance_ref(a: str, b: str) -> int:
    """Levenshtein distance by the recursive definition, memoised."""
    @lru_cache(maxsize=None)
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


def test_edit_distance_matches_the_recursive_definition():
    rng = np.random.default_rng(14)
    for _ in range(300):
        a, b = ("".join(rng.choice(list("abc"), int(rng.integers(0, 9)))) for _ in range(2))
        assert edit_distance(a, b) == edit_distance_ref(a, b) == edit_distance(b, a)
        assert edit_distance(a.split("a"), b.split("a")) == edit_distance_ref(tuple(a.split("a")),
                                                                                tuple(b.split("a")))
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3


def test_error_rates_on_hand_checked_examples():
    one_of_four = error_rates(["the cat sat down"], ["the dog sat down"])
    assert one_of_four["wer"] == 0.25 and one_of_four["cer"] == pytest.approx(3 / 16)
    # Summed over the corpus, not averaged per utterance: (1 + 0) / (4 + 1) words.
    assert error_rates(["the cat sat down", "yes"], ["the dog sat down", "yes"])["wer"] == 0.2
    # CER counts the spaces of the reference (jiwer): one deleted letter of "ab cd" is 1/5.
    assert error_rates(["ab c"], ["ab cd"])["cer"] == 0.2
    # A missing word is one word edit; a merged pair is two word edits but one character edit.
    rates = error_rates(["go  up", "leftright"], [" go up now", "left right"])
    assert rates["wer"] == pytest.approx(3 / 5) and rates["cer"] == pytest.approx(5 / 19)
    with pytest.raises(ValueError):
        error_rates(["a"], [])


def ctc_loss_ref(log_probs: torch.Tensor, target: list[int]) -> float:
    """-log of the summed probability of every path that collapses to `target`, over its length."""
    frames, vocab = log_probs.shape
    total = 0.0
    for path in itertools.product(range(vocab), repeat=frames):
        collapsed = [k for i, k in enumerate(path) if k != BLANK and (i == 0 or path[i - 1] != k)]
        if collapsed == target:
            total += math.exp(sum(log_probs[t, k].item() for t, k in enumerate(path)))
    return -math.log(total) / len(target)


def test_ctc_loss_is_the_mean_over_rows_of_the_loss_per_letter():
    log_probs = torch.randn(3, 5, 4, dtype=torch.float64).log_softmax(-1)
    lengths = torch.tensor([5, 3, 4])
    targets = [[1, 2, 2], [3], [1, 3]]
    expected = np.mean([ctc_loss_ref(log_probs[b, :n], t) for b, (n, t) in enumerate(zip(lengths, targets))])
    assert_close(ctc_loss(log_probs, lengths, targets), torch.tensor(expected), rtol=1e-5)
    padded = torch.tensor([[1, 2, 2], [3, 0, 0], [1, 3, 0]])
    assert_close(ctc_loss(log_probs.bfloat16(), lengths, padded, torch.tensor([3, 1, 2])),
                 torch.tensor(expected), rtol=2e-2)
    assert ctc_loss(log_probs, lengths, padded, torch.tensor([3, 1, 2])).dtype == torch.float32
    # Three letters with a repeat need four frames: one frame gives zero, not inf.
    assert ctc_loss(log_probs[:1], torch.tensor([1]), targets[:1]).item() == 0.0


def test_a_linear_model_learns_a_toy_problem_with_ctc_loss():
    """Frames are noisy random codes of a hidden path; a linear map trained with the loss must learn
    to read them back, which only works when the loss sees [B, T, V] the right way round."""
    rng = np.random.default_rng(15)
    vocab, dim, batch = 8, 12, 16
    codes = torch.randn(vocab, dim)
    labels = [[int(i) for i in rng.integers(1, vocab, int(rng.integers(2, 7)))] for _ in range(batch)]
    paths = [alignment(lab, rng) for lab in labels]
    frames = max(map(len, paths)) + 4
    # Each row is valid a little past its path (trailing blanks); the frames after it are noise.
    lengths = torch.tensor([min(len(p) + int(rng.integers(0, 4)), frames) for p in paths])
    paths = [p + [BLANK] * (n - len(p)) + list(rng.integers(0, vocab, frames - n)) for p, n in
             zip(paths, lengths.tolist())]
    x = codes[torch.tensor(paths)] + 0.3 * torch.randn(batch, frames, dim)
    model = torch.nn.Linear(dim, vocab)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        loss = ctc_loss(model(x).log_softmax(-1), lengths, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    assert greedy_decode(model(x).log_softmax(-1), lengths) == labels
