"""Hugging Face interop: exact parity with transformers' Data2Vec models, both directions, and the CLI.

Every HF model here is built from a config (nothing downloads) with every parameter drawn at
random, so that no LayerNorm is the identity, no bias or relative position table is zero and no
layer scale is constant: a swapped or dropped parameter would show. Parity is checked on fresh
random inputs in fp32 for `last_hidden_state` and every entry of `hidden_states`, for the variants
of the published checkpoints at a tiny size and for the published base configs.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from asserts import assert_close  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from d2v_engine import cli, hf, probes  # noqa: E402
from d2v_engine.checkpoint import build_run_encoder, load_run_config, load_run_weights  # noqa: E402
from d2v_engine.config import dump_config, load_config  # noqa: E402
from d2v_engine.data.transforms import decode_audio, decode_image  # noqa: E402
from d2v_engine.errors import UserError  # noqa: E402
from d2v_engine.eval import EvalOptions, evaluate, read_labelled  # noqa: E402
from d2v_engine.hf.spec import architecture_diff  # noqa: E402
from d2v_engine.models.registry import MODEL_REGISTRY, build_encoder, get_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
MODELS = {"image": transformers.Data2VecVisionModel, "audio": transformers.Data2VecAudioModel,
          "text": transformers.Data2VecTextModel}
MAX_DIFF: dict[str, float] = {}
"""Largest |ours - HF| per case over last_hidden_state and hidden_states."""


@pytest.fixture(scope="module", autouse=True)
def _report_max_diff():
    """Prints the measured differences once the module is done (visible with `pytest -s`)."""
    yield
    if MAX_DIFF:
        print("\nmax |ours - HF|: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(MAX_DIFF.items())))


def vision_config(**kw):
    base = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                image_size=24, patch_size=4, layer_scale_init_value=0.1)
    return transformers.Data2VecVisionConfig(**{**base, **kw})


def audio_config(**kw):
    base = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                conv_dim=(32, 32, 32), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
                num_conv_pos_embedding_groups=4)
    return transformers.Data2VecAudioConfig(**{**base, **kw})


def text_config(**kw):
    base = dict(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=96, max_position_embeddings=34)
    return transformers.Data2VecTextConfig(**{**base, **kw})


TINY = {
    # the pretrained data2vec-vision layout: shared relative position bias, CLS + final LayerNorm, HF eps
    "image-shared-cls": lambda: vision_config(use_shared_relative_position_bias=True, use_mean_pooling=False),
    # the fine-tuned (*-ft1k) layout: a bias per layer, mean pooling (no final LayerNorm), BEiT eps
    "image-layer-mean": lambda: vision_config(use_relative_position_bias=True, use_mean_pooling=True,
                                              layer_norm_eps=1e-6, use_mask_token=True),
    "image-no-bias-no-scale": lambda: vision_config(layer_scale_init_value=0.0, use_mean_pooling=False),
    # data2vec-audio: 5 pos-conv layers, odd kernel; and a shallow stack with an even kernel (trimmed)
    "audio-depth5": lambda: audio_config(num_conv_pos_embeddings=5, conv_pos_kernel_size=19),
    "audio-depth2-even": lambda: audio_config(num_conv_pos_embeddings=2, conv_pos_kernel_size=8,
                                              layer_norm_eps=1e-6, mask_time_prob=0.0),
    "text-roberta": lambda: text_config(layer_norm_eps=1e-5, type_vocab_size=1),
    "text-token-types": lambda: text_config(type_vocab_size=2),          # HF defaults: eps 1e-12
}


def random_hf_model(modality: str, config, cls=None) -> torch.nn.Module:
    """The HF model of `config` (class `cls`, default the modality's base model) with random weights,
    none left at a structured value (ones, zeros, constants), so that a swapped or dropped parameter
    shows; built without HF's init pass."""
    cls = cls or MODELS[modality]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in cls(config).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        if name.endswith(("LayerNorm.weight", "layernorm.weight", "layer_norm.weight", "_before.weight",
                          "_after.weight")):
            state[name] = 1 + 0.2 * torch.randn(shape)
        elif len(shape) >= 2 and not name.endswith("relative_position_bias_table"):
            state[name] = 0.02 * torch.randn(shape)
        else:
            state[name] = 0.2 * torch.randn(shape)
    return cls.from_pretrained(None, config=config, state_dict=state).eval()


def make_inputs(modality: str, config, batch: int = 2, padded: bool = True) -> dict[str, torch.Tensor]:
    """Fresh random inputs; audio and text get one right-padded row (with its attention mask)."""
    if modality == "image":
        return {"pixel_values": torch.randn(batch, 3, config.image_size, config.image_size)}
    if modality == "audio":
        n = 2400
        x = torch.randn(batch, n)
        if not padded:
            return {"input_values": x}
        mask = torch.ones(batch, n, dtype=torch.long)
        mask[-1, n * 2 // 3:] = 0
        return {"input_values": x * mask, "attention_mask": mask}
    n = 16
    ids = torch.randint(4, config.vocab_size, (batch, n))
    ids[:, 0] = config.bos_token_id
    mask = torch.ones(batch, n, dtype=torch.long)
    if padded:
        ids[-1, 11], ids[-1, 12:], mask[-1, 12:] = config.eos_token_id, config.pad_token_id, 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def check_parity(hf_model, ours: tuple, inputs: dict, case: str) -> None:
    """Asserts the HF model's last_hidden_state and hidden_states equal ours (`hf.encode`) to ATOL."""
    want = hf_model(**inputs, output_hidden_states=True)
    last, states = ours
    assert len(states) == len(want.hidden_states) == hf_model.config.num_hidden_layers + 1
    assert_close(last, want.last_hidden_state, rtol=0, atol=ATOL)
    diffs = [(last - want.last_hidden_state).abs().max().item()]
    for mine, theirs in zip(states, want.hidden_states):
        assert_close(mine, theirs, rtol=0, atol=ATOL)
        diffs.append((mine - theirs).abs().max().item())
    MAX_DIFF[case] = max(MAX_DIFF.get(case, 0.0), *diffs)


@torch.no_grad()
def encode(encoder, inputs: dict) -> tuple:
    return hf.encode(encoder, **inputs)


def reload(encoder, folder: Path):
    """to_hf -> save_pretrained -> from_pretrained, as a user would."""
    hf.to_hf(encoder).save_pretrained(folder)
    return transformers.AutoModel.from_pretrained(folder).eval()


@pytest.mark.parametrize("case", sorted(TINY))
def test_tiny_parity_both_directions(case, tmp_path):
    modality = case.split("-")[0]
    hf_model = random_hf_model(modality, TINY[case]())
    encoder = hf.from_hf(hf_model)
    batches = [make_inputs(modality, hf_model.config)]
    if modality != "image":
        batches.append(make_inputs(modality, hf_model.config, padded=False))
    if modality == "text":   # without an attention mask HF attends to <pad> too: so must we
        batches.append({"input_ids": make_inputs(modality, hf_model.config)["input_ids"]})
    for inputs in batches:
        check_parity(hf_model, encode(encoder, inputs), inputs, case)
    with torch.no_grad():
        assert len(hf.hidden_states(encoder, **batches[0])) == hf_model.config.num_hidden_layers + 1
    back = reload(encoder, tmp_path)
    check_parity(back, encode(encoder, batches[0]), batches[0], case + " exported")
    # The weights themselves round-trip, but for the folded token-type row and the text pooler.
    theirs, ours = hf_model.state_dict(), back.state_dict()
    for name, tensor in ours.items():
        if name in theirs and not name.startswith(("pooler.", "embeddings.token_type", "embeddings.word")):
            assert torch.equal(tensor, theirs[name]), name


BASE = {
    # the published checkpoints' configs (data2vec-vision-base, -audio-base, -text-base), small inputs
    "image": lambda: transformers.Data2VecVisionConfig(
        image_size=64, use_shared_relative_position_bias=True, use_mean_pooling=False, use_mask_token=True),
    "audio": lambda: transformers.Data2VecAudioConfig(),
    "text": lambda: transformers.Data2VecTextConfig(vocab_size=50265, max_position_embeddings=514,
                                                    type_vocab_size=1, layer_norm_eps=1e-5),
}


@pytest.mark.parametrize("modality", sorted(BASE))
def test_base_parity_both_directions(modality, tmp_path):
    """One forward each: the HF model, ours, the exported-and-reloaded HF model."""
    hf_model = random_hf_model(modality, BASE[modality]())
    encoder = hf.from_hf(hf_model)
    assert 85e6 < sum(p.numel() for p in encoder.parameters()) < 126e6
    if modality == "audio":
        inputs = {"input_values": torch.randn(1, 8000)}            # 0.5 s at 16 kHz: 24 frames
    else:
        inputs = make_inputs(modality, hf_model.config, batch=1, padded=False)
    ours = encode(encoder, inputs)
    check_parity(hf_model, ours, inputs, f"{modality}-base")
    del hf_model
    check_parity(reload(encoder, tmp_path), ours, inputs, f"{modality}-base exported")


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_spec_config_round_trip(name):
    spec = get_spec(name)
    if name.endswith("_v2"):   # data2vec 2.0 architectures: Hugging Face has none (transformers#23069)
        with pytest.raises(UserError, match="transformers#23069"):
            hf.hf_config_from_spec(spec)
        return
    if spec.modality == "audio" and spec.pos_conv_padding != "zeros":   # audio_debug: HF pads with zeros
        with pytest.raises(UserError, match="model.pos_conv_padding=zeros"):
            hf.hf_config_from_spec(spec)
        spec = dataclasses.replace(spec, pos_conv_padding="zeros")
    config = hf.hf_config_from_spec(spec)
    assert hf.spec_from_hf_config(config, like=spec) == spec
    alone = hf.spec_from_hf_config(config)          # without `like`: the same architecture and eps
    assert architecture_diff(alone, spec) == [] and alone.transformer.norm_eps == spec.transformer.norm_eps
    assert type(config).from_dict(config.to_dict()).to_dict() == config.to_dict()


@pytest.mark.parametrize("config, sentence", [
    (lambda: vision_config(use_absolute_position_embeddings=True), "absolute position"),
    (lambda: vision_config(use_relative_position_bias=True, use_shared_relative_position_bias=True), "at once"),
    (lambda: audio_config(conv_bias=True), "conv_bias"),
    (lambda: text_config(hidden_act="relu"), "exact GELU"),
    (lambda: transformers.BertConfig(), "not a Data2Vec model"),
])
def test_unsupported_variants_are_refused(config, sentence):
    with pytest.raises(UserError, match=sentence):
        hf.spec_from_hf_config(config())


def test_hf_module_works_without_transformers(monkeypatch):
    """`d2v_engine.hf` imports without transformers; using it says how to install the extra."""
    import builtins

    encoder = build_encoder(get_spec("image_debug"))
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name.split(".")[0] == "transformers":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(UserError, match=r"pip install d2v_engine\[hf\]"):
        hf.to_hf(encoder)


# ------------------------------------------------------------------------------ the d2v commands
def fake_run(folder: Path, config: str, data_path: Path, vocab: int | None = None, overrides=()) -> Path:
    """A run directory in the trainer's layout (ZeRO-0 fp32, one rank) holding a random encoder."""
    cfg = load_config(ROOT / "configs" / config, [f"data.path={data_path}", f"run.dir={folder}", *overrides])
    spec = get_spec(cfg.model.name)
    encoder = build_encoder(dataclasses.replace(spec, vocab_size=vocab) if vocab else spec)
    tag = folder / "checkpoints" / "step00000001"
    tag.mkdir(parents=True)
    dump_config(cfg, folder / "config.yaml")
    torch.save({"module": {f"encoder.{k}": v for k, v in encoder.state_dict().items()}, "teacher": {}},
               tag / "mp_rank_00_model_states.pt")
    meta = {"step": 1, "world_size": 1, "zero_stage": 0, "precision": "fp32", "model": cfg.model.name}
    (tag / "d2v.json").write_text(json.dumps(meta))
    (folder / "checkpoints" / "latest").write_text("step00000001")
    return folder


def test_hf_export_text_tokenizer_and_features(data_root, tmp_path):
    """The exported tokenizer gives the run's `<s> ... </s>` ids; the model gives our encoder's output."""
    text = data_root / "text-corpus"
    vocab = Tokenizer.from_file(str(text / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    run_dir = fake_run(tmp_path / "run", "debug_text.yaml", text / "train", vocab)
    assert cli.main(["hf-export", "--run", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    inputs = probes.TextInputs(str(text / "tokenizer.json"), 64)
    raws, _ = read_labelled(text / "probe_test", 16, "wordnet", "text-corpus")
    sentences = [raw["txt"].decode() for raw in raws]
    assert tokenizer(sentences, truncation=True)["input_ids"] == [inputs.decode(r, i) for i, r in enumerate(raws)]
    batch = tokenizer(sentences, truncation=True, padding=True, return_tensors="pt")
    ours = build_run_encoder(load_run_config(run_dir), load_run_weights(run_dir))
    with torch.no_grad():
        assert_close(model(**batch).last_hidden_state, hf.encode(ours, **batch)[0], rtol=0, atol=ATOL)


def test_hf_export_audio_feature_extractor(data_root, tmp_path):
    audio = data_root / "spoken-words"
    # audio_debug pads its position convolution circularly, which the HF model cannot: refused.
    circular = fake_run(tmp_path / "circular", "debug_audio.yaml", audio / "train")
    with pytest.raises(UserError, match="model.pos_conv_padding=zeros"):
        hf.to_hf(build_run_encoder(load_run_config(circular), load_run_weights(circular)))
    run_dir = fake_run(tmp_path / "run", "debug_audio.yaml", audio / "train", overrides=["model.pos_conv_padding=zeros"])
    assert cli.main(["hf-export", "--run", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    extractor = transformers.AutoFeatureExtractor.from_pretrained(tmp_path / "hf")
    assert extractor.sampling_rate == 16000 and extractor.do_normalize and extractor.return_attention_mask
    raws, _ = read_labelled(audio / "probe_test", 2, "spoken-digits", "spoken-words")
    ours = probes.AudioInputs(16000, 10 ** 6).decode(raws[0], 0)
    theirs = extractor(decode_audio(raws[0]["flac"], 16000), sampling_rate=16000, return_tensors="pt")
    # HF normalises with eps 1e-7 under the square root, d2v with 1e-5: equal to ~1e-4 relative.
    assert_close(theirs["input_values"][0], torch.from_numpy(ours), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case", ["not_a_folder", "wrong_modality", "wrong_shape", "wrong_vocab"])
def test_hf_import_refusals_are_one_sentence(case, data_root, tmp_path, capsys):
    folder, config, overrides = tmp_path / "hf", "debug_image.yaml", []
    if case == "wrong_modality":
        random_hf_model("audio", audio_config()).save_pretrained(folder)
    elif case == "wrong_shape":     # image_debug is 64 wide
        random_hf_model("image", vision_config(image_size=28, use_shared_relative_position_bias=True,
                                               use_mean_pooling=False)).save_pretrained(folder)
    elif case == "wrong_vocab":     # text_debug's shape, but not the vocabulary of the config's tokenizer
        spec = dataclasses.replace(get_spec("text_debug"), vocab_size=300)
        random_hf_model("text", hf.hf_config_from_spec(spec)).save_pretrained(folder)
        config, overrides = "debug_text.yaml", [f"data.path={data_root / 'text-corpus' / 'train'}"]
    capsys.readouterr()
    code = cli.main(["hf-import", "--hf-dir", str(folder), "--config", str(ROOT / "configs" / config),
                     "--out", str(tmp_path / "init.safetensors"), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("d2v: error:")
    assert {"not_a_folder": "no config.json", "wrong_modality": "holds an audio model",
            "wrong_shape": "dim: 48 vs 64", "wrong_vocab": "300 token embeddings"}[case] in err[0]
    assert not (tmp_path / "init.safetensors").exists()


@pytest.fixture(scope="module")
def imported_run(data_root, tmp_path_factory):
    """hf-import of a random HF model shaped like image_debug, then a 6-step run from it (in-process)."""
    from d2v_engine.trainer import Trainer

    folder = tmp_path_factory.mktemp("hfrun")
    hf_model = random_hf_model("image", hf.hf_config_from_spec(get_spec("image_debug")))
    hf_model.save_pretrained(folder / "hf")
    assert cli.main(["hf-import", "--hf-dir", str(folder / "hf"), "--config",
                     str(ROOT / "configs" / "debug_image.yaml"), "--out", str(folder / "init.safetensors")]) == 0
    cfg = load_config(ROOT / "configs" / "debug_image.yaml", [
        f"data.path={data_root / 'fashion-mnist' / 'train'}", f"run.dir={folder / 'run'}",
        f"run.init_from={folder / 'init.safetensors'}", "train.steps=6", "train.warmup_steps=2", "train.log_every=3",
        "train.progress=false", "data.num_workers=0"])
    threads = torch.get_num_threads()
    # The trainer fills in a one-rank launcher environment; later tests' subprocesses must not inherit
    # its MASTER_PORT, which this process's process group keeps listening on.
    launcher = {k: os.environ.get(k) for k in ("MASTER_PORT", "MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    torch.set_num_threads(1)     # as the pretraining tests: the suite shares 2 cores
    try:
        trainer = Trainer(cfg)
        start = {"student": {k: v.detach().clone() for k, v in trainer.model.encoder.state_dict().items()},
                 "teacher": trainer.teacher.state_dict()}
        trainer.train()
        trainer.close()
    finally:
        torch.set_num_threads(threads)
        for key, value in launcher.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {"hf_model": hf_model, "run_dir": folder / "run", "start": start, "folder": folder}


def test_hf_import_then_pretrain_starts_from_the_hf_weights(imported_run):
    expected = hf.from_hf(imported_run["hf_model"]).state_dict()
    student, teacher = imported_run["start"]["student"], imported_run["start"]["teacher"]
    assert set(student) == set(expected) and teacher
    for name, tensor in expected.items():
        assert torch.equal(student[name], tensor), name
    for name, tensor in teacher.items():
        assert torch.equal(tensor, expected[name]), name
    trained = torch.load(imported_run["run_dir"] / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt",
                         weights_only=False)["module"]
    moved = [n for n, t in expected.items() if not torch.equal(trained[f"encoder.{n}"], t)]
    assert moved, "six steps from the imported weights changed nothing"


def test_hf_export_of_a_run_gives_the_same_probe_accuracy(imported_run, data_root):
    """Mean-pooled features of the exported model in transformers == `d2v eval`'s, so the accuracy is too."""
    run_dir, out = imported_run["run_dir"], imported_run["folder"] / "exported"
    assert cli.main(["hf-export", "--run", str(run_dir), "--out", str(out)]) == 0
    model = transformers.AutoModel.from_pretrained(out).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    result = evaluate(run_dir, EvalOptions(limit_train=120, limit_test=60), echo=lambda *a: None)["fashion-mnist"]

    cfg = load_run_config(run_dir)
    ours = build_run_encoder(cfg, load_run_weights(run_dir))
    inputs = probes.ImageInputs(ours.spec.image_size, cfg.data.mean, cfg.data.std)
    feats, labels = {}, {}
    for split, limit in (("train", 120), ("test", 60)):
        raws, labels[split] = read_labelled(data_root / "fashion-mnist" / split, limit, "fashion-mnist", "")
        pixels = processor([decode_image(raw["png"]) for raw in raws], return_tensors="pt")["pixel_values"]
        assert_close(pixels, torch.stack([inputs.decode(raw, i) for i, raw in enumerate(raws)]), atol=1e-6)
        with torch.no_grad():
            feats[split] = model(pixel_values=pixels).last_hidden_state[:, 1:].mean(dim=1).numpy()
        want = probes.extract({"d2v": ours}, [inputs.decode(raw, i) for i, raw in enumerate(raws)],
                              inputs.collate, 256)["d2v"]
        assert_close(feats[split], want, rtol=0, atol=ATOL)
    classes = np.unique(np.concatenate([labels["train"], labels["test"]]))
    y = {s: np.searchsorted(classes, labels[s]) for s in labels}
    assert probes.knn_accuracy(feats["train"], y["train"], feats["test"], y["test"]) == result["knn_acc"]
    assert probes.linear_accuracy(feats["train"], y["train"], feats["test"], y["test"]) == result["linear_acc"]
