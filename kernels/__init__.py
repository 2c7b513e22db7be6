"""Triton GPU kernels for the fused ops, installed as `d2v_engine.kernels` (one op per file).

Empty until the fused-kernel work lands: `d2v_engine.ops` dispatches to the reference backend.
"""
