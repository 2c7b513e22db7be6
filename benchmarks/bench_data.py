"""Data throughput of the two readers, in the same run: decoded and augmented images/s and audio s/s.

Cases (shards written to a temporary folder first):
- `fashion28`: Fashion-MNIST's 28x28 grey PNGs (from the `dataset-fashion-mnist` package when it is
  installed, else random ones), augmented for `image_debug` (28 px);
- `jpeg224`: 224x224 photo-like RGB JPEGs (quality 90), augmented for `image_base` (224 px);
- `audio`: 1-3 s clips, 16 kHz FLAC and one in four a 22.05 kHz WAV (resampled), `audio_debug`.

Providers: each reader (`torch`: DataLoader worker processes; `dali`: CPU pipeline threads, or the
GPU with --device cuda) at each worker/thread count. Two stages are timed:
- `augment`: read, check, decode, crop, flip/resample, normalise, stacked into a batch tensor (the
  readers' decoding path: `BatchStream.decoded`);
- `batches`: the whole stream the trainer sees, masks included (masks cost the same in both readers).
Every measurement is repeated `--reps` times with the providers interleaved, so a shared machine's
load falls on all of them alike; the median is reported with the 20%/80% quantiles and the 1-minute
load average. Rows are appended to `benchmarks/results/data.csv`; the issue's figure (DALI CPU >= 1.3x
the torch reader's images/s at the same thread count, both image cases) is checked and printed.
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import os
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, device_name, git_hash  # noqa: E402

from d2v_engine.config import load_config  # noqa: E402
from d2v_engine.data import build_loader  # noqa: E402
from d2v_engine.data.prepare import FASHION_DIR, read_idx  # noqa: E402
from d2v_engine.data.shards import ShardSetWriter  # noqa: E402
from d2v_engine.models.registry import get_spec  # noqa: E402

COLUMNS = ["timestamp", "git", "device", "case", "reader", "workers", "stage", "unit", "median",
           "q20", "q80", "cpu_ms", "reps", "batch_size", "vs_torch", "load_avg", "note"]
FIGURE = 1.3  # DALI CPU images/s over the torch reader's, same thread count (the figure)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def photo(rng: np.random.Generator, size: int) -> np.ndarray:
    """A photo-like uint8 [size, size, 3] image: smooth random waves plus sensor-like noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    waves = [sum(np.sin(2 * np.pi * (rng.uniform(0.5, 6) * x + rng.uniform(0.5, 6) * y) + rng.uniform(0, 6))
                 for _ in range(4)) for _ in range(3)]
    pixels = 127.5 + 30 * np.stack(waves, axis=-1) + rng.normal(0, 6, (size, size, 3))
    return pixels.clip(0, 255).astype(np.uint8)


def write_cases(root: Path, quick: bool) -> dict[str, tuple[str, Path]]:
    """case -> (model name, shard folder)."""
    rng = np.random.default_rng(0)
    n_small, n_jpeg, n_audio = (256, 96, 32) if quick else (4096, 768, 256)
    cases = {}
    fashion = FASHION_DIR / "train-images-idx3-ubyte.gz"
    grey = read_idx(fashion)[:n_small] if fashion.exists() else \
        rng.integers(0, 255, (n_small, 28, 28), np.uint8)
    with ShardSetWriter(root / "fashion28", modality="image", shard_size=1024) as w:
        for i, pixels in enumerate(grey):
            w.write(f"{i:06d}", png=_png(pixels))
    cases["fashion28"] = ("image_debug", root / "fashion28")
    with ShardSetWriter(root / "jpeg224", modality="image", shard_size=256) as w:
        for i in range(n_jpeg):
            buf = io.BytesIO()
            Image.fromarray(photo(rng, 224)).save(buf, format="JPEG", quality=90)
            w.write(f"{i:06d}", jpg=buf.getvalue())
    cases["jpeg224"] = ("image_base", root / "jpeg224")
    with ShardSetWriter(root / "audio", modality="audio", shard_size=128) as w:
        for i in range(n_audio):
            rate = 22050 if i % 4 == 3 else 16000
            t = np.arange(int(rng.uniform(1, 3) * rate)) / rate
            wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(len(t))
            buf = io.BytesIO()
            soundfile.write(buf, wave.astype(np.float32), rate, format="WAV" if rate != 16000 else "FLAC",
                            subtype="PCM_16")
            w.write(f"{i:06d}", **{"wav" if rate != 16000 else "flac": buf.getvalue()})
    cases["audio"] = ("audio_debug", root / "audio")
    return cases


def make_stream(model: str, path: Path, reader: str, workers: int, batch_size: int):
    cfg = load_config(None, [f"model.name={model}", f"data.path={path}", f"data.reader={reader}",
                             f"data.num_workers={workers}", f"train.batch_size={batch_size}",
                             "data.audio_batching=pad", "target.top_k=2"])
    return build_loader(cfg, get_spec(model))


def _amount(batch, modality: str) -> float:
    """Images in a batch, or seconds of audio (valid samples at 16 kHz)."""
    if modality == "image":
        return float(len(batch["index"]))
    return float((~batch["padding_mask"]).sum()) / 16000


def _augmented(stream, epoch: int):
    """The `augment` stage as batch dicts: decoded samples stacked into one tensor, no masks."""
    from d2v_engine.data.dali import DaliBatchStream
    from d2v_engine.data.dali_pipelines import to_torch

    # The torch reader's workers draw image masks while decoding; this stage times decoding alone.
    stream.batcher.worker_masks = False
    for step in stream.decoded(epoch):
        if step.samples is None:
            return
        if isinstance(stream, DaliBatchStream):
            data = to_torch(step.samples[0])
            lengths = to_torch(step.samples[1]).reshape(-1) if stream.modality == "audio" else None
        else:
            data = torch.stack(step.samples) if stream.modality == "image" else None
            lengths = torch.tensor([len(w) for w in step.samples]) if stream.modality == "audio" else None
        size = int(lengths.max()) if lengths is not None else 0
        pad = torch.arange(size)[None, :] >= lengths[:, None] if lengths is not None else None
        yield {"index": torch.tensor(step.index), "images": data, "padding_mask": pad}


def _cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished children (DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def measure(stream, stage: str, batches: int, epoch: int, warmup: int) -> tuple[float, float]:
    """Throughput over `batches` batches after `warmup` untimed ones (start-up, caches), and the CPU
    milliseconds spent per item, workers and DALI threads included (start-up and prefetch too: the
    CPU figure is a little high for both readers, and unlike the throughput, hardly moved by what
    else runs on the machine).

    Returns:
        (images/s or audio s/s, CPU ms per image or per audio second).
    """
    cpu = _cpu_seconds()
    source = _augmented(stream, epoch) if stage == "augment" else stream
    it = iter(source)
    for _ in range(warmup):
        next(it)
    total, start = 0.0, time.perf_counter()
    for batch in itertools.islice(it, batches):
        total += _amount(batch, stream.modality)
    elapsed = time.perf_counter() - start
    if stage == "augment":
        it.close()
        stream.batcher.worker_masks = True
    else:
        stream.close()
    cpu = _cpu_seconds() - cpu  # the workers have exited: their time is in RUSAGE_CHILDREN now
    return total / elapsed, 1000 * cpu / (total * (batches + warmup) / batches)


def run(cases: dict, workers: list[int], reps: int, batch_size: dict[str, int], quick: bool) -> list[dict]:
    """Every (case, stage, reader, workers), repeated `reps` times with the providers interleaved."""
    rows = []
    for case, (model, path) in cases.items():
        modality = get_spec(model).modality
        providers = [(reader, w) for w in workers for reader in ("torch", "dali")]
        streams = {p: make_stream(model, path, p[0], p[1], batch_size[modality]) for p in providers}
        per_epoch = min(s.batches_per_epoch for s in streams.values())
        warmup = 1 if per_epoch < 8 else 2
        batches = max(1, min(per_epoch - warmup, 8 if quick else 40))
        for stage in ("augment", "batches"):
            samples = {p: [] for p in providers}
            cpu = {p: [] for p in providers}
            loads = []
            for rep in range(reps):
                for p in providers:
                    rate, cpu_ms = measure(streams[p], stage, batches, epoch=rep, warmup=warmup)
                    samples[p].append(rate)
                    cpu[p].append(cpu_ms)
                loads.append(os.getloadavg()[0])
            rows += _rows(case, stage, modality, samples, cpu, batch_size[modality], statistics.median(loads))
        for s in streams.values():
            s.close()
    return rows


def _rows(case: str, stage: str, modality: str, samples: dict, cpu: dict, batch_size: int,
          load: float) -> list[dict]:
    rows = []
    for (reader, workers), values in samples.items():
        q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
        rows.append(dict(case=case, reader=reader, workers=workers, stage=stage,
                         unit="images/s" if modality == "image" else "audio s/s",
                         median=round(statistics.median(values), 1), q20=round(q[1], 1), q80=round(q[7], 1),
                         cpu_ms=round(statistics.median(cpu[reader, workers]), 3), reps=len(values),
                         batch_size=batch_size, load_avg=round(load, 2), note=""))
    for row in rows:
        torch_row = next(r for r in rows if r["reader"] == "torch" and r["workers"] == row["workers"])
        row["vs_torch"] = round(row["median"] / torch_row["median"], 2)
    return rows


def check_figure(rows: list[dict]) -> list[str]:
    """The issue's CPU figure: DALI augment >= 1.3x torch at the same thread count, both image cases."""
    lines = []
    for row in rows:
        if row["reader"] == "dali" and row["stage"] == "augment" and row["case"] != "audio":
            met = row["vs_torch"] >= FIGURE
            lines.append(f"{'met' if met else 'NOT MET'}: {row['case']} dali {row['workers']} thread(s) "
                         f"{row['median']:.0f} images/s = {row['vs_torch']:.2f}x torch, target >= {FIGURE}x")
    for line in lines:
        print(line)
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description="data reader throughput (torch vs dali)")
    parser.add_argument("--quick", action="store_true", help="tiny sets, 2 reps, nothing saved "
                        "unless --results-dir is given")
    parser.add_argument("--workers", default="1,2", help="worker processes / DALI threads to compare")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per provider")
    parser.add_argument("--cases", default="fashion28,jpeg224,audio")
    parser.add_argument("--results-dir", type=Path, default=None, help=f"default {RESULTS}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the main process only stacks and masks; decoding has its own threads
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        cases = {k: v for k, v in write_cases(Path(tmp), args.quick).items() if k in args.cases.split(",")}
        rows = run(cases, workers, 2 if args.quick else args.reps,
                   {"image": 32, "audio": 8 if args.quick else 16}, args.quick)
    context = dict(timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"), git=git_hash(),
                   device=f"{device_name(torch.device('cpu')).rsplit(',', 1)[0]}, {os.cpu_count()} cores")
    rows = [dict(context, **row) for row in rows]
    _print(rows)
    if not args.quick:
        check_figure(rows)
    results = args.results_dir if args.results_dir or args.quick else RESULTS
    if results is not None:
        _save(rows, results / "data.csv")
    return rows


def _print(rows: list[dict]) -> None:
    print(f"device: {rows[0]['device']}, git {rows[0]['git']}, load average {rows[0]['load_avg']}")
    print(f"{'case':<10} {'stage':<8} {'reader':<6} {'workers':>7} {'median':>10} {'q20-q80':>17} "
          f"{'unit':<10} {'x torch':>7} {'cpu ms':>7} {'load':>5}")
    for r in rows:
        print(f"{r['case']:<10} {r['stage']:<8} {r['reader']:<6} {r['workers']:>7} {r['median']:>10.1f} "
              f"{r['q20']:>8.1f}-{r['q80']:<8.1f} {r['unit']:<10} {r['vs_torch']:>7.2f} {r['cpu_ms']:>7.3f} "
              f"{r['load_avg']:>5}")


def _save(rows: list[dict], path: Path) -> None:
    """Append `rows` to the CSV; a file with other columns is rewritten with these (blanks added)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = list(csv.DictReader(path.open())) if path.exists() else []
    same = path.exists() and path.open().readline().strip() == ",".join(COLUMNS)
    with path.open("a" if same else "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, restval="", extrasaction="ignore")
        if not same:
            writer.writeheader()
            writer.writerows(old)
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
