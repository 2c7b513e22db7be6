"""Triton GPU kernels for the fused ops, installed as `d2v_engine.kernels` (one op per file).

    ema_update.py       multi-tensor EMA update (+ compute-dtype shadow) in one launch
    make_targets.py     per-layer norm, average over K, final norm, masked rows
    regression_loss.py  smooth L1 / squared error with the gradient from the forward pass

Nothing is imported here: importing a kernel module imports triton, which fixes whether kernels
compile for a GPU or run in the CPU interpreter (TRITON_INTERPRET=1). Call them through
`d2v_engine.ops` (backend "triton" or "auto"); grids and memory traffic are in README.md.
"""
