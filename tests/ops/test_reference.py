"""ops/reference.py against an independent float64 implementation of the DESIGN.md §4 contracts.

The float64 versions below are written differently on purpose: NumPy, a loop over the batch that
indexes the valid steps (no weights, no shift), and a min-based smooth L1 formula.
"""

import math

import numpy as np
import pytest
import torch
from asserts import assert_close

from d2v_engine import ops
from d2v_engine.errors import UserError
from d2v_engine.ops.reference import ema_update_ref, make_targets_ref, regression_loss_ref

NORMS = ("instance", "layer", "none")
TOL = dict(rtol=1e-4, atol=1e-5)


# float64 specification ------------------------------------------------------------------------

def _norm_f64(x: np.ndarray, kind: str, valid: np.ndarray, eps: float) -> np.ndarray:
    """x: [B, T, C] float64, valid: [B, T] bool."""
    if kind == "none":
        return x.copy()
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        if kind == "layer":
            rows = x[b]
            spread = np.sqrt(rows.var(1, keepdims=True) + eps)
            out[b] = (rows - rows.mean(1, keepdims=True)) / spread
            continue
        steps = np.flatnonzero(valid[b])
        if steps.size:
            v = x[b, steps]  # [steps, C]
            out[b, steps] = (v - v.mean(0)) / np.sqrt(v.var(0) + eps)
    return out


def _targets_f64(layers, layer_norm, final_norm, mask=None, padding_mask=None, eps=1e-5):
    xs = [layer.detach().to(torch.float64).numpy() for layer in layers]
    batch, steps, _ = xs[0].shape
    valid = np.ones((batch, steps), bool) if padding_mask is None else ~padding_mask.numpy()
    average = sum(_norm_f64(x, layer_norm, valid, eps) for x in xs) / len(xs)
    y = _norm_f64(average, final_norm, valid, eps)
    y[~valid] = 0.0
    return torch.from_numpy(y if mask is None else y[mask.numpy()])


def _loss_f64(pred, target, beta, scale, reduction):
    """Differentiable float64 loss; smooth L1 through q = min(|x|, beta)."""
    x = pred.to(torch.float64) - target.to(torch.float64)
    if beta == 0:
        per_element = x * x
    else:
        q = torch.minimum(x.abs(), torch.tensor(beta, dtype=torch.float64))
        per_element = (0.5 * q * q + beta * (x.abs() - q)) / beta
    rows = per_element.sum(1) * scale
    return {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]


def _padding(batch: int, steps: int) -> torch.Tensor:
    """Suffix padding of random lengths: one full row, one row of a single valid step."""
    lengths = torch.randint(1, steps + 1, (batch,))
    lengths[0] = steps
    lengths[-1] = 1
    return torch.arange(steps)[None] >= lengths[:, None]


# make_targets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 1, 16, 1), (3, 17, 341, 8), (1, 6, 64, 1), (4, 9, 33, 3)])
@pytest.mark.parametrize("layer_norm", NORMS)
@pytest.mark.parametrize("final_norm", NORMS)
def test_make_targets_matches_float64(shape, layer_norm, final_norm):
    batch, steps, channels, k = shape
    layers = [torch.randn(batch, steps, channels) * 3 + 1 for _ in range(k)]
    padding = _padding(batch, steps) if batch > 1 else None
    mask = torch.rand(batch, steps) < 0.6
    mask[0, 0] = True
    got = make_targets_ref(layers, layer_norm=layer_norm, final_norm=final_norm, mask=mask,
                           padding_mask=padding)
    assert got.dtype == torch.float32 and got.shape == (int(mask.sum()), channels)
    assert_close(got, _targets_f64(layers, layer_norm, final_norm, mask, padding), **TOL)
    full = make_targets_ref(layers, layer_norm=layer_norm, final_norm=final_norm,
                            padding_mask=padding)
    assert_close(full, _targets_f64(layers, layer_norm, final_norm, None, padding), **TOL)


def test_instance_norm_ignores_padding_anywhere():
    layers = [torch.randn(3, 12, 40) for _ in range(2)]
    padding = torch.rand(3, 12) < 0.4
    padding[:, 5] = False
    dirty = [x.masked_fill(padding[..., None], 1e6) for x in layers]
    got = make_targets_ref(dirty, layer_norm="instance", final_norm="instance",
                           padding_mask=padding)
    assert_close(got, _targets_f64(layers, "instance", "instance", None, padding), **TOL)
    assert not got[padding].any()


def test_fully_padded_row_is_zero():
    layers = [torch.randn(2, 5, 8)]
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1] = True
    got = make_targets_ref(layers, layer_norm="instance", final_norm="layer",
                           padding_mask=padding)
    assert torch.isfinite(got).all() and not got[1].any()


def test_make_targets_nothing_and_everything_masked():
    layers = [torch.randn(2, 7, 341) for _ in range(3)]
    nothing = make_targets_ref(layers, layer_norm="layer", mask=torch.zeros(2, 7, dtype=torch.bool))
    assert nothing.shape == (0, 341) and nothing.dtype == torch.float32
    everything = make_targets_ref(layers, layer_norm="layer", final_norm="layer",
                                  mask=torch.ones(2, 7, dtype=torch.bool))
    assert_close(everything, _targets_f64(layers, "layer", "layer").reshape(14, 341), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_make_targets_strided_views_and_low_precision(dtype):
    time_major = [torch.randn(11, 3, 96).to(dtype) for _ in range(4)]  # fairseq's T x B x C
    layers = [x.transpose(0, 1)[..., ::2] for x in time_major]  # [3, 11, 48], non-contiguous
    assert not layers[0].is_contiguous()
    padding = _padding(3, 11)
    for norm in ("instance", "layer"):
        got = make_targets_ref(layers, layer_norm=norm, final_norm="layer", padding_mask=padding)
        assert_close(got, _targets_f64(layers, norm, "layer", None, padding), **TOL)


@pytest.mark.parametrize("norm", ["instance", "layer"])
def test_make_targets_large_common_offset(norm):
    layers = [1e4 + torch.randn(2, 64, 128) for _ in range(2)]
    expected = _targets_f64(layers, norm, "none")
    assert_close(make_targets_ref(layers, layer_norm=norm), expected, **TOL)
    # The test bites: the one-pass E[x^2] - E[x]^2 in fp32 is far off on the same inputs.
    x = layers[0]
    dim = 1 if norm == "instance" else 2
    mean = x.mean(dim, keepdim=True)
    naive_var = (x * x).mean(dim, keepdim=True) - mean * mean
    naive = (x - mean) / torch.sqrt(naive_var.clamp(min=0) + 1e-5)
    with pytest.raises(AssertionError):
        assert_close(naive, _norm_f64(x.double().numpy(), norm, np.ones((2, 64), bool), 1e-5),
                     **TOL)


def test_make_targets_rejects_bad_arguments():
    x = torch.randn(2, 3, 4)
    bad_calls = [
        dict(layers=[]),
        dict(layers=[x, torch.randn(2, 3, 5)]),
        dict(layers=[torch.randn(6, 4)]),
        dict(layers=[x.long()]),
        dict(layers=[x], mask=torch.ones(2, 3)),
        dict(layers=[x], padding_mask=torch.ones(3, 2, dtype=torch.bool)),
        dict(layers=[x], layer_norm="batch"),
    ]
    for call in bad_calls:
        kwargs = dict(layer_norm="layer") | call
        with pytest.raises((ValueError, TypeError)):
            make_targets_ref(kwargs.pop("layers"), **kwargs)


@pytest.mark.parametrize("repeat", [1, 3, 16])
@pytest.mark.parametrize("norms", [("instance", "layer"), ("layer", "instance"), ("none", "none")],
                         ids=str)
@pytest.mark.parametrize("padded", [False, True])
def test_make_targets_repeat_matches_repeat_interleave(repeat, norms, padded):
    """data2vec 2.0's clones: the same rows as fairseq's y.repeat_interleave(M, 0)[mask]."""
    batch, steps, channels = 3, 9, 33
    layers = [torch.randn(batch, steps, channels) * 3 + 1 for _ in range(2)]
    padding = _padding(batch, steps) if padded else None
    mask = torch.rand(batch * repeat, steps) < 0.6
    mask[0, 0] = True
    mask[-1] = False  # a clone without masked steps
    kw = dict(layer_norm=norms[0], final_norm=norms[1], padding_mask=padding)
    got = make_targets_ref(layers, mask=mask, repeat=repeat, **kw)
    explicit = _targets_f64(layers, *norms, None, padding).repeat_interleave(repeat, 0)[mask]
    assert got.dtype == torch.float32 and got.shape == (int(mask.sum()), channels)
    assert_close(got, explicit, **TOL)
    assert torch.equal(ops.make_targets(layers, mask=mask, repeat=repeat, backend="reference",
                                        **kw), got)  # the public op passes repeat through
    if repeat == 1:  # exactly today's rows
        assert torch.equal(got, make_targets_ref(layers, **kw)[mask])


def test_make_targets_rejects_bad_repeat():
    x = torch.randn(2, 3, 4)
    bad_calls = [
        dict(repeat=0, mask=torch.ones(0, 3, dtype=torch.bool)),
        dict(repeat=-1, mask=torch.ones(2, 3, dtype=torch.bool)),
        dict(repeat=2),  # clones need a mask
        dict(repeat=2, mask=torch.ones(2, 3, dtype=torch.bool)),  # [B, T], not [B*2, T]
        dict(repeat=2, mask=torch.ones(4, 3), padding_mask=None),  # not bool
        dict(repeat=2, mask=torch.ones(4, 3, dtype=torch.bool),
             padding_mask=torch.zeros(4, 3, dtype=torch.bool)),  # padding stays [B, T]
        dict(repeat=2.0, mask=torch.ones(4, 3, dtype=torch.bool)),
    ]
    for call in bad_calls:
        with pytest.raises((ValueError, TypeError)):
            make_targets_ref([x], layer_norm="layer", **call)


# regression_loss ------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, 0.5, 4.0])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("scale", [1.0, 1 / math.sqrt(341)])
def test_regression_loss_and_gradient(beta, reduction, scale):
    pred = (torch.randn(37, 341) * 3).requires_grad_()
    target = torch.randn(37, 341) * 3
    loss = regression_loss_ref(pred, target, beta=beta, scale=scale, reduction=reduction)
    pred64 = pred.detach().double().requires_grad_()
    expected = _loss_f64(pred64, target, beta, scale, reduction)
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    assert_close(loss, expected, **TOL)
    upstream = torch.randn(loss.shape)
    loss.backward(upstream)
    expected.backward(upstream.double())
    assert_close(pred.grad, pred64.grad, **TOL)


def test_regression_loss_bf16_pred():
    pred = torch.randn(16, 64, dtype=torch.bfloat16).requires_grad_()
    target = torch.randn(16, 64)
    loss = regression_loss_ref(pred, target, beta=2.0)
    assert loss.dtype == torch.float32
    pred64 = pred.detach().double().requires_grad_()
    expected = _loss_f64(pred64, target, 2.0, 1.0, "sum")
    assert_close(loss, expected, **TOL)
    loss.backward()
    expected.backward()
    assert pred.grad.dtype == torch.bfloat16
    assert_close(pred.grad, pred64.grad, rtol=1e-2, atol=1e-2)


def test_regression_loss_without_rows():
    pred, target = torch.randn(0, 8).requires_grad_(), torch.randn(0, 8)
    for reduction in ("sum", "mean"):
        loss = regression_loss_ref(pred, target, beta=0.0, reduction=reduction)
        assert loss.item() == 0.0
        loss.backward()
    assert regression_loss_ref(pred, target, beta=1.0, reduction="none").shape == (0,)


def test_regression_loss_rejects_bad_arguments():
    a = torch.randn(3, 4)
    for args, kwargs in [((a, torch.randn(3, 5)), {}), ((a[0], a[0]), {}),
                         ((a, a), dict(beta=-1.0)), ((a, a), dict(reduction="max"))]:
        with pytest.raises(ValueError):
            regression_loss_ref(*args, **(dict(beta=1.0) | kwargs))


# ema_update_ ----------------------------------------------------------------------------------

SHAPES = [(3, 341), (1,), (7, 5, 2), (64,)]


@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_shadow", [False, True])
def test_ema_update_matches_float64(student_dtype, with_shadow):
    ema = [torch.randn(shape) for shape in SHAPES]
    student = [torch.randn(shape).to(student_dtype) for shape in SHAPES]
    shadow = [torch.randn(shape).bfloat16() for shape in SHAPES] if with_shadow else None
    before = [e.double() for e in ema]
    ema_update_ref(ema, student, 0.9998, shadow)
    for i, (e, s) in enumerate(zip(ema, student)):
        assert e.dtype == torch.float32
        assert_close(e, 0.9998 * before[i] + 0.0002 * s.double(), rtol=1e-6, atol=1e-6)
        if shadow is not None:
            assert torch.equal(shadow[i], e.bfloat16())


def test_ema_update_decay_extremes():
    ema, student = [torch.randn(5)], [torch.randn(5).half()]
    kept = ema[0].clone()
    ema_update_ref(ema, student, 1.0)
    assert torch.equal(ema[0], kept)
    ema_update_ref(ema, student, 0.0)
    assert torch.equal(ema[0], student[0].float())


def test_ema_update_rejects_bad_arguments():
    e, s = torch.randn(4), torch.randn(4)
    for args in [([e], [s, s], 0.9, None), ([e.half()], [s], 0.9, None),
                 ([e], [torch.randn(5)], 0.9, None), ([e], [s], 1.5, None),
                 ([e], [s], 0.9, [torch.randn(3)]), ([e], [s.long()], 0.9, None)]:
        with pytest.raises((ValueError, TypeError)):
            ema_update_ref(*args)


# public dispatch ------------------------------------------------------------------------------

def test_dispatch_reaches_the_reference():
    layers = [torch.randn(2, 5, 8) for _ in range(2)]
    mask = torch.rand(2, 5) < 0.5
    assert torch.equal(ops.make_targets(layers, layer_norm="layer", mask=mask, backend="reference"),
                       make_targets_ref(layers, layer_norm="layer", mask=mask))
    pred, target = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.equal(ops.regression_loss(pred, target, beta=0.0, backend="reference"),
                       regression_loss_ref(pred, target, beta=0.0))
    ema, student = [torch.randn(3)], [torch.randn(3)]
    expected = 0.5 * ema[0] + 0.5 * student[0]
    ops.ema_update_(ema, student, 0.5, backend="auto")
    assert_close(ema[0], expected, rtol=1e-6, atol=1e-7)
    # auto prefers the C++ extension for CPU tensors when it is built.
    assert ops.resolve_backend("auto", torch.device("cpu")) == ("cpp" if "cpp" in ops._BACKENDS
                                                                else "reference")
    # auto prefers the Triton kernels for CUDA tensors when triton is installed.
    assert ops.resolve_backend("auto", "cuda") == ("triton" if "triton" in ops._BACKENDS
                                                   else "reference")


@pytest.mark.parametrize("backend", ["triton", "cpp", "fast"])
def test_unavailable_or_unknown_backend_is_a_user_error(backend, monkeypatch):
    # Outside the Triton interpreter, triton is unavailable for CPU tensors even when installed;
    # the C++ backend is unavailable when the extension was not built (simulated here).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delitem(ops._BACKENDS, "cpp", raising=False)
    with pytest.raises(UserError, match="kernels.backend"):
        ops.resolve_backend(backend, "cpu")
    with pytest.raises(UserError):
        ops.regression_loss(torch.randn(2, 3), torch.randn(2, 3), beta=0.0, backend=backend)
    with pytest.raises(UserError):
        ops.make_targets([torch.randn(1, 2, 3)], layer_norm="layer", backend=backend)
    with pytest.raises(UserError):
        ops.ema_update_([torch.randn(2)], [torch.randn(2)], 0.9, backend=backend)
