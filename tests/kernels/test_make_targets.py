"""make_targets of every backend against ops/reference.py: awkward shapes, norms, masks, padding,
strides, dtypes, large offsets, errors.

Every backend computes in fp32 from the same inputs, so bf16/fp16 inputs are held to the fp32
tolerance too (stricter than the low-precision rule): only the order of summation differs.
"""

import pytest
import torch
from backends import BACKENDS, FUSED_BACKENDS, device_for, interpreted
from asserts import assert_close

from d2v_engine import ops
from d2v_engine.ops.reference import make_targets_ref

NORMS = ("instance", "layer", "none")
# (B, T, C, K): one row / T = 1 / K = 1; odd C; K = 12 ("all" blocks of a base model); C = 1023.
SHAPES = [(1, 1, 16, 1), (3, 17, 341, 3), (2, 5, 33, 12), (2, 9, 1023, 2)]
TOL = dict(rtol=1e-4, atol=2e-5)


def _padding(batch: int, steps: int) -> torch.Tensor:
    """Suffix padding of random lengths: the first row full, the last one valid step."""
    lengths = torch.randint(1, steps + 1, (batch,))
    lengths[0], lengths[-1] = steps, 1
    return torch.arange(steps)[None] >= lengths[:, None]


def _layers(shape, dtype=torch.float32, device="cpu"):
    batch, steps, channels, k = shape
    return [(torch.randn(batch, steps, channels) * 3 + 1).to(device=device, dtype=dtype)
            for _ in range(k)]


def _check(backend, layers, **kwargs):
    """Runs the backend and the reference (on CPU) and compares them."""
    device = device_for(backend)
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    got = ops.make_targets([x.to(device) for x in layers], backend=backend, **moved)
    expected = make_targets_ref([x.cpu() for x in layers], **kwargs)
    assert got.dtype == torch.float32 and got.device.type == device.type
    assert_close(got, expected, **TOL)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layer_norm", NORMS)
@pytest.mark.parametrize("final_norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(backend, shape, layer_norm, final_norm, dtype):
    if interpreted(backend) and shape[2] > 341:
        pytest.skip("C = 1023 is too slow for the Triton interpreter; it runs on GPUs")
    batch, steps = shape[:2]
    layers = _layers(shape, dtype)
    mask = torch.rand(batch, steps) < 0.5
    mask[0, 0] = True
    padding = _padding(batch, steps) if batch > 1 else None
    norms = dict(layer_norm=layer_norm, final_norm=final_norm)
    got = _check(backend, layers, mask=mask, padding_mask=padding, **norms)
    assert got.shape == (int(mask.sum()), shape[2])
    full = _check(backend, layers, padding_mask=padding, **norms)
    assert full.shape == (batch, steps, shape[2])
    if padding is not None:
        assert not full.cpu()[padding].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_and_everything_masked(backend):
    layers = _layers((2, 7, 341, 3))
    nothing = _check(backend, layers, layer_norm="instance",
                     mask=torch.zeros(2, 7, dtype=torch.bool))
    assert nothing.shape == (0, 341)
    everything = _check(backend, layers, layer_norm="instance", final_norm="layer",
                        mask=torch.ones(2, 7, dtype=torch.bool))
    assert everything.shape == (14, 341)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norms", [("instance", "instance"), ("layer", "instance"),
                                   ("instance", "layer")], ids=str)
def test_padding_values_never_leak(backend, norms):
    layers = _layers((3, 12, 40, 2))
    padding = torch.rand(3, 12) < 0.4
    padding[:, 5] = False
    padding[2] = True  # a fully padded row: all zeros, no NaN
    dirty = [x.masked_fill(padding[..., None], 1e6) for x in layers]
    mask = torch.rand(3, 12) < 0.5
    kwargs = dict(layer_norm=norms[0], final_norm=norms[1], padding_mask=padding)
    clean = make_targets_ref(layers, **kwargs)
    got = _check(backend, dirty, **kwargs).cpu()
    assert_close(got, clean, **TOL)
    assert torch.isfinite(got).all() and not got[padding].any()
    _check(backend, dirty, mask=mask, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
def test_strided_views(backend, dtype):
    time_major = [torch.randn(11, 3, 96).to(dtype) for _ in range(4)]  # fairseq's T x B x C
    transposed = [x.transpose(0, 1) for x in time_major]  # [3, 11, 96], C still contiguous
    every_other = [x[..., ::2] for x in transposed]  # [3, 11, 48], C strided
    padding = _padding(3, 11)
    mask = torch.rand(3, 11) < 0.5
    for layers in (transposed, every_other):
        assert not layers[0].is_contiguous()
        for norm in ("instance", "layer"):
            _check(backend, layers, layer_norm=norm, final_norm="layer", mask=mask,
                   padding_mask=padding)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["instance", "layer"])
def test_large_common_offset(backend, norm):
    # 1e4 + noise: the one-pass E[x^2] - E[x]^2 in fp32 is off by O(1) here (see test_reference).
    layers = [1e4 + torch.randn(2, 64, 128) for _ in range(2)]
    _check(backend, layers, layer_norm=norm, final_norm=norm)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_rejects_what_the_reference_rejects(backend):
    device = device_for(backend)
    x = torch.randn(2, 3, 4, device=device)
    bad_calls = [
        dict(layers=[x, torch.randn(2, 3, 5, device=device)]),
        dict(layers=[torch.randn(6, 4, device=device)]),
        dict(layers=[x.long()]),
        dict(layers=[x], mask=torch.ones(2, 3, device=device)),
        dict(layers=[x], padding_mask=torch.ones(3, 2, dtype=torch.bool, device=device)),
        dict(layers=[x], layer_norm="batch"),
    ]
    for call in bad_calls:
        kwargs = dict(layer_norm="layer") | call
        with pytest.raises((ValueError, TypeError)):
            ops.make_targets(kwargs.pop("layers"), backend=backend, **kwargs)


@pytest.mark.skipif("cpp" not in ops._BACKENDS, reason="the C++ extension is not built")
def test_cpp_custom_op_passes_opcheck():
    # The fake (shape) function matches the kernel, so torch.compile can trace through it.
    from d2v_engine.ops import cpp

    layers = [torch.randn(2, 5, 16) for _ in range(2)]
    mask = torch.rand(2, 5) < 0.5
    for args in [(layers, 1, 0, mask, None, 1e-5), (layers, 2, 2, None, None, 1e-5)]:
        torch.library.opcheck(cpp._make_targets_op, args,
                              test_utils=("test_schema", "test_faketensor"))
