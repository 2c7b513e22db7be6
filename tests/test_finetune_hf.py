"""`d2v finetune --hf-dir`: a Hugging Face Data2Vec folder's encoder fine-tuned as a run's would be.

The HF models are built from configs of registry shapes (nothing downloads) with every parameter
drawn at random (`test_hf.random_hf_model`), saved with `save_pretrained`, some as task classes
whose base weights are inside. The encoder a fine-tuning starts with (`finetune_loop.start_encoder`, what
`Finetuner` builds) must compute the HF model's hidden states; one image run goes end to end through
DeepSpeed in a subprocess, as a user would run it.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from asserts import assert_close  # noqa: E402
from safetensors import safe_open  # noqa: E402

from d2v_engine import cli, hf  # noqa: E402
from d2v_engine.errors import UserError  # noqa: E402
from d2v_engine.finetune import FinetuneOptions, finetune_config, load_start  # noqa: E402
from d2v_engine.finetune_loop import start_encoder  # noqa: E402
from d2v_engine.models.registry import get_spec  # noqa: E402
from tests.data.synth_shards import train_tokenizer_for, write_image_shards  # noqa: E402
from tests.test_eval import fake_run, run  # noqa: E402
from tests.test_hf import make_inputs, random_hf_model, vision_config  # noqa: E402
from tests.test_safe_load import Payload, assert_one_sentence  # noqa: E402

ATOL = 1e-5


def image_folder(folder: Path) -> Path:
    """A random image_debug-shaped `Data2VecVisionForImageClassification` (mean pooling: no final
    LayerNorm in its base model) with an image processor of its own mean and std."""
    config = hf.hf_config_from_spec(get_spec("image_debug"))
    config.use_mean_pooling = True
    config.num_labels = 3
    random_hf_model("image", config, transformers.Data2VecVisionForImageClassification).save_pretrained(folder)
    transformers.BeitImageProcessorPil(image_mean=[0.3, 0.4, 0.5], image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return folder


def start_of(folder: Path, tmp_path: Path, *overrides: str):
    opts = FinetuneOptions(task="custom", hf_dir=str(folder), out=str(tmp_path / "out"), overrides=list(overrides))
    return load_start(None, opts, echo=lambda *a: None)


@torch.no_grad()
def assert_same_states(hf_model, start, inputs: dict, blocks_only: bool = False) -> None:
    """The start's encoder (`start_encoder`, as `Finetuner` builds it) gives the HF model's hidden states."""
    encoder = start_encoder(start.cfg, start.spec, start.student).eval()
    base = hf_model.base_model.eval()
    want = base(**inputs, output_hidden_states=True)
    last, states = hf.encode(encoder, **inputs)
    assert len(states) == len(want.hidden_states) == start.spec.transformer.depth + 1
    for mine, theirs in zip(states, want.hidden_states):
        assert_close(mine, theirs, rtol=0, atol=ATOL)
    if not blocks_only:
        assert_close(last, want.last_hidden_state, rtol=0, atol=ATOL)


def test_image_task_class_starts_at_the_hf_weights(tmp_path):
    folder = image_folder(tmp_path / "hf")
    start = start_of(folder, tmp_path)
    assert start.cfg.model.name == "image_debug" and start.teacher is None
    assert start.cfg.data.mean == [0.3, 0.4, 0.5] and start.cfg.data.std == [0.2, 0.25, 0.3]
    hf_model = transformers.AutoModelForImageClassification.from_pretrained(folder)
    # mean pooling: the blocks are the HF model's; the final LayerNorm, which the head replaces, is fresh
    assert_same_states(hf_model, start, make_inputs("image", hf_model.config), blocks_only=True)


def test_text_and_audio_start_at_the_hf_weights(tmp_path):
    from tokenizers import Tokenizer

    (tmp_path / "tok").mkdir()
    train_tokenizer_for(tmp_path / "tok" / "x")
    tokenizer = tmp_path / "tok" / "tokenizer.json"
    vocab = Tokenizer.from_file(str(tokenizer)).get_vocab_size(with_added_tokens=True)
    spec = dataclasses.replace(get_spec("text_debug"), vocab_size=vocab)
    text = random_hf_model("text", hf.hf_config_from_spec(spec))
    text.save_pretrained(tmp_path / "text")
    with pytest.raises(UserError, match="has no tokenizer.json"):
        start_of(tmp_path / "text", tmp_path)
    shutil.copy(tokenizer, tmp_path / "text" / "tokenizer.json")
    start = start_of(tmp_path / "text", tmp_path)
    assert start.cfg.model.name == "text_debug" and start.spec.vocab_size == vocab
    assert start.cfg.data.tokenizer == str(tmp_path / "text" / "tokenizer.json")
    assert_same_states(text, start, make_inputs("text", text.config))

    # the CTC task class, its base weights inside; HF pads the position convolution with zeros
    spec = dataclasses.replace(get_spec("audio_debug"), pos_conv_padding="zeros")
    config = hf.hf_config_from_spec(spec)
    config.vocab_size = 32
    audio = random_hf_model("audio", config, transformers.Data2VecAudioForCTC)
    audio.save_pretrained(tmp_path / "audio")
    start = start_of(tmp_path / "audio", tmp_path)
    assert start.cfg.model.name == "audio_debug" and start.spec.pos_conv_padding == "zeros"
    assert_same_states(audio, start, make_inputs("audio", config))


def test_a_run_and_its_hf_export_start_the_same_finetuning(tmp_path):
    """`--run R` and `--hf-dir` of `d2v hf-export --run R`: the same weights, shape and fine-tuning config."""
    run_dir = fake_run(tmp_path / "run", "debug_image.yaml", tmp_path / "data" / "fashion-mnist" / "train")
    assert cli.main(["hf-export", "--run", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    opts = FinetuneOptions(task="fashion-mnist", overrides=["train.steps=7"])
    ours = load_start(run_dir, opts)
    theirs = start_of(tmp_path / "hf", tmp_path)
    assert theirs.spec == ours.spec and set(theirs.student) == set(ours.student)
    for name, tensor in ours.student.items():
        assert torch.equal(theirs.student[name], tensor), name
    a, b = (finetune_config(s.base, "image", opts, tmp_path / "ft").to_dict() for s in (ours, theirs))
    for section in ("model", "train", "ds", "finetune"):
        assert a[section] == b[section], section
    assert (a["seed"], a["data"]["mean"], a["data"]["std"]) == (b["seed"], b["data"]["mean"], b["data"]["std"])


def test_finetune_from_an_hf_folder_end_to_end(tmp_path):
    folder = image_folder(tmp_path / "hf")
    train, test = write_image_shards(tmp_path / "train", 40), write_image_shards(tmp_path / "test", 20)
    out = tmp_path / "out"
    run("d2v_engine/finetune.py", "--hf-dir", str(folder), "--out", str(out), "--task", "custom", "--train",
        str(train), "--test", str(test), "--compare", "random-init", "train.steps=2", "train.batch_size=8",
        "train.warmup_steps=1", "train.log_every=1", "train.progress=false", timeout=300)
    record = json.loads((out / "finetune" / "finetune.json").read_text())["custom"]
    assert record["hf_dir"] == str(folder) and record["model"] == "image_debug"
    assert record["labels"] == 40 and record["n_test"] == 20 and record["steps"] == 2
    assert 0 <= record["pretrained"] <= 1 and 0 <= record["random_init"] <= 1
    task = out / "finetune" / "custom"
    for path in (task / "model.safetensors", task / "curve.png", task / "test.jsonl",
                 task / "random_init" / "model.safetensors"):
        assert path.is_file(), path
    with safe_open(task / "model.safetensors", "pt") as f:
        meta = f.metadata()
        moved = f.get_tensor("encoder.encoder.layers.0.attention.q_proj.weight")
    assert meta["model"] == "image_debug" and int(meta["outputs"]) == 10
    hf_model = transformers.AutoModel.from_pretrained(folder)
    q = hf_model.state_dict()["encoder.layer.0.attention.attention.query.weight"]
    assert moved.shape == q.shape and not torch.equal(moved, q)   # trained from there


@pytest.mark.parametrize("case", ["both", "no_out", "not_data2vec", "no_config", "no_shape", "teacher"])
def test_refusals_are_one_sentence(case, tmp_path, capsys):
    folder = tmp_path / "hf"
    out = [] if case == "no_out" else ["--out", str(tmp_path / "out")]
    args = ["--hf-dir", str(folder), *out, "--task", "fashion-mnist"]
    if case in ("both", "no_out", "teacher"):
        image_folder(folder)
        args += {"both": ["--run", str(tmp_path)], "no_out": [], "teacher": ["--weights", "teacher"]}[case]
    elif case == "not_data2vec":
        transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=64, vocab_size=50)).save_pretrained(folder)
    elif case == "no_shape":   # 48 wide: no registered image model
        random_hf_model("image", vision_config(use_shared_relative_position_bias=True)).save_pretrained(folder)
    else:
        folder.mkdir()
    capsys.readouterr()
    assert cli.main(["finetune", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("d2v: error:")
    assert {"both": "pass one of them", "no_out": "needs --out DIR", "teacher": "holds one encoder",
            "not_data2vec": "holds a 'bert' model, not a Data2Vec one", "no_config": "no config.json",
            "no_shape": "has the shape of no registered image model"}[case] in err[0]
    assert not (tmp_path / "out").exists()


def test_a_pickle_payload_in_the_folder_is_not_run(tmp_path, capsys):
    """The folder is read as `d2v hf-import` reads it: a `pytorch_model.bin` is unpickled weights only."""
    marker, folder = tmp_path / "marker", tmp_path / "hf"
    hf.hf_config_from_spec(get_spec("image_debug")).save_pretrained(folder)
    torch.save({"embeddings.cls_token": Payload(marker)}, folder / "pytorch_model.bin")
    capsys.readouterr()
    args = ["finetune", "--hf-dir", str(folder), "--out", str(tmp_path / "out"), "--task", "fashion-mnist"]
    assert cli.main(args) == 2
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert_one_sentence(capsys.readouterr().err, "was not loaded", "os.makedirs", "safetensors copy")
