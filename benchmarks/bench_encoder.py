"""The image encoder's forward + backward against `transformers`' Data2VecVisionModel with the same
weights, and the attention paths it can take, on this machine.

    .venv/bin/python benchmarks/bench_encoder.py [--quick] [--out benchmarks/results/encoder]

Encoder cases: `image_small` (the default recipe's model) at batch 64 and `image_base` (ViT-B/16)
at batch 8, fp32 and bf16 weights and inputs, training mode, no dropout. Ours is
`build_encoder(get_spec(model))`; theirs is `d2v_engine.hf.to_hf` of it (the same weights, the
converter the interop tests check to 1e-5), with its default attention implementation. Each
repetition times ours, then theirs (interleaved, so that drift of the machine falls on both);
the median of `--reps` repetitions is reported, with ours/theirs as a speed-up.

Attention cases: [B, H, T, 64] heads with an additive [1, H, T, T] bias (the relative position
bias) at the same two shapes, forward and forward + backward, for `F.scaled_dot_product_attention`
(its fused CPU kernel and its math fallback) and for the engine's `encoder.attend`.

Writes <out>/encoder.csv and <out>/attention.csv (one row per case and provider, with the CPU,
threads and commit). This folder is scripts only: nothing in the installed package imports it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import append_csv, device_name, git_hash  # noqa: E402

from d2v_engine.models.encoder import attend  # noqa: E402
from d2v_engine.models.registry import build_encoder, get_spec  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = (("image_small", 64), ("image_base", 8))


def _seconds(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def encoder_rows(model: str, batch: int, dtype: str, reps: int) -> list[dict]:
    from d2v_engine.hf import to_hf
    from d2v_engine.hf.commands import quiet_transformers

    quiet_transformers()
    spec = get_spec(model)
    torch.manual_seed(0)
    ours = build_encoder(spec).train()
    theirs = to_hf(ours).train()
    ours, theirs = ours.to(DTYPES[dtype]), theirs.to(DTYPES[dtype])
    x = torch.randn(batch, 3, spec.image_size, spec.image_size, dtype=DTYPES[dtype])

    def step_ours():
        ours(x).x.float().sum().backward()

    def step_theirs():
        theirs(pixel_values=x).last_hidden_state.float().sum().backward()

    for fn in (step_ours, step_theirs):   # warm-up: allocator, oneDNN primitives
        fn()
        fn()
    times = {"ours": [], "transformers": []}
    for _ in range(reps):
        times["ours"] += _seconds(step_ours, 1)
        times["transformers"] += _seconds(step_theirs, 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    impl = getattr(theirs.config, "_attn_implementation", "?")
    return [{"case": f"{model} b{batch}", "dtype": dtype, "provider": k, "ms": round(1e3 * v, 2),
             "speedup_vs_transformers": round(med["transformers"] / v, 3), "reps": reps,
             "hf_attention": impl} for k, v in med.items()]


def attention_rows(B: int, H: int, T: int, dtype: str, reps: int) -> list[dict]:
    dt = DTYPES[dtype]
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, 64, dtype=dt) for _ in range(3))
    bias = torch.randn(1, H, T, T, dtype=dt)
    providers = {
        "sdpa fused": lambda q, k, v: _sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, bias),
        "sdpa math": lambda q, k, v: _sdpa(SDPBackend.MATH, q, k, v, bias),
        "engine attend": lambda q, k, v: attend(q, k, v, bias, 0.0),
    }
    rows = []
    for name, fn in providers.items():
        grads = [t.clone().requires_grad_() for t in (q, k, v)]

        def fwd():
            with torch.no_grad():
                fn(q, k, v)

        def fwd_bwd():
            fn(*grads).float().sum().backward()

        for f in (fwd, fwd_bwd):
            f()
        rows.append({"case": f"B{B} H{H} T{T} D64", "dtype": dtype, "provider": name,
                     "fwd_ms": round(1e3 * statistics.median(_seconds(fwd, reps)), 3),
                     "fwd_bwd_ms": round(1e3 * statistics.median(_seconds(fwd_bwd, reps)), 3)})
    return rows


def _sdpa(backend, q, k, v, bias):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="image_small only, 3 repetitions")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/encoder")
    args = ap.parse_args()
    reps = 3 if args.quick else args.reps
    cases = CASES[:1] if args.quick else CASES
    stamp = {"device": device_name(torch.device("cpu")), "commit": git_hash()}
    out = Path(args.out)
    attention = []
    for model, batch in cases:
        spec = get_spec(model)
        T = (spec.image_size // spec.patch_size) ** 2 + 1
        for dtype in DTYPES:
            attention += [stamp | r for r in attention_rows(batch, spec.transformer.heads, T, dtype, 5 * reps)]
    for r in attention:
        print(f"attention {r['case']:18s} {r['dtype']}  {r['provider']:14s} fwd {r['fwd_ms']:7.2f} ms  "
              f"fwd+bwd {r['fwd_bwd_ms']:7.2f} ms", flush=True)
    encoder = []
    for model, batch in cases:
        for dtype in DTYPES:
            rows = encoder_rows(model, batch, dtype, reps)
            encoder += [stamp | r for r in rows]
            for r in rows:
                print(f"encoder {r['case']:16s} {dtype}  {r['provider']:13s} {r['ms']:8.1f} ms  "
                      f"{r['speedup_vs_transformers']:.2f}x transformers (theirs: {r['hf_attention']})",
                      flush=True)
    for name, rows in (("attention", attention), ("encoder", encoder)):
        path = out / f"{name}.csv"
        path.unlink(missing_ok=True)
        append_csv(path, rows, list(rows[0]))
    print(f"wrote {out}/attention.csv, {out}/encoder.csv ({stamp['device']})")


if __name__ == "__main__":
    main()
