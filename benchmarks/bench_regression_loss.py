"""regression_loss forward + backward: the per-row squared error or smooth L1 of the student's
predictions against the targets, and the gradient with respect to the predictions.

Cases: 16384 masked rows x C 768 (the issue's size: a batch of masked positions of a base model),
  fp32 pred and target, squared error (audio: scale 1/sqrt(C), sum)
  bf16 pred, fp32 target, smooth L1 beta 2 (image: scale 1/C, mean)
Essential bytes: pred and target read once, pred's gradient written once.

Providers:
  reference      ops/reference.py, autograd through its elementwise ops
  torch_compile  torch.compile of the reference (forward and backward)
  cpp            the C++ extension (gradient from the forward pass)
  triton         the Triton kernel (CUDA only)

Usage: python benchmarks/bench_regression_loss.py [--quick] [--providers cpp,reference]
"""

import math

import torch
from harness import Case, Figure, main, op_providers

from d2v_engine.ops.reference import regression_loss_ref


def _case(rows: int, channels: int, pred_dtype: torch.dtype, beta: float, reduction: str,
          scale: float, label: str) -> Case:
    total = rows * channels * (2 * pred_dtype.itemsize + 4)

    def build(device):
        generator = torch.Generator().manual_seed(0)
        pred = torch.randn(rows, channels, generator=generator).to(device, pred_dtype)
        target = torch.randn(rows, channels, generator=generator).to(device)
        return dict(pred=pred.requires_grad_(), target=target, beta=beta, scale=scale,
                    reduction=reduction)

    return Case(f"{rows}x{channels} {label}", total, build)


def cases(quick: bool) -> list[Case]:
    if quick:
        return [_case(256, 64, torch.float32, 0.0, "sum", 0.125, "fp32 L2")]
    return [_case(16384, 768, torch.float32, 0.0, "sum", 1 / math.sqrt(768), "fp32 L2 sum"),
            _case(16384, 768, torch.bfloat16, 2.0, "mean", 1 / 768, "bf16 smoothL1 mean")]


def _step(fn, inputs):
    pred, target = inputs["pred"], inputs["target"]

    def run():
        pred.grad = None
        loss = fn(pred, target, beta=inputs["beta"], scale=inputs["scale"],
                  reduction=inputs["reduction"])
        loss.backward()
    return run


PROVIDERS = op_providers("regression_loss", regression_loss_ref, _step)

FIGURES = [  # the CPU target
    Figure("16384x768 fp32", "cpp", "reference", at_least=2.0),
    Figure("16384x768 bf16", "cpp", "reference", at_least=2.0),
]

if __name__ == "__main__":
    main("regression_loss", cases, PROVIDERS, description=__doc__.split("\n")[0],
         figures=FIGURES)
