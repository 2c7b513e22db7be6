"""fp32 -> low-precision stores that round the same way on a GPU and in the Triton interpreter.

A GPU converts fp32 to bf16 by rounding to nearest even (one instruction); Triton's CPU interpreter
truncates instead, so a kernel tested there would disagree with PyTorch by up to one bf16 step. The
bf16 conversion is therefore written out with integer operations (round to nearest even on the
bit pattern, NaN kept NaN): a handful of ALU operations per element, free in memory-bound kernels,
and the same bits everywhere. Other dtypes use the plain cast (the interpreter rounds those right).
"""
import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """x (fp32) converted to `dtype`, rounding to nearest even."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        # Adding 0x7FFF plus the lowest kept bit carries into the kept half exactly when the
        # dropped half is above one half, or equal to it with an odd kept half.
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # NaN: keep the top bits and set the quiet bit (the carry could turn it into -0 or inf).
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
