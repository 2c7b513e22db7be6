"""make_targets of every backend against ops/reference.py: awkward shapes, norms, masks, padding,
strides, dtypes, large offsets, errors.

Every backend computes in fp32 from the same inputs, so bf16/fp16 inputs are held to the fp32
tolerance too (stricter than the low-precision rule): only the order of summation differs.
"""

import pytest
import torch
from backends import BACKENDS, FUSED_BACKENDS, backend_params, device_for, interpreted
from asserts import assert_close

from d2v_engine import ops
from d2v_engine.ops.reference import make_targets_ref

NORMS = ("instance", "layer", "none")
# (B, T, C, K): one row / T = 1 / K = 1; odd C; K = 12 ("all" blocks of a base model); C = 1023.
SHAPES = [(1, 1, 16, 1), (3, 17, 341, 3), (2, 5, 33, 12), (2, 9, 1023, 2)]
# Clones (repeat): T = 1; odd C; K = 12.
REPEAT_SHAPES = [(2, 1, 16, 1), (3, 17, 341, 3), (2, 5, 33, 12)]
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


@pytest.mark.parametrize("backend", backend_params(("cpp",)))
@pytest.mark.parametrize("repeat", [1, 2, 16])
@pytest.mark.parametrize("shape", REPEAT_SHAPES, ids=str)
@pytest.mark.parametrize("layer_norm", NORMS)
@pytest.mark.parametrize("final_norm", NORMS)
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_repeat_matches_reference(backend, repeat, shape, layer_norm, final_norm, padded, dtype):
    """data2vec 2.0's clones: mask [B*repeat, T], each sample's targets computed once."""
    batch, steps = shape[:2]
    mask = torch.rand(batch * repeat, steps) < 0.8
    mask[0, 0] = True
    mask[-1] = False  # a clone without masked steps
    padding = _padding(batch, steps) if padded else None
    got = _check(backend, _layers(shape, dtype), layer_norm=layer_norm, final_norm=final_norm,
                 mask=mask, padding_mask=padding, repeat=repeat)
    assert got.shape == (int(mask.sum()), shape[2])


@pytest.mark.parametrize("backend", backend_params(("cpp",)))
@pytest.mark.parametrize("norms", [("instance", "layer"), ("layer", "none")], ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_repeat_threaded_copy(backend, norms, padded):
    """Enough copied rows (repeat 16) for the copy pass to run on every thread; both schedules."""
    mask = torch.rand(2 * 16, 64) < 0.8
    padding = _padding(2, 64) if padded else None
    _check(backend, _layers((2, 64, 341, 2), torch.bfloat16), layer_norm=norms[0],
           final_norm=norms[1], mask=mask, padding_mask=padding, repeat=16)


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
        dict(layers=[x], repeat=2),  # clones need a mask
        dict(layers=[x], repeat=0, mask=torch.ones(0, 3, dtype=torch.bool, device=device)),
        dict(layers=[x], repeat=2, mask=torch.ones(2, 3, dtype=torch.bool, device=device)),
    ]
    for call in bad_calls:
        kwargs = dict(layer_norm="layer") | call
        with pytest.raises((ValueError, TypeError)):
            ops.make_targets(kwargs.pop("layers"), backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, repeat", [((3, 17, 341, 3), 2), ((2, 1, 16, 1), 16),
                                           ((2, 9, 48, 2), 3)], ids=str)
@pytest.mark.parametrize("layer_norm, final_norm", [("instance", "layer"), ("layer", "none"),
                                                    ("none", "instance")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_repeat_serves_every_masked_copy(backend, shape, repeat, layer_norm, final_norm, dtype):
    """data2vec 2.0: mask [B * repeat, T], each sample's targets gathered for each of its copies."""
    batch, steps = shape[:2]
    if interpreted(backend) and (dtype != torch.float32 or repeat == 16):
        pytest.skip("the interpreter is slow: one dtype and the smaller repeats cover its "
                    "row table")
    layers = _layers(shape, dtype)
    mask = torch.rand(batch * repeat, steps) < 0.8
    mask[-1] = True                                    # every step of the last sample, padding too
    padding = _padding(batch, steps)
    got = _check(backend, layers, mask=mask, padding_mask=padding, layer_norm=layer_norm,
                 final_norm=final_norm, repeat=repeat)
    # The same rows as the explicit formulation: build the copies, then select (fairseq's way).
    full = make_targets_ref(layers, layer_norm=layer_norm, final_norm=final_norm,
                            padding_mask=padding)
    assert_close(got.cpu(), full.repeat_interleave(repeat, 0)[mask], **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeat_errors(backend):
    layers = _layers((2, 4, 16, 1), device=device_for(backend))
    with pytest.raises(ValueError, match="repeat"):
        ops.make_targets(layers, layer_norm="layer", repeat=2, backend=backend)   # no mask
    with pytest.raises(ValueError, match=r"\(6, 4\)"):
        ops.make_targets(layers, layer_norm="layer", repeat=3, backend=backend,
                         mask=torch.ones(2, 4, dtype=torch.bool, device=device_for(backend)))


@pytest.mark.skipif("cpp" not in ops._BACKENDS, reason="the C++ extension is not built")
def test_cpp_custom_op_passes_opcheck():
    # The fake (shape) function matches the kernel, so torch.compile can trace through it.
    from d2v_engine.ops import cpp

    layers = [torch.randn(2, 5, 16) for _ in range(2)]
    mask = torch.rand(2, 5) < 0.5
    clones = torch.rand(6, 5) < 0.5  # repeat 3
    padding = torch.arange(5)[None] >= torch.tensor([[5], [3]])
    for args in [(layers, 1, 0, mask, None, 1e-5, 1), (layers, 2, 2, None, None, 1e-5, 1),
                 (layers, 1, 2, clones, padding, 1e-5, 3)]:
        torch.library.opcheck(cpp._make_targets_op, args,
                              test_utils=("test_schema", "test_faketensor"))
