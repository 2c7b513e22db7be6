"""Every Triton kernel compiles for a Hopper GPU (sm_90), also on a machine without one.

The interpreter runs Python, so it accepts code that Triton's compiler rejects; this test compiles
each kernel as the JIT would specialise it on a GPU (16-byte aligned pointers, sizes divisible by
16) and checks the machine code: no register spills to local memory, and, for aligned tensors,
vector global loads and stores (the kernels' alignment hints are what makes them possible). It runs in a subprocess because
the test session may have switched Triton to its interpreter, which cannot compile.
"""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu  # `make gpu-check` runs these (pytest -m gpu)

ROOT = Path(__file__).resolve().parents[2]


def _cases():
    """(kernel, argument types, constexprs) for each specialisation worth compiling."""
    import triton.language as tl

    from d2v_engine.kernels import ema_update, make_targets, regression_loss

    ema_args = dict(ema_addr_ptr="*i64", student_addr_ptr="*i64", shadow_addr_ptr="*i64",
                    numel_ptr="*i64", item_tensor_ptr="*i32", item_block_ptr="*i32",
                    decay="fp32", one_minus_decay="fp32")
    stats_args = dict(addr_ptr="*i64", strides_ptr="*i64", pad_ptr="*u8", first_ptr="*i32",
                      stats_ptr="*fp32", B="i32", T="i32", C="i32", eps="fp32")
    rows_args = dict(addr_ptr="*i64", strides_ptr="*i64", stats_ptr="*fp32", pad_ptr="*u8",
                     rows_ptr="*i64", out_ptr="*fp32", R="i32", B="i32", T="i32", C="i32",
                     K="i32", divisor="fp32", eps="fp32")
    layout = dict(LAYER_DTYPE=tl.bfloat16, UNIT_STRIDE_C=True, ALIGNED=True, VEC=8)
    loss_args = dict(pred_ptr="*bf16", target_ptr="*fp32", rows_ptr="*fp32", grad_ptr="*fp32",
                     M="i32", C="i32", stride_pm="i32", stride_tm="i32", beta="fp32",
                     scale="fp32")
    return [
        (ema_update._ema_update_fwd_kernel, ema_args,
         dict(STUDENT_DTYPE=tl.bfloat16, SHADOW_DTYPE=tl.bfloat16, HAS_SHADOW=True,
              ALIGNED=True, BLOCK=4096)),
        (ema_update._ema_update_fwd_kernel, ema_args,
         dict(STUDENT_DTYPE=tl.float16, SHADOW_DTYPE=tl.float32, HAS_SHADOW=False,
              ALIGNED=True, BLOCK=4096)),
        (make_targets._make_targets_stats_kernel, stats_args,
         dict(layout, HAS_PADDING=True, BLOCK_T=32, BLOCK_C=128)),
        (make_targets._make_targets_stats_kernel, stats_args,  # strided fp32, no padding
         dict(LAYER_DTYPE=tl.float32, UNIT_STRIDE_C=False, ALIGNED=False, VEC=4,
              HAS_PADDING=False, BLOCK_T=32, BLOCK_C=128)),
        (make_targets._make_targets_fwd_kernel, rows_args,
         dict(layout, LAYER_NORM=2, FINAL_LAYER_NORM=True, HAS_ROWS=True, HAS_PADDING=True,
              ACCUMULATE=False, BLOCK_R=4, BLOCK_C=1024)),
        (make_targets._make_targets_fwd_kernel, rows_args,
         dict(layout, LAYER_NORM=1, FINAL_LAYER_NORM=False, HAS_ROWS=False, HAS_PADDING=False,
              ACCUMULATE=True, BLOCK_R=4, BLOCK_C=1024)),
        (make_targets._make_targets_fwd_kernel, rows_args,  # strided fp16, no norm
         dict(LAYER_DTYPE=tl.float16, UNIT_STRIDE_C=False, ALIGNED=False, VEC=8, LAYER_NORM=0,
              FINAL_LAYER_NORM=False, HAS_ROWS=True, HAS_PADDING=False, ACCUMULATE=False,
              BLOCK_R=16, BLOCK_C=256)),
        (regression_loss._regression_loss_fwd_kernel, loss_args,
         dict(stride_pc=1, stride_tc=1, SMOOTH=True, STORE_GRAD=True, BLOCK_M=4, BLOCK_C=1024)),
        (regression_loss._regression_loss_bwd_kernel,
         dict(grad_ptr="*fp32", upstream_ptr="*fp32", out_ptr="*bf16", M="i32", C="i32",
              factor="fp32"),
         dict(ROW_WISE=True, BLOCK_M=4, BLOCK_C=1024)),
    ]


def main() -> None:
    """Compile every case; print one line per kernel; exit non-zero on the first problem."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    # What the JIT assumes of a GPU launch: aligned pointers, C and row strides divisible by 16.
    divisible = {"C", "stride_pm", "stride_tm"}
    for kernel, args, constants in _cases():
        names = kernel.arg_names
        signature = dict(args) | {name: "constexpr" for name in constants}
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, kind in signature.items()
                 if kind.startswith("*") or n in divisible}
        source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                           constexprs={(names.index(n),): v for n, v in constants.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        vector = len(re.findall(r"(?:ld|st)\.global\.v[24]", compiled.asm["ptx"]))
        spills = _local_bytes(cuobjdump, compiled.asm["cubin"])
        print(f"{kernel.__name__}: {vector} vector accesses, {spills} bytes of local memory")
        if (vector == 0 and constants.get("ALIGNED", True)) or spills:
            sys.exit(f"{kernel.__name__} {constants}: vector accesses {vector}, local {spills}")


def _local_bytes(cuobjdump: Path, cubin: bytes) -> int:
    """Local (spill) memory per thread of a cubin, from cuobjdump; 0 when it cannot tell."""
    if not cuobjdump.exists():
        return 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True,
                             text=True).stdout
    return sum(int(n) for n in re.findall(r"LOCAL:(\d+)", out))


def test_kernels_compile_for_hopper():
    pytest.importorskip("triton", reason="triton is not installed")
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    assert result.stdout.count("vector accesses") == 9, result.stdout


if __name__ == "__main__":
    main()
