"""A pytest plugin that `gpu_check.py --inject-fault` loads into the kernel tests (a test hook).

It makes the reference regression loss 1% too large before any test module imports it, so that each
comparison of the Triton kernel with the reference fails: `tests/benchmarks/test_gpu_check.py` uses
it to show that a failed correctness check makes gpu-check exit with status 1. Nothing else loads it.
"""
from d2v_engine.ops import reference

_exact = reference.regression_loss_ref


def _one_percent_off(*args, **kwargs):
    return _exact(*args, **kwargs) * 1.01


reference.regression_loss_ref = _one_percent_off
