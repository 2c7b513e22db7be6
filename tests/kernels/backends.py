"""Which kernel backends the kernel tests run, shared by the C++ and the Triton tests.

`BACKENDS` lists every backend with a pytest skip mark (and its reason) where it cannot run here:
- "reference" always runs (the backend everything is compared with, as a sanity baseline);
- "cpp" when the extension `d2v_engine._C` is built (setup.py; `D2V_SKIP_EXT=1` skips it);
- "triton" when `d2v_engine.ops` registered it and tensors can reach it: a CUDA device, or the
  CPU interpreter (`TRITON_INTERPRET=1`, set before anything imports triton).

Use: `@pytest.mark.parametrize("backend", BACKENDS)` and `device_for(backend)` for the tensors.
"""

import os

import pytest
import torch

from d2v_engine import ops


def _why_not(backend: str) -> str | None:
    """None when `backend` can run in this process, else the reason it cannot."""
    if backend not in ops._BACKENDS:
        return f"the {backend} backend is not registered in d2v_engine.ops (not built/installed)"
    if backend == "triton" and not torch.cuda.is_available() \
            and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton needs a CUDA device or TRITON_INTERPRET=1"
    return None


def available_backends() -> list[str]:
    """The backends that can run here, "reference" first."""
    return [name for name in ("reference", "cpp", "triton") if _why_not(name) is None]


def backend_params(names: tuple[str, ...] = ("reference", "cpp", "triton")) -> list:
    """pytest params over `names`, the unavailable ones skipped with their reason; the triton ones
    are also marked `gpu` (`make gpu-check` runs them)."""
    return [pytest.param(name, id=name,
                         marks=[pytest.mark.skipif(_why_not(name) is not None, reason=_why_not(name) or ""),
                                *([pytest.mark.gpu] if name == "triton" else [])])
            for name in names]


BACKENDS = backend_params()
FUSED_BACKENDS = backend_params(("cpp", "triton"))


def device_for(backend: str) -> torch.device:
    """Where a backend's test tensors live: CUDA for Triton when there is a GPU, else the CPU."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def interpreted(backend: str) -> bool:
    """Whether `backend` runs in Triton's CPU interpreter here (slow: keep its shapes small)."""
    return backend == "triton" and not torch.cuda.is_available()


def assert_low_precision_close(actual: torch.Tensor, exact: torch.Tensor, *,
                               floor: float = 1e-6) -> None:
    """flash-attention's rule for a low-precision output (bf16/fp16) of a kernel.

    Its largest error against `exact` (the fp32/fp64 result on the same inputs) is at most twice
    that of PyTorch's own low-precision result, the exact one cast to actual's dtype, plus
    `floor` (for outputs whose cast is exact).
    """
    exact = exact.detach().double().cpu()
    error = (actual.detach().double().cpu() - exact).abs().max().item() if exact.numel() else 0.0
    torch_error = (exact.to(actual.dtype).double() - exact).abs().max().item() \
        if exact.numel() else 0.0
    assert error <= 2 * torch_error + floor, \
        f"{actual.dtype} error {error:.3g} > 2 x torch's {torch_error:.3g} + {floor:g}"
