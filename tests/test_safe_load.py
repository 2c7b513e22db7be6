"""Loading a file never runs code (#16): every reader of weights meets a planted pickle payload.

The payload is a pickle whose `__reduce__` calls `os.makedirs(marker)`, a harmless stand-in for
`os.system`. It is planted in each file an entry point reads (`run.init_from` as `.pt` and as
`.safetensors`, a run's model-states file and its ZeRO optimizer-state file for `d2v eval`,
`d2v export` and `d2v hf-export`, a Hugging Face folder for `d2v hf-import`): the marker is never
created and the user reads one sentence. The run is a real 1-step ZeRO-1 run, whose files hold every
type the allow-list admits; its export round-trips through safetensors into a fresh model exactly.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from d2v_engine import cli
from d2v_engine.config import load_config
from d2v_engine.data.prepare import PrepareOptions, prepare
from d2v_engine.errors import UserError
from d2v_engine.export import (LEGACY_FORMAT, consolidate, export_run, find_tag, load_export,
                               load_student_, read_export, save_export)
from d2v_engine.models.objective import build_objective
from d2v_engine.models.registry import build_encoder, get_spec
from d2v_engine.safe_load import client_state_types, zero_optimizer_types

ROOT = Path(__file__).resolve().parents[1]
# One thread per process: the suite shares 2 cores, and oversubscribed OpenMP threads spin-wait.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Payload:
    """Unpickling this calls `os.makedirs(marker)`: what a malicious weights file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def pretrain(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "d2v_engine" / "pretrain.py"), "--config",
           str(ROOT / "configs" / "debug_image.yaml"), "train.progress=false", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)


def assert_one_sentence(err: str, *parts: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(".") and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], (part, lines[0])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safedata")
    prepare("fashion-mnist", root, PrepareOptions(limit=64, shard_size=64, workers=1))
    return root / "fashion-mnist" / "train"


@pytest.fixture(scope="module")
def zero1_run(images, tmp_path_factory) -> Path:
    """A real 1-step ZeRO-1 run: model-states and optimizer-state files as DeepSpeed writes them."""
    run = tmp_path_factory.mktemp("safe") / "run"
    proc = pretrain(f"data.path={images}", f"run.dir={run}", "train.steps=1", "train.batch_size=8",
                    "train.warmup_steps=1", "data.num_workers=0", "ds.zero_stage=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def plant(run: Path, tmp_path: Path, file: str, marker: Path) -> Path:
    """A copy of `run` whose checkpoint file `file` also holds the payload (the rest stays real)."""
    copy = tmp_path / "planted"
    shutil.copytree(run, copy)
    path = find_tag(copy) / file
    with torch.serialization.safe_globals(client_state_types() + zero_optimizer_types()):
        state = torch.load(path, map_location="cpu", weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, path)
    return copy


def test_export_round_trips_into_a_fresh_model(zero1_run, tmp_path):
    """export -> safetensors -> init_from: the fresh model gets exactly the checkpoint's weights."""
    out = tmp_path / "w.safetensors"
    exported = export_run(zero1_run, out)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ        # the switch is scoped
    legacy = tmp_path / "w.pt"                                       # an export of before #16
    torch.save({**consolidate(find_tag(zero1_run)), "format": LEGACY_FORMAT}, legacy)
    cfg = load_config(zero1_run / "config.yaml")
    for path in (out, legacy):
        loaded = load_export(path, "image_debug")
        assert loaded["step"] == 1 and loaded["zero_stage"] == 1 and loaded["config"]["ds"]["zero_stage"] == 1
        torch.manual_seed(1234)                                      # another initialisation
        model = build_objective(cfg, build_encoder(get_spec("image_debug")))
        load_student_(model, loaded, where=str(path))
        state = model.state_dict()
        for part, prefix in (("student", "encoder."), ("head", "head.")):
            assert exported[part]
            for name, tensor in exported[part].items():
                assert torch.equal(state[prefix + name], tensor), (path, part, name)
        for name, tensor in exported["teacher"].items():
            assert torch.equal(loaded["teacher"][name], tensor), (path, name)


def test_shared_and_strided_tensors_are_written_once_each(tmp_path):
    weight = torch.randn(5, 3)
    exported = {"format": "", "model": "m", "student": {"w": weight, "wt": weight.t(), "row": weight[1]},
                "head": {}, "decoder": {}, "teacher": {"w": weight}}
    save_export(exported, tmp_path / "x.safetensors")
    back = read_export(tmp_path / "x.safetensors")
    assert back["model"] == "m" and back["head"] == {} and back["decoder"] == {}
    for part in ("student", "teacher"):
        assert back[part].keys() == exported[part].keys()
        for name, tensor in exported[part].items():
            assert torch.equal(back[part][name], tensor), (part, name)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_init_from_payload_is_not_run(suffix, tmp_path):
    marker, path = tmp_path / "marker", tmp_path / f"w{suffix}"
    torch.save({"format": LEGACY_FORMAT, "model": "image_debug", "student": {"x": Payload(marker)}}, path)
    with pytest.raises(UserError) as err:
        load_export(path, "image_debug")
    assert not marker.exists()
    assert_one_sentence(str(err.value), f"run.init_from '{path}' was not loaded", "os.makedirs")


def test_pretrain_with_a_payload_in_init_from_says_one_sentence(images, tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "w.pt"
    torch.save({"format": LEGACY_FORMAT, "model": "image_debug", "student": {"x": Payload(marker)}}, path)
    proc = pretrain(f"data.path={images}", f"run.dir={tmp_path / 'run'}", f"run.init_from={path}",
                    "data.num_workers=0")
    assert proc.returncode == 2 and not marker.exists()
    assert_one_sentence(proc.stderr.split("pretrain: error: ")[-1], "was not loaded", "os.makedirs")
    assert "pretrain: error: " in proc.stderr


COMMANDS = {
    "eval": lambda run, out: ["eval", "--run", str(run)],
    "export": lambda run, out: ["export", "--run", str(run), "--out", str(out / "w.safetensors")],
    "hf-export": lambda run, out: ["hf-export", "--run", str(run), "--out", str(out / "hf")],
}


@pytest.mark.parametrize("file", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
                         ids=["model-states", "optimizer-states"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_run_directory_payload_is_not_run(command, file, zero1_run, tmp_path, capsys):
    """Our reader (model states) and DeepSpeed's zero_to_fp32 (optimizer states) both refuse it."""
    if command == "hf-export":
        pytest.importorskip("transformers")
    marker = tmp_path / "marker"
    run = plant(zero1_run, tmp_path, file, marker)
    capsys.readouterr()
    assert cli.main(COMMANDS[command](run, tmp_path)) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.startswith("d2v: error: ")
    assert_one_sentence(err, "was not loaded", "os.makedirs", "use a run directory that d2v pretraining wrote")
    assert not (tmp_path / "w.safetensors").exists() and not (tmp_path / "hf").exists()


def test_hf_import_payload_is_not_run(tmp_path, capsys):
    """transformers reads a folder's `pytorch_model.bin` weights only as well."""
    transformers = pytest.importorskip("transformers")
    from d2v_engine import hf

    marker, folder = tmp_path / "marker", tmp_path / "hf"
    hf.hf_config_from_spec(get_spec("image_debug")).save_pretrained(folder)
    torch.save({"embeddings.cls_token": Payload(marker)}, folder / "pytorch_model.bin")
    assert transformers.AutoConfig.from_pretrained(folder).model_type == "data2vec-vision"
    capsys.readouterr()
    assert cli.main(["hf-import", "--hf-dir", str(folder), "--config", str(ROOT / "configs" / "debug_image.yaml"),
                     "--out", str(tmp_path / "init.safetensors")]) == 2
    err = capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "init.safetensors").exists()
    assert_one_sentence(err, "was not loaded", "os.makedirs", "safetensors copy")


def test_foreign_safetensors_file_is_one_sentence(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"embeddings.weight": torch.randn(2, 2)}, path)
    with pytest.raises(UserError) as err:
        load_export(path, "image_debug")
    assert_one_sentence(str(err.value), "is a safetensors file but not a `d2v export` one")
