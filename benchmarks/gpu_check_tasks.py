"""The small jobs of `gpu_check.py` that run in their own process: imports, ceilings, synthetic shards.

    python benchmarks/gpu_check_tasks.py imports  OUT.json [--gpu]   what imports, with versions
    python benchmarks/gpu_check_tasks.py ceilings OUT.json [--smoke] copy bandwidth, matmul rate
    python benchmarks/gpu_check_tasks.py shards MODALITY DIR [--smoke]  profile data

A GPU machine has no data sets, so the profiles read synthetic shards written here: 224x224 JPEGs
of smooth random pictures (the cost of decoding a photo, not of noise), 3-5 s FLAC clips of tones
and noise, and documents of a few hundred pseudo-words with a BPE tokenizer trained on them. Smoke
mode writes the debug models' sizes (32x32 images, short clips and texts).
"""
from __future__ import annotations

import argparse
import importlib
import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# Every module a stage imports; a missing one fails the setup stage with its name.
REQUIRED = ("numpy", "torch", "triton", "deepspeed", "webdataset", "soundfile", "PIL", "yaml", "tokenizers",
            "matplotlib", "pytest", "d2v_engine.ops", "d2v_engine.kernels")


def check_imports(out: Path, gpu: bool) -> int:
    """Import every REQUIRED module; write their versions (and the GPU's name) to `out`.

    Returns:
        0, or 1 when a module does not import or (with `gpu`) CUDA is not usable.
    """
    versions, missing = {}, []
    for name in REQUIRED:
        try:
            module = importlib.import_module(name)
        except Exception as error:  # noqa: BLE001  (any import failure is reported with its reason)
            missing.append(f"{name} ({type(error).__name__}: {str(error)[:160]})")
            continue
        versions[name] = str(getattr(module, "__version__", ""))
    record = {"versions": versions, "missing": missing, "python": sys.version.split()[0]}
    if "torch" in versions:
        import torch

        record |= {"cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
        if torch.cuda.is_available():
            record |= {"gpu": torch.cuda.get_device_name(0),
                       "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
        elif gpu:
            missing.append("torch.cuda (torch sees no CUDA device)")
    out.write_text(json.dumps(record, indent=2) + "\n")
    for line in missing:
        print(f"cannot import {line}")
    return 1 if missing else 0


def measure_ceilings(out: Path, smoke: bool) -> int:
    """The two ceilings of this run: device-to-device copy GB/s and the matmul TFLOP/s (bf16 on a GPU)."""
    import torch
    from harness import copy_bandwidth, device_name

    from d2v_engine.flops import measure_matmul_peak

    device = torch.device("cpu" if smoke else "cuda")
    dtype, n = (torch.float32, 256) if smoke else (torch.bfloat16, 8192)
    copy_gbps = copy_bandwidth(device, (32 if smoke else 1024) * 2**20)
    flops = measure_matmul_peak(device, dtype, n=n)
    record = {"device": device_name(device), "copy_gbps": copy_gbps,
              "copy_bytes": (32 if smoke else 1024) * 2**20,
              "matmul_flops": flops, "matmul_dtype": str(dtype).removeprefix("torch."),
              "matmul_n": n}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"copy {copy_gbps:.1f} GB/s, {record['matmul_dtype']} matmul {n}^3 {flops / 1e12:.2f} TFLOP/s "
          f"on {record['device']}")
    return 0


def smooth_picture(rng: np.random.Generator, size: int) -> bytes:
    """A JPEG of a random 8x8 colour field upsampled to size x size, plus a little noise."""
    import numpy as np
    from PIL import Image

    coarse = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tone_clip(rng: np.random.Generator, seconds: float, rate: int = 16000) -> bytes:
    """A FLAC clip: two random tones plus noise."""
    import numpy as np
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    wave = sum(0.2 * np.sin(2 * np.pi * rng.uniform(80, 900) * t) for _ in range(2))
    wave = wave + 0.05 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    soundfile.write(buf, wave.astype(np.float32), rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def write_shards(modality: str, folder: Path, smoke: bool) -> Path:
    """Synthetic shards of `modality` in `folder` (a text set gets tokenizer.json one folder up)."""
    import numpy as np

    from d2v_engine.data.prepare_text import train_tokenizer
    from d2v_engine.data.shards import ShardSetWriter

    rng = np.random.default_rng(0)
    count = {"image": 64 if smoke else 512, "audio": 16 if smoke else 64, "text": 32 if smoke else 128}
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(2, 9))))
             for _ in range(2000)]
    texts = []
    with ShardSetWriter(folder, modality=modality, shard_size=64) as writer:
        for i in range(count[modality]):
            key, label = f"{i:06d}", i % 10
            if modality == "image":
                writer.write(key, jpg=smooth_picture(rng, 32 if smoke else 224), cls=label)
            elif modality == "audio":
                writer.write(key, flac=tone_clip(rng, rng.uniform(0.5, 1.0) if smoke else rng.uniform(3, 5)),
                             cls=label)
            else:
                length = int(rng.integers(10, 30) if smoke else rng.integers(250, 450))
                texts.append(" ".join(rng.choice(words, length)))
                writer.write(key, txt=texts[-1], cls=label)
    if modality == "text":
        train_tokenizer(texts, folder.parent / "tokenizer.json", vocab_size=300 if smoke else 2000)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="task", required=True)
    p = sub.add_parser("imports")
    p.add_argument("out", type=Path)
    p.add_argument("--gpu", action="store_true", help="also require a CUDA device")
    p = sub.add_parser("ceilings")
    p.add_argument("out", type=Path)
    p.add_argument("--smoke", action="store_true")
    p = sub.add_parser("shards")
    p.add_argument("modality", choices=["image", "audio", "text"])
    p.add_argument("folder", type=Path)
    p.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.task == "imports":
        return check_imports(args.out, args.gpu)
    if args.task == "ceilings":
        return measure_ceilings(args.out, args.smoke)
    print(f"wrote {write_shards(args.modality, args.folder, args.smoke)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
