"""`d2v hf-export --finetuned`: the Hugging Face task model gives our `FinetuneModel`'s logits.

Each case builds a `FinetuneModel` of a debug model with every bias, LayerNorm and head weight
drawn at random (no LayerNorm is the identity, no bias is zero), saves it as `d2v finetune` does
(`finetune_loop.save_finetuned`), exports it with the CLI, loads it with `from_pretrained` and compares
logits in fp32 on fresh random inputs, padded rows included.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from asserts import assert_close  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from d2v_engine import cli  # noqa: E402
from d2v_engine.config import load_config  # noqa: E402
from d2v_engine.ctc import BLANK, CharVocab, greedy_decode  # noqa: E402
from d2v_engine.finetune_loop import save_finetuned  # noqa: E402
from d2v_engine.heads import FinetuneModel  # noqa: E402
from d2v_engine.models.registry import build_encoder, get_spec, with_model_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer with RoBERTa's specials at 0-4, as `d2v prepare text-corpus` makes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def finetune_config(run_config: str, folder: Path, *overrides: str):
    """The config `d2v finetune` resolves: the run's (`configs/debug_<modality>*.yaml`), the modality's
    recipe, the overrides."""
    modality = run_config.split("_")[1].split(".")[0]
    return load_config([ROOT / "configs" / run_config, ROOT / "configs" / f"finetune_{modality}.yaml"],
                       [f"data.path={folder / 'shards'}", f"run.dir={folder}", *overrides])


@torch.no_grad()
def randomize_(model: FinetuneModel) -> None:
    """Every 1-D parameter random (norm weights around 1), and head weights at unit-scale outputs."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            centre = 1.0 if "norm" in name.lower() and name.endswith(".weight") else 0.0
            p.copy_(centre + 0.2 * torch.randn_like(p))
        elif name.startswith("head."):
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))


def finetuned_model(kind: str, outputs: int, cfg, vocab_size: int | None = None) -> FinetuneModel:
    """A random `FinetuneModel` of the config's model (text: with `vocab_size` tokens), in eval mode."""
    spec = with_model_config(get_spec(cfg.model.name), cfg.model)
    if vocab_size is not None:
        spec = dataclasses.replace(spec, vocab_size=vocab_size)
    model = FinetuneModel(build_encoder(spec), kind, outputs, cfg.finetune)
    randomize_(model)
    return model.eval()


def export(model: FinetuneModel, cfg, folder: Path, kind: str, classes=None, vocab=None) -> Path:
    """save_finetuned as the Finetuner does, then `d2v hf-export --finetuned`; returns the HF folder."""
    folder.mkdir(parents=True, exist_ok=True)
    outputs = len(vocab) if vocab is not None else len(classes)
    save_finetuned(folder / "model.safetensors", model, cfg, kind, outputs, classes, vocab, step=7)
    out = folder / "hf"
    assert cli.main(["hf-export", "--finetuned", str(folder), "--out", str(out)]) == 0
    return out


def padded_tokens(vocab_size: int, batch: int = 3, n: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids `<s> ... </s>`; the last two rows right-padded (`<pad>` = 1), with the attention mask."""
    ids = torch.randint(4, vocab_size, (batch, n))
    ids[:, 0], ids[0, -1] = 0, 2
    mask = torch.ones(batch, n, dtype=torch.long)
    for row, length in ((1, 11), (2, 5)):
        ids[row, length - 1], ids[row, length:], mask[row, length:] = 2, 1, 0
    return ids, mask


def test_image_classifier(tmp_path):
    cfg = finetune_config("debug_image.yaml", tmp_path, "finetune.task=fashion-mnist")
    classes = [0, 2, 3, 7, 9]
    model = finetuned_model("classify", len(classes), cfg)
    out = export(model, cfg, tmp_path / "ft", "classify", classes=classes)
    hf_model = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(hf_model).__name__ == "Data2VecVisionForImageClassification" and hf_model.config.use_mean_pooling
    assert hf_model.config.label2id == {str(c): i for i, c in enumerate(classes)}
    size = model.encoder.spec.image_size
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        ours, _ = model({"images": images})
        theirs = hf_model(pixel_values=images).logits
    assert ours.abs().max() > 0.1
    assert_close(theirs, ours, rtol=0, atol=ATOL)
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert list(processor.image_mean) == list(cfg.data.mean) and processor.crop_size["height"] == size


def test_text_classifier(tokenizer_file, tmp_path):
    from tokenizers import Tokenizer

    cfg = finetune_config("debug_text.yaml", tmp_path, f"data.tokenizer={tokenizer_file}", "finetune.task=wordnet")
    vocab_size = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size(with_added_tokens=True)
    classes = [3, 5, 8, 13, 21]
    model = finetuned_model("classify", len(classes), cfg, vocab_size)
    out = export(model, cfg, tmp_path / "ft", "classify", classes=classes)
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(hf_model).__name__ == "Data2VecTextForSequenceClassification"
    assert hf_model.config.id2label == {i: str(c) for i, c in enumerate(classes)}
    ids, mask = padded_tokens(vocab_size)
    with torch.no_grad():
        ours, _ = model({"tokens": ids, "padding_mask": ~mask.bool()})
        theirs = hf_model(input_ids=ids, attention_mask=mask).logits
    assert ours.abs().max() > 0.1      # far from zero next to ATOL: a dropped weight would show
    assert_close(theirs, ours, rtol=0, atol=ATOL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    encoded = tokenizer(["the lazy fox", "a quick dog jumps"], padding=True, return_tensors="pt")
    assert encoded["input_ids"][0, 0] == 0 and tokenizer.pad_token_id == 1
    with torch.no_grad():
        ours, _ = model({"tokens": encoded["input_ids"], "padding_mask": ~encoded["attention_mask"].bool()})
        assert_close(hf_model(**encoded).logits, ours, rtol=0, atol=ATOL)


def test_audio_ctc_and_processor(tmp_path):
    cfg = finetune_config("debug_audio.yaml", tmp_path, "model.pos_conv_padding=zeros",
                          "finetune.task=spoken-words-ctc")
    vocab = CharVocab()
    model = finetuned_model("ctc", len(vocab), cfg)
    with torch.no_grad():   # blanks and word delimiters common, as in a trained model's output
        model.head.linear.bias[[BLANK, vocab.ids["|"]]] += torch.tensor([2.0, 1.5])
    out = export(model, cfg, tmp_path / "ft", "ctc", vocab=vocab)
    hf_model = transformers.AutoModelForCTC.from_pretrained(out).eval()
    assert type(hf_model).__name__ == "Data2VecAudioForCTC" and hf_model.config.vocab_size == len(vocab)
    n = 16000
    mask = torch.ones(3, n, dtype=torch.long)
    mask[1, n // 2:], mask[2, n // 3:] = 0, 0
    audio = torch.randn(3, n) * mask
    with torch.no_grad():
        ours, frames = model({"audio": audio, "padding_mask": ~mask.bool()})
        theirs = hf_model(input_values=audio, attention_mask=mask).logits.log_softmax(-1)
    assert_close(theirs, ours, rtol=0, atol=ATOL)

    processor = transformers.Wav2Vec2Processor.from_pretrained(out)
    assert processor.tokenizer.get_vocab() == vocab.to_dict()
    assert processor.feature_extractor.sampling_rate == cfg.data.sample_rate
    hyps = greedy_decode(ours, frames)
    texts = [vocab.decode(h) for h in hyps]
    assert " " in texts[0] and sum(len(t) for t in texts) > 10
    for row, hyp in enumerate(hyps):
        # HF's way: every valid frame's argmax, repeats grouped, then blanks dropped; and our greedy ids.
        assert processor.decode(theirs[row, :frames[row]].argmax(-1)) == texts[row]
        assert processor.decode(hyp, group_tokens=False, skip_special_tokens=True) == texts[row]
    # Greedy ids with a repeat across a blank and the specials <s>, </s>, <unk> (both drop them).
    hyp = [vocab.ids[t] for t in "h e l l <s> o | w </s> o <unk> r l d".split()]
    assert processor.decode(hyp, group_tokens=False, skip_special_tokens=True) == vocab.decode(hyp) == "hello world"


REFUSED = {
    # case: (run config, head kind, overrides ({tokenizer}: the test tokenizer), what the sentence says)
    "image_final_norm": ("debug_image.yaml", "classify", [], "fine-tune it again"),
    "image_v2": ("debug_image_v2.yaml", "classify", [], "transformers#23069"),
    "text_mean": ("debug_text.yaml", "classify", ["data.tokenizer={tokenizer}", "finetune.head=mean"],
                  "finetune.head=first"),
    "text_no_tokenizer": ("debug_text.yaml", "classify", [], "tokenizer cannot be found"),
    "audio_keywords": ("debug_audio.yaml", "classify", ["model.pos_conv_padding=zeros"], "keyword heads"),
    "audio_v2": ("debug_audio_v2.yaml", "ctc", ["model.pos_conv_padding=zeros"], "transformers#23069"),
    "audio_circular": ("debug_audio.yaml", "ctc", [], "model.pos_conv_padding=zeros"),
}


@pytest.mark.parametrize("case", [*REFUSED, "no_file", "not_finetuned", "tag"])
def test_refusals_are_one_sentence(case, tokenizer_file, tmp_path, capsys):
    folder, args = tmp_path / "ft", []
    folder.mkdir()
    if case in REFUSED:
        run_config, kind, overrides, _ = REFUSED[case]
        cfg = finetune_config(run_config, tmp_path, *(o.format(tokenizer=tokenizer_file) for o in overrides))
        vocab = CharVocab() if kind == "ctc" else None
        outputs = len(vocab) if vocab else 3
        model = finetuned_model(kind, outputs, cfg, 300 if cfg.model.name.startswith("text") else None)
        if case == "image_final_norm":     # the image head's layout before it dropped that LayerNorm
            model.encoder.layernorm = torch.nn.LayerNorm(model.encoder.dim)
        save_finetuned(folder / "model.safetensors", model, cfg, kind, outputs, None if vocab else [0, 1, 2],
                       vocab, step=1)
    elif case == "not_finetuned":      # someone else's safetensors file
        save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"), metadata={"format": "other"})
    elif case == "tag":
        args = ["--tag", "step00000001"]
    capsys.readouterr()
    code = cli.main(["hf-export", "--finetuned", str(folder), "--out", str(tmp_path / "hf"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("d2v: error:"), err
    said = {"no_file": "holds no model.safetensors", "not_finetuned": "is not a fine-tuned model",
            "tag": "drop them with --finetuned"}
    assert (REFUSED[case][3] if case in REFUSED else said[case]) in err[0], err[0]
    assert not (tmp_path / "hf").exists()
