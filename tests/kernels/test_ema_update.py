"""ema_update_ of every backend against ops/reference.py: student and shadow dtypes, odd and empty
shapes, tensors larger than one work chunk, strides, decay extremes, errors, and the C++ plan cache.

The EMA is fp32 arithmetic on the same inputs (fp32 tolerance); the shadow must equal the new EMA
cast to its dtype exactly, as torch's own cast would give it.
"""

import pytest
import torch
from asserts import assert_close
from backends import BACKENDS, FUSED_BACKENDS, device_for

from d2v_engine import ops
from d2v_engine.ops.reference import ema_update_ref

# Odd sizes, a scalar, an empty tensor, and one of 70000 elements (past a C++ work chunk of 65536).
SHAPES = [(3, 341), (1,), (), (0, 5), (7, 5, 2), (70000,), (1023,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _lists(student_dtype, shadow_dtype, device, shapes=SHAPES):
    ema = [torch.randn(shape, device=device) for shape in shapes]
    student = [torch.randn(shape, device=device).to(student_dtype) for shape in shapes]
    shadow = None if shadow_dtype is None else \
        [torch.randn(shape, device=device).to(shadow_dtype) for shape in shapes]
    return ema, student, shadow


def _check(backend, ema, student, decay, shadow=None, steps=2):
    """`steps` updates by `backend` and by the reference on CPU copies, then compares."""
    expected = [e.detach().cpu().clone() for e in ema]
    cpu_student = [s.cpu() for s in student]
    for _ in range(steps):
        ops.ema_update_(ema, student, decay, shadow, backend=backend)
        ema_update_ref(expected, cpu_student, decay)
    for i, (e, want) in enumerate(zip(ema, expected)):
        assert e.dtype == torch.float32
        assert_close(e, want, rtol=1e-6, atol=1e-7)
        if shadow is not None:
            assert torch.equal(shadow[i], e.to(shadow[i].dtype)), f"shadow[{i}] != cast ema"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("student_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shadow_dtype", [None] + DTYPES, ids=str)
def test_matches_reference(backend, student_dtype, shadow_dtype):
    ema, student, shadow = _lists(student_dtype, shadow_dtype, device_for(backend))
    _check(backend, ema, student, 0.9998, shadow)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decay", [0.0, 0.5, 1.0])
def test_decay_extremes(backend, decay):
    ema, student, shadow = _lists(torch.bfloat16, torch.bfloat16, device_for(backend))
    kept = [e.clone() for e in ema]
    _check(backend, ema, student, decay, shadow, steps=1)
    if decay == 1.0:
        assert all(torch.equal(e, k) for e, k in zip(ema, kept))
    if decay == 0.0:  # the teacher's "copy" policy
        assert all(torch.equal(e, s.float()) for e, s in zip(ema, student))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_float64_shadow(backend):
    device = device_for(backend)
    ema = [torch.randn(64, 48, device=device).t(), torch.randn(100, device=device)]
    student = [torch.randn(48, 64, device=device), torch.randn(200, device=device)[::2]]
    shadow = [torch.randn(48, 64, device=device).bfloat16(),
              torch.randn(100, device=device, dtype=torch.float64)]
    _check(backend, ema, student, 0.9, shadow)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_lists(backend):
    ops.ema_update_([], [], 0.9, None, backend=backend)
    ops.ema_update_([], [], 0.9, [], backend=backend)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_rejects_what_the_reference_rejects(backend):
    device = device_for(backend)
    e, s = torch.randn(4, device=device), torch.randn(4, device=device)
    for args in [([e], [s, s], 0.9, None), ([e.half()], [s], 0.9, None),
                 ([e], [torch.randn(5, device=device)], 0.9, None), ([e], [s], 1.5, None),
                 ([e], [s], 0.9, [torch.randn(3, device=device)]), ([e], [s.long()], 0.9, None),
                 ([e.view(2, 2)], [s], 0.9, None)]:
        with pytest.raises((ValueError, TypeError)):
            ops.ema_update_(*args, backend=backend)


needs_cpp = pytest.mark.skipif("cpp" not in ops._BACKENDS, reason="the C++ extension is not built")


@needs_cpp
def test_cpp_plan_cache_follows_the_tensors():
    from d2v_engine import _C

    _C.ema_clear_cache()
    ema, student, shadow = _lists(torch.bfloat16, torch.bfloat16, "cpu")
    _check("cpp", ema, student, 0.99, shadow)
    assert _C.ema_cache_size() == 1
    # New list objects over the same tensors (as the teacher builds them each step): a hit.
    _check("cpp", list(ema), list(student), 0.99, list(shadow))
    assert _C.ema_cache_size() == 1
    # A tensor replaced by a new one (new storage): a miss, a second plan, still right.
    student[0] = torch.randn_like(student[0].float()).bfloat16()
    _check("cpp", ema, student, 0.99, shadow)
    assert _C.ema_cache_size() == 2
    # Same pointers, a shape that no longer matches: the miss re-validates and raises.
    bad = [student[0].view(-1)] + student[1:]
    with pytest.raises(ValueError):
        ops.ema_update_(ema, bad, 0.99, shadow, backend="cpp")
    # Without the shadow it is another plan.
    _check("cpp", ema, student, 0.99)
    assert _C.ema_cache_size() == 3


@needs_cpp
def test_cpp_bumps_version_counters():
    ema, student, shadow = _lists(torch.float32, torch.bfloat16, "cpu", shapes=[(5,), (6,)])
    before = [t._version for t in ema + shadow]
    ops.ema_update_(ema, student, 0.5, shadow, backend="cpp")
    assert all(t._version > v for t, v in zip(ema + shadow, before))
