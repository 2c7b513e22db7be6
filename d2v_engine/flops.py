"""Model FLOPs of a data2vec training step and the device's peak, for MFU (`d2v profile`).

The count covers matrix multiplications (and convolutions) only, 2 FLOPs per multiply-add, on the
batch shapes as run (padded lengths included):

    per block, T tokens, width C, FFN width F:  8 T C^2 (q, k, v, out projections)
                                              + 4 T C F (the two FFN matrices)
                                              + 4 T^2 C (Q K^T and attention x V)
    front-ends:  image  2 N (3 p^2) C (patch embedding; T = N patches + CLS)
                 audio  sum over CNN layers of 2 T_l C_in k C_out, + 2 T C_conv C (projection)
                        + depth_pos 2 T (C / groups) k_pos C (convolutional positions)
                 text   0 (embedding lookups)
    student head on the M masked positions:  linear 2 M C^2, mlp 8 M C^2

    training FLOPs per sample = 3 x student forward (forward + backward at twice the forward)
                              + teacher forward (no backward; audio: no CNN, it shares the student's)

data2vec 2.0 (`step_flops_per_sample_v2`), M masked copies per sample, V visible tokens per copy:

    student  front-end once per sample (audio: + the position convolution on each copy's T frames)
             + M x blocks on V tokens (images: + CLS)
             + M x decoder on T steps: per conv block 2 T (C_in / groups) k^d C_out (d = 1, images 2),
               + the projection (2 T C_dec C, text: two layers through the hidden width)
    teacher  as 1.0: front-end + blocks on all T tokens, once per sample

Norms, softmax, GELU, the target construction, the loss and the optimizer are left out: they are
memory-bound and a few percent of the total, which is the convention of MFU (PaLM, nanoGPT).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from d2v_engine.models.spec import ModelSpec

# Dense peak TFLOP/s by device-name fragment (first match wins): (bf16, fp32, tf32), from the
# vendors' data sheets, without sparsity. Plain fp32 matmuls in PyTorch do not use TF32 unless
# torch.set_float32_matmul_precision("high"/"medium") allows it.
GPU_PEAKS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("H100 PCIe", (756.0, 51.2, 378.0)),
    ("H100 NVL", (835.0, 60.0, 418.0)),
    ("H100", (989.4, 66.9, 494.7)),        # SXM ("H100 80GB HBM3")
    ("H200", (989.4, 66.9, 494.7)),        # and GH200
    ("H800", (989.4, 66.9, 494.7)),
    ("A100", (312.0, 19.5, 156.0)),
    ("A800", (312.0, 19.5, 156.0)),
    ("L40S", (362.1, 91.6, 183.0)),
    ("L4", (121.0, 30.3, 60.0)),
    ("A10", (125.0, 31.2, 62.5)),
    ("RTX 4090", (165.2, 82.6, 82.6)),
    ("V100", (0.0, 15.7, 0.0)),            # no bf16 tensor cores
)


@dataclass
class Peak:
    """A device's peak matmul throughput."""

    flops: float
    """FLOP/s."""
    source: str
    """Where the number comes from, for the report."""


def block_flops(spec: ModelSpec, tokens: float) -> float:
    """Forward matmul FLOPs of all Transformer blocks for one sample of `tokens` positions."""
    t = spec.transformer
    c = t.dim
    return t.depth * (8 * tokens * c * c + 4 * tokens * c * t.ffn_dim + 4 * tokens * tokens * c)


def audio_cnn_flops(spec: ModelSpec, samples: float) -> tuple[float, float]:
    """(CNN + projection forward FLOPs, frames T) of one clip of `samples` waveform samples."""
    flops, length, c_in = 0.0, float(samples), 1
    for c_out, kernel, stride in spec.conv_layers:
        length = (length - kernel) // stride + 1
        flops += 2 * length * c_in * kernel * c_out
        c_in = c_out
    return flops + 2 * length * c_in * spec.transformer.dim, length


def step_flops_per_sample(spec: ModelSpec, batch: dict[str, Tensor]) -> float:
    """Training matmul FLOPs per sample of one batch (see the module docstring for the count).

    Args:
        spec: the model spec.
        batch: a collate batch (`images` [B, 3, H, W] | `audio` [B, S] | `tokens` [B, T], `mask` [B, T]).
    Returns:
        FLOPs per sample: 3 x student forward + teacher forward.
    """
    c = spec.transformer.dim
    bsz = batch["mask"].shape[0]
    masked = float(batch["mask"].sum()) / bsz
    head = (2 if spec.head == "linear" else 8) * masked * c * c
    if spec.modality == "image":
        patches = (spec.image_size // spec.patch_size) ** 2
        tokens = patches + 1
        front = 2 * patches * spec.in_chans * spec.patch_size ** 2 * c
        teacher_front = front
    elif spec.modality == "audio":
        cnn, tokens = audio_cnn_flops(spec, batch["audio"].shape[1])
        teacher_front = spec.pos_conv_depth * 2 * tokens * (c / spec.pos_conv_groups) * spec.pos_conv_kernel * c
        front = cnn + teacher_front
    else:
        tokens = float(batch["tokens"].shape[1])
        front = teacher_front = 0.0
    blocks = block_flops(spec, tokens)
    return 3 * (front + blocks + head) + (teacher_front + blocks)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    """Best FLOP/s of an n x n x n `torch.mm` on `device` over `reps` timed runs (after one warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first run warms up caches and the BLAS threads
            best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def device_peak(device: torch.device, dtype: torch.dtype) -> Peak:
    """The peak to divide by: a GPU's data-sheet figure, else a `torch.mm` measured now.

    Args:
        device: the training device.
        dtype: the training dtype (bf16 or fp32).
    Returns:
        Peak(FLOP/s, description).
    """
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    kind = "bf16" if dtype == torch.bfloat16 else "fp32"
    if device.type == "cuda":
        tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
        for fragment, (bf16, fp32, tf32_peak) in GPU_PEAKS:
            value = bf16 if kind == "bf16" else (tf32_peak if tf32 else fp32)
            if fragment in name and value > 0:
                label = "tf32" if tf32 else kind
                return Peak(value * 1e12, f"{label} data-sheet peak of {fragment}")
    n = 1024 if device.type == "cpu" else 8192
    flops = measure_matmul_peak(device, dtype, n=n)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return Peak(flops, f"{kind} torch.mm {n}^3 measured in this run on {name}{threads}")


def decoder_flops(decoder, steps: float) -> float:
    """Forward FLOPs of a `ConvDecoder` over `steps` positions of one copy."""
    flops = 0.0
    for block in decoder.blocks:
        conv = block.conv
        kernel = 1
        for k in conv.kernel_size:
            kernel *= k
        flops += 2 * steps * (conv.in_channels / conv.groups) * kernel * conv.out_channels
    for m in decoder.modules():
        if isinstance(m, torch.nn.Linear):
            flops += 2 * steps * m.in_features * m.out_features
    return flops


def step_flops_per_sample_v2(spec: ModelSpec, decoder, batch: dict[str, Tensor]) -> float:
    """Training matmul FLOPs per sample of one data2vec 2.0 batch (module docstring).

    Args:
        spec: the model spec.
        decoder: the student's `ConvDecoder`.
        batch: a collate batch (`mask` [B, M, T]; audio `audio`, text `padding_mask` [B, T]).
    Returns:
        FLOPs per sample (all M copies): 3 x student forward + teacher forward.
    """
    c = spec.transformer.dim
    bsz, clones, steps = batch["mask"].shape
    hidden = batch["mask"]
    if spec.modality == "text":
        hidden = hidden | batch["padding_mask"][:, None, :]
    # The student runs at the longest copy's visible length (shorter copies are padded to it).
    visible = float((~hidden).sum(-1).max())
    if spec.modality == "image":
        patches = (spec.image_size // spec.patch_size) ** 2
        front = teacher_front = 2 * patches * spec.in_chans * spec.patch_size ** 2 * c
        tokens, visible = patches + 1, visible + 1
    elif spec.modality == "audio":
        cnn, tokens = audio_cnn_flops(spec, batch["audio"].shape[1])
        teacher_front = spec.pos_conv_depth * 2 * tokens * (c / spec.pos_conv_groups) * spec.pos_conv_kernel * c
        front = cnn + clones * teacher_front
    else:
        tokens = float(steps)
        front = teacher_front = 0.0
    student = front + clones * (block_flops(spec, visible) + decoder_flops(decoder, steps))
    return 3 * student + (teacher_front + block_flops(spec, tokens))
