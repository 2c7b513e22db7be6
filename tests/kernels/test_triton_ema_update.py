"""Triton multi-tensor ema_update_ against ops/reference.py: dtypes, shadows, odd lists, the cache.

Runs in Triton's CPU interpreter with small lists, and also on a ViT-B-sized list on a GPU.
"""
import pytest
import torch
from asserts import assert_close
from triton_env import ON_GPU, triton_device  # noqa: F401  (fixture)

from d2v_engine import ops
from d2v_engine.ops.reference import ema_update_ref

pytestmark = pytest.mark.gpu  # `make gpu-check` runs these (pytest -m gpu)

# One element, odd sizes, a tensor spanning several 4096-element work items, an empty one.
SHAPES = [(3, 341), (1,), (7, 5, 2), (2, 4100), (0, 4), (64,)]
DECAY = 0.9998
TOL = dict(rtol=1e-6, atol=1e-6)


def _vit_b_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of a ViT-B/16 encoder (86M parameters in 150 tensors)."""
    block = [(768,), (768,), (2304, 768), (2304,), (768, 768), (768,), (768,), (768,),
             (3072, 768), (3072,), (768, 3072), (768,)]
    return [(768, 3, 16, 16), (768,), (1, 1, 768)] + block * 12 + [(768,), (768,)]


def _lists(shapes, student_dtype, shadow_dtype, device):
    ema = [torch.randn(s, device=device) for s in shapes]
    student = [torch.randn(s, device=device).to(student_dtype) for s in shapes]
    shadow = None if shadow_dtype is None else \
        [torch.randn(s, device=device).to(shadow_dtype) for s in shapes]
    return ema, student, shadow


def _assert_shadow(shadow, ema):
    """shadow == cast(ema), bit for bit (round to nearest even, as PyTorch)."""
    for sh, e in zip(shadow, ema):
        assert torch.equal(sh, e.to(sh.dtype))


@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shadow_dtype", [None, torch.bfloat16, torch.float16])
def test_matches_reference(triton_device, student_dtype, shadow_dtype):
    shapes = SHAPES + (_vit_b_shapes() if ON_GPU else [])
    ema, student, shadow = _lists(shapes, student_dtype, shadow_dtype, triton_device)
    expected = [e.clone() for e in ema]
    ema_update_ref(expected, student, DECAY)
    ops.ema_update_(ema, student, DECAY, shadow, backend="triton")
    for got, want in zip(ema, expected):
        assert got.dtype == torch.float32
        assert_close(got, want, **TOL)
    if shadow is not None:
        _assert_shadow(shadow, ema)


def test_decay_extremes_are_exact(triton_device):
    ema, student, shadow = _lists(SHAPES, torch.float16, torch.bfloat16, triton_device)
    kept = [e.clone() for e in ema]
    ops.ema_update_(ema, student, 1.0, shadow, backend="triton")
    assert all(torch.equal(e, k) for e, k in zip(ema, kept))
    ops.ema_update_(ema, student, 0.0, backend="triton")  # the teacher's "copy" parts
    assert all(torch.equal(e, s.float()) for e, s in zip(ema, student))


def test_mixed_dtypes_and_strided_tensors(triton_device):
    """Student dtypes mixed in one list (one launch per dtype) and a non-contiguous pair."""
    ema = [torch.randn(5, 7, device=triton_device) for _ in range(4)]
    student = [torch.randn(5, 7, device=triton_device).to(dtype)
               for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.bfloat16)]
    ema.append(torch.randn(7, 5, device=triton_device).t())
    student.append(torch.randn(7, 5, device=triton_device).t())
    expected = [e.clone() for e in ema]
    ema_update_ref(expected, student, 0.9)
    ops.ema_update_(ema, student, 0.9, backend="triton")
    for got, want in zip(ema, expected):
        assert_close(got, want, **TOL)


def test_plan_is_cached_and_follows_new_lists(triton_device):
    from d2v_engine.kernels import ema_update as kernel

    kernel.clear_plans()
    ema, student, shadow = _lists(SHAPES, torch.bfloat16, torch.bfloat16, triton_device)
    for step in range(3):  # new list objects each step, as the teacher builds them
        expected = [e.clone() for e in ema]
        ema_update_ref(expected, student, 0.5)
        ops.ema_update_(list(ema), [s.detach() for s in student], 0.5, list(shadow),
                        backend="triton")
        for got, want in zip(ema, expected):
            assert_close(got, want, **TOL)
        with torch.no_grad():
            for s in student:
                s.add_(1.0)  # new values in the same tensors
    assert len(kernel._PLANS) == 1
    other, other_student, _ = _lists([(3,), (9,)], torch.float32, None, triton_device)
    ops.ema_update_(other, other_student, 0.5, backend="triton")
    assert len(kernel._PLANS) == 2


def test_rejects_bad_arguments(triton_device):
    e = torch.randn(4, device=triton_device)
    bad = [([e], [e, e], 0.9, None), ([e.half()], [e], 0.9, None),
           ([e], [torch.randn(5, device=triton_device)], 0.9, None), ([e], [e], 1.5, None)]
    for args in bad:
        with pytest.raises((ValueError, TypeError)):
            ops.ema_update_(*args, backend="triton")
    ops.ema_update_([], [], 0.9, backend="triton")  # nothing to do


def test_torch_compile_traces_through_the_op(triton_device):
    """A compiled step that updates the EMA in place (a mutating custom op) runs under aot_eager."""
    def step(ema, student, shadow):
        ops.ema_update_(ema, [s * 1.0 for s in student], 0.75, shadow, backend="triton")
        return sum(e.sum() for e in ema)

    ema, student, shadow = _lists(SHAPES, torch.bfloat16, torch.bfloat16, triton_device)
    expected = [e.clone() for e in ema]
    ema_update_ref(expected, student, 0.75)
    total = torch.compile(step, backend="aot_eager", fullgraph=True)(ema, student, shadow)
    for got, want in zip(ema, expected):
        assert_close(got, want, **TOL)
    assert_close(total, sum(e.sum() for e in expected), rtol=1e-5, atol=1e-4)
    _assert_shadow(shadow, ema)
