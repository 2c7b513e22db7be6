"""regression_loss of every backend against ops/reference.py: loss and gradient, squared error and
smooth L1, the three reductions, dtypes, strides, empty inputs, errors.

The loss is fp32 (computed in fp32 from the same inputs): fp32 tolerance. The gradient has pred's
dtype: a bf16/fp16 gradient is held to flash-attention's rule (at most twice the error of
PyTorch's own cast of the exact gradient).
"""

import math

import pytest
import torch
from asserts import assert_close
from backends import BACKENDS, FUSED_BACKENDS, assert_low_precision_close, device_for

from d2v_engine import ops
from d2v_engine.ops.reference import regression_loss_ref

SHAPES = [(1, 1), (37, 341), (5, 1023), (300, 64)]
TOL = dict(rtol=1e-4, atol=1e-4)


def _run(backend, pred, target, upstream=None, **kwargs):
    """Loss and pred's gradient from `backend`, for an upstream gradient (random by default)."""
    device = device_for(backend)
    pred = pred.detach().to(device).requires_grad_()
    loss = ops.regression_loss(pred, target.to(device), backend=backend, **kwargs)
    if upstream is None:
        upstream = torch.randn(loss.shape)
    loss.backward(upstream.to(device))
    return loss.detach().cpu(), pred.grad.cpu(), upstream


def _exact(pred, target, upstream, **kwargs):
    """The reference on fp32 copies of the same inputs: loss and the fp32 gradient."""
    pred32 = pred.detach().float().requires_grad_()
    loss = regression_loss_ref(pred32, target.float(), **kwargs)
    loss.backward(upstream)
    return loss.detach(), pred32.grad


def _compare(backend, pred, target, upstream=None, **kwargs):
    loss, grad, upstream = _run(backend, pred, target, upstream, **kwargs)
    exact_loss, exact_grad = _exact(pred, target, upstream, **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == exact_loss.shape
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    assert_close(loss, exact_loss, **TOL)
    if pred.dtype in (torch.float32, torch.float64):
        assert_close(grad, exact_grad, rtol=1e-5, atol=1e-6)
    else:
        assert_low_precision_close(grad, exact_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.5, 4.0])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32),
                                    (torch.bfloat16, torch.float32),
                                    (torch.bfloat16, torch.bfloat16)], ids=str)
def test_loss_and_gradient(backend, shape, beta, reduction, dtypes):
    pred = (torch.randn(shape) * 3).to(dtypes[0])
    target = (torch.randn(shape) * 3).to(dtypes[1])
    scale = 1 / math.sqrt(shape[1])
    _compare(backend, pred, target, beta=beta, scale=scale, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unit_upstream(backend, reduction, dtype):
    # loss.backward() (an upstream of exactly 1) is the C++ backend's no-scale path.
    pred, target = (torch.randn(64, 96) * 3).to(dtype), torch.randn(64, 96) * 3
    _compare(backend, pred, target, torch.tensor(1.0), beta=2.0, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32),
                                    (torch.float64, torch.float16)], ids=str)
def test_other_dtypes(backend, dtypes):
    pred, target = (torch.randn(19, 77) * 3).to(dtypes[0]), (torch.randn(19, 77) * 3).to(dtypes[1])
    _compare(backend, pred, target, beta=1.0, reduction="mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    pred = (torch.randn(96, 40) * 3).t()  # [40, 96]
    target = (torch.randn(40, 192) * 3)[:, ::2]
    assert not pred.is_contiguous() and not target.is_contiguous()
    _compare(backend, pred, target, beta=0.0, reduction="sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_rows(backend):
    device = device_for(backend)
    pred = torch.randn(0, 8, device=device).requires_grad_()
    target = torch.randn(0, 8, device=device)
    for reduction in ("sum", "mean"):
        loss = ops.regression_loss(pred, target, beta=0.0, reduction=reduction, backend=backend)
        assert loss.item() == 0.0
        loss.backward()
    rows = ops.regression_loss(pred, target, beta=1.0, reduction="none", backend=backend)
    assert rows.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_retained_graph(backend):
    device = device_for(backend)
    pred, target = torch.randn(16, 33, device=device), torch.randn(16, 33, device=device)
    loss = ops.regression_loss(pred, target, beta=2.0, backend=backend)  # no gradient wanted
    assert_close(loss.cpu(), regression_loss_ref(pred.cpu(), target.cpu(), beta=2.0), **TOL)
    pred.requires_grad_()
    loss = ops.regression_loss(pred, target, beta=2.0, backend=backend)
    loss.backward(torch.tensor(0.5, device=device), retain_graph=True)
    first = pred.grad.clone()
    loss.backward(torch.tensor(0.5, device=device))  # the stored gradient was not overwritten
    assert_close(pred.grad, 2 * first, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_rejects_what_the_reference_rejects(backend):
    device = device_for(backend)
    a = torch.randn(3, 4, device=device)
    for args, kwargs in [((a, torch.randn(3, 5, device=device)), {}), ((a[0], a[0]), {}),
                         ((a, a), dict(beta=-1.0)), ((a, a), dict(reduction="max"))]:
        with pytest.raises(ValueError):
            ops.regression_loss(*args, backend=backend, **(dict(beta=1.0) | kwargs))


@pytest.mark.skipif("cpp" not in ops._BACKENDS, reason="the C++ extension is not built")
def test_cpp_custom_op_passes_opcheck():
    from d2v_engine.ops import cpp

    pred, target = torch.randn(8, 16), torch.randn(8, 16).bfloat16()
    for args in [(pred, target, 0.0, 0.5, True, True), (pred, target, 2.0, 1.0, False, False)]:
        torch.library.opcheck(cpp._regression_loss_op, args,
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif("cpp" not in ops._BACKENDS, reason="the C++ extension is not built")
def test_cpp_ops_trace_under_torch_compile():
    # One graph (fullgraph: no break) through the make_targets op, with its data-dependent row
    # count, and the loss's autograd.Function; the same values and gradient as in eager mode.
    def step(weight, layers, mask):
        target = ops.make_targets(layers, layer_norm="instance", mask=mask, backend="cpp")
        return ops.regression_loss(target * weight, 0.5 * target, beta=1.0, reduction="mean",
                                   backend="cpp")

    layers = [torch.randn(2, 5, 16) for _ in range(2)]
    mask = torch.rand(2, 5) < 0.5
    weight = torch.randn(16, requires_grad=True)
    loss = torch.compile(step, fullgraph=True)(weight, layers, mask)
    loss.backward()
    compiled_grad, weight.grad = weight.grad, None
    eager = step(weight, layers, mask)
    eager.backward()
    assert_close(loss, eager, rtol=1e-6, atol=1e-6)
    assert_close(compiled_grad, weight.grad, rtol=1e-5, atol=1e-6)
