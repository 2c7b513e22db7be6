"""Triton make_targets against ops/reference.py: awkward shapes, padding, masks, strides, dtypes.

Runs in Triton's CPU interpreter with small shapes, and also at model sizes on a GPU.
"""
import pytest
import torch
from asserts import assert_close
from triton_env import sizes, triton_device  # noqa: F401  (fixture)

from d2v_engine import ops
from d2v_engine.errors import UserError
from d2v_engine.ops.reference import make_targets_ref

pytestmark = pytest.mark.gpu  # `make gpu-check` runs these (pytest -m gpu)

NORMS = ("instance", "layer", "none")
# (B, T, C, K): one row, T = 1, odd C, K = 1 and K = 8 (every block of an 8-block teacher).
SHAPES = sizes([(1, 1, 33, 1), (2, 1, 16, 3), (3, 7, 341, 8), (4, 9, 33, 2)],
               [(8, 500, 768, 8), (16, 196, 768, 6), (8, 512, 768, 10)])
# Both compute in fp32 from the same inputs: only the summation order differs.
TOL = dict(rtol=1e-5, atol=2e-5)


def _padding(batch: int, steps: int, device) -> torch.Tensor:
    """Suffix padding: the first row full, the last one valid step, the rest random."""
    lengths = torch.randint(1, steps + 1, (batch,))
    lengths[0], lengths[-1] = steps, 1
    return (torch.arange(steps)[None] >= lengths[:, None]).to(device)


def _layers(shape, dtype, device):
    batch, steps, channels, k = shape
    return [(torch.randn(batch, steps, channels, device=device) * 3 + 1).to(dtype)
            for _ in range(k)]


def _triton(layers, **kw):
    return ops.make_targets(layers, backend="triton", **kw)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layer_norm", NORMS)
@pytest.mark.parametrize("final_norm", NORMS)
def test_matches_reference_masked_and_padded(triton_device, shape, layer_norm, final_norm):
    layers = _layers(shape, torch.float32, triton_device)
    batch, steps = shape[:2]
    padding = _padding(batch, steps, triton_device) if batch > 1 else None
    mask = torch.rand(batch, steps, device=triton_device) < 0.6
    mask[0, 0] = True
    kw = dict(layer_norm=layer_norm, final_norm=final_norm, padding_mask=padding)
    got = _triton(layers, mask=mask, **kw)
    assert got.dtype == torch.float32 and got.shape == (int(mask.sum()), shape[2])
    assert_close(got, make_targets_ref(layers, mask=mask, **kw), **TOL)


@pytest.mark.parametrize("shape,repeat", [((3, 7, 33, 2), 2), ((2, 5, 40, 3), 16)]
                         + sizes([], [((16, 196, 768, 10), 16)]), ids=str)
@pytest.mark.parametrize("norms", [("instance", "layer"), ("layer", "instance"), ("none", "none")])
def test_repeat_matches_reference(triton_device, shape, repeat, norms):
    """data2vec 2.0's clones: mask [B*repeat, T] against the reference, bf16 teacher outputs."""
    layers = _layers(shape, torch.bfloat16, triton_device)
    batch, steps = shape[:2]
    mask = torch.rand(batch * repeat, steps, device=triton_device) < 0.8
    mask[0, 0] = True
    mask[-1] = False  # a clone without masked steps
    kw = dict(layer_norm=norms[0], final_norm=norms[1], mask=mask, repeat=repeat,
              padding_mask=_padding(batch, steps, triton_device))
    got = _triton(layers, **kw)
    assert got.dtype == torch.float32 and got.shape == (int(mask.sum()), shape[2])
    assert_close(got, make_targets_ref(layers, **kw), **TOL)


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("norms", [("instance", "none"), ("layer", "layer"), ("none", "instance")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_without_mask(triton_device, shape, norms, dtype):
    layers = _layers(shape, dtype, triton_device)
    padding = _padding(*shape[:2], triton_device)
    kw = dict(layer_norm=norms[0], final_norm=norms[1], padding_mask=padding)
    got = _triton(layers, **kw)
    assert got.shape == shape[:3] and got.dtype == torch.float32
    assert not got[padding].any()  # padded rows are exactly zero
    assert_close(got, make_targets_ref(layers, **kw), **TOL)


def test_nothing_and_everything_masked(triton_device):
    layers = _layers((2, 7, 341, 3), torch.float32, triton_device)
    nothing = _triton(layers, layer_norm="layer", mask=torch.zeros(2, 7, dtype=torch.bool,
                                                                   device=triton_device))
    assert nothing.shape == (0, 341) and nothing.dtype == torch.float32
    everything = torch.ones(2, 7, dtype=torch.bool, device=triton_device)
    for final_norm in ("layer", "instance"):
        kw = dict(layer_norm="instance", final_norm=final_norm, mask=everything)
        assert_close(_triton(layers, **kw), make_targets_ref(layers, **kw), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views(triton_device, dtype):
    # fairseq's time-major T x B x C, transposed, every other channel; plus the image encoder's
    # patch tokens out[:, 1:] (CLS dropped): none of them contiguous, strides differ per layer.
    time_major = [torch.randn(11, 3, 96, device=triton_device).to(dtype) for _ in range(3)]
    layers = [x.transpose(0, 1)[..., ::2] for x in time_major]
    layers.append(torch.randn(3, 12, 48, device=triton_device).to(dtype)[:, 1:])
    assert not any(x.is_contiguous() for x in layers)
    padding = _padding(3, 11, triton_device)
    mask = torch.rand(3, 11, device=triton_device) < 0.5
    for norms in (("instance", "layer"), ("layer", "instance")):
        kw = dict(layer_norm=norms[0], final_norm=norms[1], mask=mask, padding_mask=padding)
        assert_close(_triton(layers, **kw), make_targets_ref(layers, **kw), **TOL)


def test_mixed_dtypes(triton_device):
    layers = [torch.randn(2, 5, 40, device=triton_device).to(dtype)
              for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    kw = dict(layer_norm="layer", final_norm="layer")
    assert_close(_triton(layers, **kw), make_targets_ref(layers, **kw), **TOL)


def test_padding_values_do_not_matter(triton_device):
    layers = _layers((3, 12, 40, 2), torch.float32, triton_device)
    padding = torch.rand(3, 12, device=triton_device) < 0.4
    padding[:, 5] = False
    padding[2] = True  # a sequence without any valid step
    dirty = [x.masked_fill(padding[..., None], float("nan")) for x in layers]
    kw = dict(layer_norm="instance", final_norm="instance", padding_mask=padding)
    got = _triton(dirty, **kw)
    assert torch.isfinite(got).all() and not got[padding].any()
    assert_close(got, make_targets_ref(layers, **kw), **TOL)


@pytest.mark.parametrize("norm", ["instance", "layer"])
def test_large_common_offset(triton_device, norm):
    # Against float64: an unshifted one-pass variance in fp32 would be off by ~1e-3 here.
    layers = [1e4 + torch.randn(2, 64, 128, device=triton_device) for _ in range(2)]
    expected = make_targets_ref([x.double() for x in layers], layer_norm=norm, final_norm=norm)
    assert_close(_triton(layers, layer_norm=norm, final_norm=norm), expected, rtol=1e-4,
                 atol=1e-5)


def test_dispatch_and_refusal(triton_device, monkeypatch):
    layers = _layers((2, 5, 8, 2), torch.float32, triton_device)
    assert_close(_triton(layers, layer_norm="layer"), make_targets_ref(layers, layer_norm="layer"),
                 **TOL)
    with pytest.raises(ValueError):
        _triton(layers, layer_norm="batch")
    if triton_device == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(UserError, match="kernels.backend"):
            _triton(layers, layer_norm="layer")
        assert ops.resolve_backend("auto", "cpu") != "triton"


@pytest.mark.parametrize("repeat", [1, 2])
def test_torch_compile_traces_through_the_op(triton_device, repeat):
    """The registered op has a fake with a data-dependent row count; aot_eager runs it."""
    def targets(layers, mask):
        y = ops.make_targets([x * 2.0 for x in layers], layer_norm="instance",
                             final_norm="layer", mask=mask, backend="triton",
                             repeat=repeat)
        return y * 1.0, y.shape[0]

    layers = _layers((2, 6, 33, 3), torch.float32, triton_device)
    compiled = torch.compile(targets, backend="aot_eager", fullgraph=True, dynamic=True)
    for threshold in (0.3, 0.7):  # two different row counts, one graph
        mask = torch.rand(2 * repeat, 6, device=triton_device) < threshold
        got, rows = compiled(layers, mask)
        expected = make_targets_ref([x * 2.0 for x in layers], layer_norm="instance",
                                    final_norm="layer", mask=mask, repeat=repeat)
        assert rows == expected.shape[0]
        assert_close(got, expected, **TOL)
