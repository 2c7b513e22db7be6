"""Config: YAML + overrides precedence, validation messages, every shipped config loads."""
from pathlib import Path

import pytest

from d2v_engine.config import Config, dump_config, load_config, parse_override, valid_keys
from d2v_engine.errors import UserError
from d2v_engine.models.registry import MODEL_REGISTRY

CONFIGS = sorted(p for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")
                 if not p.stem.startswith("finetune_"))
RECIPES = sorted((Path(__file__).parents[1] / "configs").glob("finetune_*.yaml"))
"""Fine-tuning recipes: overlays on a run's config.yaml, not configs of their own."""
REQUIRED_KEYS = ["model.name", "data.path", "data.reader", "train.steps", "train.batch_size",
                 "train.log_every", "train.save_every", "train.lr", "seed", "run.dir", "run.resume",
                 "ds.zero_stage", "ds.precision", "kernels.backend"]


def test_required_keys_exist():
    assert set(REQUIRED_KEYS) <= set(valid_keys())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.name in MODEL_REGISTRY
    assert cfg.teacher.anneal_steps > 0


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_finetune_recipes_load_over_every_config_of_their_modality(recipe):
    modality = recipe.stem.split("_")[1]
    runs = [p for p in CONFIGS if load_config(p).modality == modality]
    assert runs
    for path in runs:
        cfg = load_config([path, recipe], ["finetune.task=t"])
        assert cfg.finetune.task == "t" and cfg.model.name == load_config(path).model.name


def test_expected_configs_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"default", "debug_image", "debug_audio", "debug_text", "base_image", "base_audio",
            "base_text"} <= names
    assert {f"{kind}_{m}_v2" for kind in ("debug", "base") for m in ("image", "audio", "text")} | {"default_v2"} <= names


def test_v2_configs_say_version_2_and_v1_configs_version_1():
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.method.version == (2 if path.stem.endswith("_v2") else 1), path.name
        assert (cfg.method.clones > 1) == (cfg.method.version == 2), path.name


def test_precedence_override_beats_yaml_beats_default(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 7, lr: 0.5}\ntarget: {top_k: 2}\nseed: 3\n")
    cfg = load_config(path, ["train.steps=9", "ds.precision=bf16", "data.mean=[0.1, 0.2, 0.3]"])
    assert cfg.train.steps == 9            # override
    assert cfg.train.lr == 0.5             # YAML
    assert cfg.train.batch_size == Config().train.batch_size  # default
    assert cfg.seed == 3 and cfg.ds.precision == "bf16" and cfg.data.mean == [0.1, 0.2, 0.3]


def test_dump_round_trips(tmp_path):
    cfg = load_config(CONFIGS[0], ["train.steps=11"])
    dump_config(cfg, tmp_path / "r.yaml")
    assert load_config(tmp_path / "r.yaml") == cfg


@pytest.mark.parametrize("override, fragment", [
    ("train.step=3", "did you mean 'train.steps'"),
    ("trian.steps=3", "did you mean 'train.steps'"),
    ("train.steps=abc", "expects an integer"),
    ("train.steps=2.5", "expects an integer"),
    ("ds.precision=fp16", "one of 'fp32', 'bf16'"),
    ("kernels.backend=cuda", "one of 'auto'"),
    ("run.resume=maybe", "true or false"),
    ("model.name=image_dbg", "did you mean 'image_debug'"),
    ("target.top_k=99", "exceeds"),
    ("train.batch_size=30", "multiple of train.grad_accum"),
    ("mask.prob=1.5", "mask.prob"),
    ("nonsense", "section.key=value"),
    ("method.version=3", "one of 1, 2"),
    ("method.clones=4", "needs method.version=2"),
    ("loss.cls_weight=0.01", "data2vec 2.0 loss"),
    ("mask.inverse=true", "shape data2vec 2.0 masks"),
    ("decoder.projection_layers=3", "decoder.projection_layers"),
])
def test_bad_values_give_one_sentence(override, fragment):
    overrides = [override] + (["train.grad_accum=4"] if "batch_size" in override else [])
    with pytest.raises(UserError) as err:
        load_config(CONFIGS[0], overrides)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize("overrides, fragment", [
    (["model.name=image_small_v2", "decoder.dim=128", "decoder.groups=128"], "does not divide the width"),
    (["model.name=audio_debug_v2", "mask.inverse=true"], "for images"),
    (["model.name=image_base", "data.path=x"], None),                       # a shared bias is gathered: fine
])
def test_v2_checks_against_the_model(overrides, fragment):
    path = next(p for p in CONFIGS if p.stem == "debug_image_v2")
    if fragment is None:
        assert load_config(path, overrides).method.version == 2
        return
    with pytest.raises(UserError, match=fragment):
        load_config(path, overrides)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train: 3\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(wrong)


def test_parse_override_reads_yaml_values():
    assert load_config(CONFIGS[0], ["train.lr=1e-4"]).train.lr == 1e-4   # YAML 1.1 reads 1e-4 as text
    assert parse_override("run.resume=true") == ("run.resume", True)
    assert parse_override("run.dir=runs/x") == ("run.dir", "runs/x")
