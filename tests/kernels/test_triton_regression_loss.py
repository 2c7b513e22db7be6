"""Triton regression_loss against ops/reference.py: loss and gradient, every reduction and dtype.

Runs in Triton's CPU interpreter with small shapes, and also at model sizes on a GPU.
"""
import math

import pytest
import torch
from asserts import assert_close
from triton_env import ON_GPU, sizes, triton_device  # noqa: F401  (fixture)

from d2v_engine import ops
from d2v_engine.ops.reference import regression_loss_ref

pytestmark = pytest.mark.gpu  # `make gpu-check` runs these (pytest -m gpu)

# (M, C): one row, one column, odd C, more rows than a program's tile.
SHAPES = sizes([(1, 1), (1, 341), (37, 33), (130, 20)], [(16384, 768), (4096, 1024)])
# (pred dtype, tolerance of the gradient). fp32 agrees to rounding. A low-precision gradient is
# rounded once from fp32, like PyTorch's: the two differ by at most one unit in the last place
# where their fp32 values straddle a rounding boundary (relative 2^-p, p = 7 mantissa bits for
# bf16, 10 for fp16).
DTYPES = [(torch.float32, dict(rtol=1e-5, atol=1e-6)),
          (torch.bfloat16, dict(rtol=2**-7, atol=1e-5)),
          (torch.float16, dict(rtol=2**-10, atol=1e-5))]
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)


def _check(pred, target, beta, scale, reduction, grad_tol, upstream=None):
    """Loss and gradient of the Triton backend against the reference's (autograd) ones."""
    mine = pred.detach().clone().requires_grad_()
    theirs = pred.detach().clone().requires_grad_()
    kw = dict(beta=beta, scale=scale, reduction=reduction)
    got = ops.regression_loss(mine, target, backend="triton", **kw)
    expected = regression_loss_ref(theirs, target, **kw)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert_close(got, expected, **LOSS_TOL)
    if upstream is None:
        upstream = torch.randn(got.shape, device=got.device)
    got.backward(upstream)
    expected.backward(upstream)
    assert mine.grad.dtype == pred.dtype
    assert_close(mine.grad, theirs.grad, **grad_tol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 4.0])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_matches_reference_fp32(triton_device, shape, beta, reduction):
    pred = torch.randn(shape, device=triton_device) * 3
    target = torch.randn(shape, device=triton_device) * 3
    _check(pred, target, beta, 1 / math.sqrt(shape[1]), reduction, DTYPES[0][1])


@pytest.mark.parametrize("dtype,grad_tol", DTYPES[1:])
@pytest.mark.parametrize("beta", [0.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_pred(triton_device, dtype, grad_tol, beta, reduction):
    pred = (torch.randn(37, 341, device=triton_device) * 3).to(dtype)
    target = torch.randn(37, 341, device=triton_device) * 3  # fp32 targets, as from make_targets
    _check(pred, target, beta, 1.0, reduction, grad_tol)


def test_strided_inputs(triton_device):
    pred = torch.randn(33, 20, device=triton_device).t()  # [20, 33], column-major
    target = torch.randn(20, 66, device=triton_device).bfloat16()[:, ::2]
    assert not pred.is_contiguous() and not target.is_contiguous()
    _check(pred, target, 1.0, 0.5, "sum", DTYPES[0][1])


def test_no_rows_no_columns(triton_device):
    for shape in ((0, 8), (5, 0)):
        pred = torch.randn(shape, device=triton_device).requires_grad_()
        target = torch.randn(shape, device=triton_device)
        for reduction in ("sum", "mean"):
            loss = ops.regression_loss(pred, target, beta=0.0, reduction=reduction,
                                       backend="triton")
            assert loss.item() == 0.0
            loss.backward()
        rows = ops.regression_loss(pred, target, beta=1.0, reduction="none", backend="triton")
        assert rows.shape == (shape[0],) and not rows.any()


def test_backward_twice_and_without_grad(triton_device):
    pred = torch.randn(9, 33, device=triton_device, requires_grad=True)
    target = torch.randn(9, 33, device=triton_device)
    loss = ops.regression_loss(pred, target, beta=1.0, backend="triton")
    loss.backward(retain_graph=True)
    first = pred.grad.clone()
    loss.backward()  # the stored gradient survives the first backward
    assert_close(pred.grad, 2 * first, rtol=1e-6, atol=0)
    with torch.no_grad():
        assert_close(ops.regression_loss(pred, target, beta=1.0, backend="triton"), loss,
                     rtol=0, atol=0)


def test_torch_compile_traces_through_the_op(triton_device):
    """The loss is a triton_op inside an autograd.Function: compile it, gradients included.

    On CPU the interpreted kernel cannot be traced into (it runs only on real tensors), so the
    op is checked with dynamo's eager backend there; on a GPU through aot_eager.
    """
    def loss_fn(pred, target):
        return ops.regression_loss(pred * 2.0, target, beta=2.0, scale=0.5, reduction="mean",
                                   backend="triton")

    backend = "aot_eager" if ON_GPU else "eager"
    compiled = torch.compile(loss_fn, backend=backend, fullgraph=True)
    pred = torch.randn(17, 33, device=triton_device, requires_grad=True)
    target = torch.randn(17, 33, device=triton_device)
    loss = compiled(pred, target)
    loss.backward()
    pred_ref = pred.detach().clone().requires_grad_()
    expected = regression_loss_ref(pred_ref * 2.0, target, beta=2.0, scale=0.5, reduction="mean")
    expected.backward()
    assert_close(loss, expected, **LOSS_TOL)
    assert_close(pred.grad, pred_ref.grad, **DTYPES[0][1])
