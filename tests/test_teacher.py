"""EMA teacher: decay schedule, averaged/copied/excluded parts, fp32 master with a bf16 shadow."""
import pytest
import torch
from torch import nn

from asserts import assert_close
from d2v_engine.config import TargetConfig, TeacherConfig
from d2v_engine.teacher import EMATeacher


class ToyEncoder(nn.Module):
    """Three parts, one per teacher policy: excluded (`front`), copied (`embed`), averaged (`blocks`)."""

    teacher_exclude = ("front",)
    teacher_copy = ("embed",)

    def __init__(self):
        super().__init__()
        self.front = nn.Linear(5, 6)
        self.embed = nn.Linear(6, 6)
        self.blocks = nn.Sequential(nn.Linear(6, 7), nn.LayerNorm(7))
        self.grad_checkpointing = False


def perturb_(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))


def make(decay=0.9, end=0.99, anneal=10, dtype=torch.float32):
    student = ToyEncoder()
    cfg = TeacherConfig(decay=decay, end_decay=end, anneal_steps=anneal)
    return student, EMATeacher(student, cfg, TargetConfig(top_k=1), backend="reference", compute_dtype=dtype)


def test_decay_schedule_is_linear_then_held():
    _, teacher = make(0.9, 0.99, 10)
    assert teacher.decay_at(0) == pytest.approx(0.9)
    assert teacher.decay_at(5) == pytest.approx(0.945)
    assert teacher.decay_at(10) == pytest.approx(0.99)
    assert teacher.decay_at(1000) == pytest.approx(0.99)
    _, constant = make(0.9998, 0.9998, 10)
    assert constant.decay_at(3) == 0.9998


def test_teacher_is_a_frozen_eval_copy_without_excluded_parts():
    student, teacher = make()
    assert teacher.module.front is None
    assert not teacher.module.training
    assert all(not p.requires_grad for p in teacher.module.parameters())
    assert_close(teacher.module.blocks[0].weight, student.blocks[0].weight, rtol=0, atol=0)
    assert teacher.module.blocks[0].weight.data_ptr() != student.blocks[0].weight.data_ptr()


def test_update_averages_blocks_and_copies_embeddings():
    student, teacher = make(0.9, 0.99, 10)
    before = {n: p.detach().double().clone() for n, p in teacher.module.named_parameters()}
    perturb_(student)
    decay = teacher.update(student, step=4)
    assert decay == pytest.approx(0.936)
    s = dict(student.named_parameters())
    for name, p in teacher.module.named_parameters():
        if name.startswith("embed."):
            expected = s[name].double()
        else:
            expected = decay * before[name] + (1 - decay) * s[name].double()
        assert_close(p, expected, rtol=1e-6, atol=1e-6)


def test_decay_one_freezes_the_averaged_part():
    student, teacher = make(1.0, 1.0, 10)
    before = teacher.module.blocks[0].weight.detach().clone()
    perturb_(student)
    assert teacher.update(student, step=1) == 1.0
    assert_close(teacher.module.blocks[0].weight, before, rtol=0, atol=0)
    assert_close(teacher.module.embed.weight, student.embed.weight, rtol=0, atol=0)


def test_bf16_shadow_follows_fp32_master():
    student, teacher = make(0.5, 0.5, 10, dtype=torch.bfloat16)
    assert teacher.module.blocks[0].weight.dtype == torch.bfloat16
    perturb_(student)
    teacher.update(student, step=1)
    for name, master in teacher.master.items():
        assert master.dtype == torch.float32
        assert_close(dict(teacher.module.named_parameters())[name], master.bfloat16(), rtol=0, atol=0)


def test_state_dict_round_trip():
    student, teacher = make()
    perturb_(student)
    teacher.update(student, step=2)
    state = teacher.state_dict()
    _, other = make()
    other.load_state_dict(state)
    for name, p in other.module.named_parameters():
        assert_close(p, dict(teacher.module.named_parameters())[name], rtol=0, atol=0)
    with pytest.raises(KeyError):
        other.load_state_dict({})
