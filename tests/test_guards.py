"""The guards of a run, in this process on the debug image model (`d2v_engine/guards.py`, the trainer):

- a NaN in the inputs of a step (the loss and every gradient NaN) is skipped under each of DeepSpeed's
  optimizers (ZeRO 0-3, fp32 and bf16): master weights, Adam moments and the teacher bit for bit as
  before, the lr held, the count in metrics.jsonl; `train.max_skipped_steps` skipped steps in a row
  pass, the next one stops the run with one sentence naming the step and the last good checkpoint;
- a collapsed teacher (all weights 0, EMA decay 1) gives one warning line, or the stop;
- a full disk during a save, on a real tmpfs of a few MB (where this machine lets root mount one) and
  with writes that raise ENOSPC, EROFS and EACCES at each stage of the save: one sentence, the partial
  tag gone, `latest` and the previous checkpoint unchanged and resumable, in every trial;
- pruning (`train.keep_checkpoints`) never deletes the checkpoint `latest` names.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from d2v_engine import distributed
from d2v_engine.config import load_config
from d2v_engine.errors import UserError
from d2v_engine.pretrain import main as pretrain
from d2v_engine.trainer import CHECKPOINT_META, Trainer, _prune_checkpoints

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "debug_image.yaml"
SMALL = ("train.batch_size=8", "train.warmup_steps=4", "train.log_every=1", "train.progress=false",
         "data.num_workers=0")


@pytest.fixture(autouse=True)
def one_rank(monkeypatch):
    """A one-rank launcher environment and one thread, undone after the test (later tests' subprocesses
    must not inherit the MASTER_PORT this process's process group keeps listening on)."""
    for key, value in (("MASTER_PORT", "29751"), ("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def overrides(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.path={data_root / 'fashion-mnist' / 'train'}", f"run.dir={run_dir}", *SMALL, *extra]


def build(data_root: Path, run_dir: Path, *extra: str) -> Trainer:
    return Trainer(load_config(CONFIG, overrides(data_root, run_dir, *extra)))


def release(trainer: Trainer) -> None:
    """`Trainer.close` without its plot."""
    trainer.data.close()
    trainer.logger.close()


def optimizer_state(trainer: Trainer) -> list[torch.Tensor]:
    """The fp32 master weights and Adam state that torch's AdamW holds, under any DeepSpeed wrapper,
    and the teacher's EMA weights."""
    opt = trainer.engine.basic_optimizer
    params = [p for group in opt.param_groups for p in group["params"]]
    tensors = [p.detach().clone() for p in params]
    tensors += [v.clone() for p in params for v in opt.state.get(p, {}).values() if torch.is_tensor(v)]
    return tensors + list(trainer.teacher.state_dict().values())


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ non-finite steps
@pytest.mark.parametrize("zero, precision, accum", [
    (0, "fp32", 1),   # FiniteAdamW: DeepSpeed steps the client optimizer itself
    (1, "fp32", 2),   # the NaN in the first of two micro-batches only
    (0, "bf16", 1),
    (2, "bf16", 1),   # the base configs' setting
    (3, "fp32", 1),
])
def test_nan_steps_are_skipped_then_the_run_stops(zero, precision, accum, data_root, tmp_path, monkeypatch,
                                                   capsys):
    """Steps 2, 4, 5 and 6 see a NaN input; with max_skipped_steps=2 the run survives 2, 4 and 5
    and stops at 6 with one sentence, naming the step-3 checkpoint."""
    poisoned, steps = {2, 4, 5, 6}, []
    to_device, train_step = Trainer._to_device, Trainer.train_step

    def nan_input(self, batch):
        batch = to_device(self, batch)
        if self.step + 1 in poisoned and self.engine.micro_steps % self.cfg.train.grad_accum == 0:
            image = batch["images"]
            image.view(-1)[int(torch.randint(image.numel(), ()))] = float("nan")
        return batch

    def recorded_step(self):
        before = optimizer_state(self)
        out = train_step(self)
        after = optimizer_state(self)
        steps.append((out[4], all(torch.equal(a, b) for a, b in zip(before, after))))
        return out

    monkeypatch.setattr(Trainer, "_to_device", nan_input)
    monkeypatch.setattr(Trainer, "train_step", recorded_step)
    run = tmp_path / "run"
    status = pretrain(["--config", str(CONFIG), *overrides(
        data_root, run, "train.steps=8", "train.save_every=3", "train.max_skipped_steps=2",
        f"train.grad_accum={accum}", f"ds.zero_stage={zero}", f"ds.precision={precision}")])

    # applied steps move the weights, skipped ones leave every bit of them, the moments and the teacher
    assert steps == [(True, False), (False, True), (True, False), (False, True), (False, True), (False, True)]
    logged = records(run)
    assert [r["skipped_steps"] for r in logged] == [0, 1, 1, 2, 3, 4]
    assert [r["loss"] == r["loss"] for r in logged] == [True, False, True, False, False, False]
    lr = [r["lr"] for r in logged]   # the schedule counts applied steps only
    assert lr[1] == lr[0] < lr[2] == lr[3] == lr[4] == lr[5]
    assert status == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pretrain: error:")]
    checkpoint = run / "checkpoints" / "step00000003"
    assert len(errors) == 1 and errors[0].startswith("pretrain: error: step 6: the loss or a gradient was not")
    assert "3 steps in a row, more than train.max_skipped_steps=2" in errors[0]
    assert f"the last good checkpoint is {checkpoint}." in errors[0]
    assert (run / "checkpoints" / "latest").read_text() == "step00000003"
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000003"]


# ------------------------------------------------------------------------------ collapse
def collapsed_teacher(data_root: Path, run_dir: Path, *extra: str) -> Trainer:
    """A teacher that maps every input to the same targets: all weights 0, never updated (decay 1)."""
    trainer = build(data_root, run_dir, "teacher.decay=1", "teacher.end_decay=1", "train.collapse_window=3",
                    *extra)
    for tensor in trainer.teacher.master.values():
        tensor.zero_()
    return trainer


def test_a_collapsed_teacher_warns_once(data_root, tmp_path, capsys):
    trainer = collapsed_teacher(data_root, tmp_path / "run", "train.steps=6")
    trainer.train()
    release(trainer)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "collapsed" in line]
    assert len(warnings) == 1, out
    assert warnings[0].startswith("warning: step 3: the targets have collapsed: tvar "), warnings
    assert "under train.collapse_threshold=0.01 for 3 logged steps in a row" in warnings[0]
    logged = records(tmp_path / "run")
    assert max(max(r["target_var"], r["target_sample_var"]) for r in logged) < 0.01
    assert [r["step"] for r in logged] == list(range(1, 7))   # the run went on


def test_a_collapsed_teacher_stops_the_run_when_asked(data_root, tmp_path):
    trainer = collapsed_teacher(data_root, tmp_path / "run", "train.steps=6", "train.stop_on_collapse=true")
    with pytest.raises(UserError, match=r"^step 3: the targets have collapsed: .*train.stop_on_collapse=true"):
        trainer.train()
    release(trainer)
    assert trainer.step == 3


# ------------------------------------------------------------------------------ a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 10 MB tmpfs (two checkpoints of the debug model and a fifth), or None where mount is refused."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(where)],
                             capture_output=True).returncode == 0
    yield where if mounted else None
    if mounted:
        subprocess.run(["umount", str(where)], check=True)


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fill(disk: Path, free: int) -> Path:
    """A file that leaves `free` bytes of `disk` unused."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - free))
    return filler


STAGES = {"model_states": errno.ENOSPC, "optim_states": errno.ENOSPC, "meta": errno.EROFS,
          "latest": errno.EACCES}
"""The stages of a save (DeepSpeed's two files, d2v.json, `latest`) and the error each trial raises there."""


def failing_writes(monkeypatch, stage: str) -> None:
    """Make one stage of a save fail as a full, read-only or forbidden disk would."""
    real_save, write_text, replace = distributed.save_whole, Path.write_text, os.replace
    error = OSError(STAGES[stage], os.strerror(STAGES[stage]))

    def save(obj, path, **kwargs):
        if stage in os.path.basename(path):
            raise error
        return real_save(obj, path, **kwargs)

    def write_meta(self, *args, **kwargs):
        if stage == "meta" and self.name == CHECKPOINT_META:
            raise error
        return write_text(self, *args, **kwargs)

    def publish(src, dst):
        if stage == "latest" and os.path.basename(dst) == "latest":
            raise error
        return replace(src, dst)

    monkeypatch.setattr(distributed, "save_whole", save)
    monkeypatch.setattr(Path, "write_text", write_meta)
    monkeypatch.setattr(os, "replace", publish)


@pytest.mark.parametrize("disk", ["tmpfs", "raised"])
def test_a_failed_save_keeps_the_previous_checkpoint(disk, small_disk, data_root, tmp_path, monkeypatch):
    """Each trial fails the step-3 save at another point; the step-2 checkpoint survives every one, and
    a new run resumes from it. On tmpfs the trials leave 0 to 90% of a checkpoint's size free."""
    if disk == "tmpfs" and small_disk is None:
        pytest.skip("mount -t tmpfs is not permitted here (needs root)")
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    if disk == "tmpfs":
        run.mkdir()
        checkpoints.symlink_to(small_disk)
    trainer = build(data_root, run, "train.steps=2", "train.keep_checkpoints=1")
    trainer.train()                                  # saves step 2
    before = fingerprint(checkpoints / "step00000002")
    size = sum((checkpoints / "step00000002" / name).stat().st_size for name in before)
    trainer.train_step()                             # step 3, whose save fails
    trials = [0.0, 0.3, 0.6, 0.9] if disk == "tmpfs" else list(STAGES)
    for trial in trials:
        with monkeypatch.context() as patch:
            if disk == "tmpfs":
                filler = fill(small_disk, int(trial * size))
            else:
                failing_writes(patch, trial)
            with pytest.raises(UserError) as error:
                trainer.save_checkpoint()
            if disk == "tmpfs":
                filler.unlink()
        reason = os.strerror(STAGES.get(trial, errno.ENOSPC))
        assert str(error.value) == (
            f"could not write checkpoint step00000003 in {checkpoints} ({reason}); `latest` still names "
            f"step00000002, intact: free space there or choose another run.dir, then resume with "
            f"run.resume=true."), trial
        assert (checkpoints / "latest").read_text() == "step00000002", trial
        assert sorted(p.name for p in checkpoints.glob("step*")) == ["step00000002"], trial
        assert fingerprint(checkpoints / "step00000002") == before, trial
        assert not (checkpoints / "latest.tmp").exists(), trial
    release(trainer)

    resumed = build(data_root, run, "train.steps=4", "train.keep_checkpoints=1", "run.resume=true")
    assert resumed.step == 2
    resumed.train()                                  # room again: step 4 saves, and step 2 goes
    release(resumed)
    assert (checkpoints / "latest").read_text() == "step00000004"
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step00000004"]


@pytest.mark.parametrize("keep, kept", [(1, ["step06"]), (2, ["step04", "step06"]),
                                        (9, ["step02", "step04", "step06"])])
def test_pruning_keeps_the_newest_complete_checkpoints(keep, kept, tmp_path):
    """step03 and step05 are leftovers of failed saves (no d2v.json), step08 of a killed one after
    the published step06: they go, and only complete checkpoints count towards `keep`."""
    for tag in ("step02", "step03", "step04", "step05", "step06", "step08"):
        (tmp_path / tag).mkdir()
        (tmp_path / tag / "mp_rank_00_model_states.pt").write_bytes(os.urandom(64))
        if tag in ("step02", "step04", "step06"):
            (tmp_path / tag / CHECKPOINT_META).write_text("{}\n")
    _prune_checkpoints(tmp_path, "step06", keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == kept
