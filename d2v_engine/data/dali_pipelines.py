"""The DALI pipelines of the `dali` reader: one graph per modality, built on CPU or GPU.

Each pipeline takes its inputs from one `fn.external_source` with several outputs, fed by the
reader with a batch of encoded files plus the per-sample geometry that the reader draws from
(seed, epoch, sample index):

- image: encoded JPEG/PNG/WebP, crop box (top, left), (height, width) in pixels and a flip flag ->
  decode of the box only (`device="mixed"`: nvJPEG on the GPU; `"cpu"` without a device id) ->
  resize to size x size (bicubic, antialiased) -> flip, normalise to float32 [3, size, size];
- audio: encoded WAV/FLAC/Ogg, window start and length in samples -> decode, downmix to mono,
  resample to the model's rate (DALI's audio decoder, on the CPU) -> on the GPU when there is one:
  crop to the window, zero mean and unit variance, zero-pad to the batch's longest.

The pipeline's outputs become torch tensors on the pipeline's device (`to_torch`).
"""
from __future__ import annotations

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.tensors import TensorListGPU

_AUDIO_EPS = 1e-5  # added to the variance, as `transforms.normalize_audio` does

INPUTS = {"image": (types.UINT8, types.FLOAT, types.FLOAT, types.INT32),
          "audio": (types.UINT8, types.FLOAT, types.FLOAT)}
"""The pipeline inputs' types: encoded files, then the per-sample geometry (see the graphs)."""


def image_graph(encoded, anchor, shape, mirror, *, size: int, mean, std, gpu: bool):
    """Decode the crop box of each image, resize it, flip it or not, normalise (DALI graph nodes).

    Args:
        encoded: uint8 [bytes] per sample.
        anchor, shape: float32 [2] per sample: the box's (top, left) and (height, width) in pixels;
            only the box is decoded where the format allows (JPEG).
        mirror: int32 [] per sample: 1 = flip horizontally.
        size: output height and width.
        mean, std: per-channel normalisation of pixels scaled to [0, 1].
        gpu: decode with nvJPEG (`mixed`) and augment on the GPU.
    Returns:
        float32 [3, size, size] per sample.
    """
    images = fn.decoders.image_slice(encoded, anchor, shape, axes=[0, 1], normalized_anchor=False,
                                     normalized_shape=False, device="mixed" if gpu else "cpu",
                                     output_type=types.RGB,
                                     adjust_orientation=False)  # PIL (the `torch` reader) ignores EXIF too
    images = fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
    return fn.crop_mirror_normalize(images, mirror=mirror, mean=[255 * m for m in mean],
                                    std=[255 * s for s in std], output_layout="CHW", dtype=types.FLOAT)


def audio_graph(encoded, start, length, *, sample_rate: int, gpu: bool):
    """Decode, resample, crop, normalise and pad a batch of clips (DALI graph nodes).

    Args:
        encoded: uint8 [bytes] per sample.
        start, length: float32 [1] per sample: the window to keep, in samples at `sample_rate`.
        sample_rate: the model's rate in Hz.
        gpu: move the decoded clips to the GPU for the rest.
    Returns:
        (audio float32 [S] per sample, zero-padded to the batch's longest window;
         lengths int64 [1] per sample: the valid samples of each row).
    """
    audio, _ = fn.decoders.audio(encoded, dtype=types.FLOAT, downmix=True, sample_rate=sample_rate)
    if gpu:
        audio = audio.gpu()
    audio = fn.slice(audio, start, length, axes=[0], normalized_anchor=False, normalized_shape=False,
                     out_of_bounds_policy="trim_to_shape")
    audio = fn.normalize(audio, axes=[0], epsilon=_AUDIO_EPS)
    lengths = audio.shape(dtype=types.INT64)
    return fn.pad(audio, axes=[0], fill_value=0.0), lengths


def build_pipeline(modality: str, *, source, batch_size: int, num_threads: int,
                   device_id: int | None, seed: int, streaming: bool, **graph_args):
    """A built DALI pipeline for `modality` ("image" or "audio").

    Args:
        source: a callable returning the next batch's inputs as a tuple of per-sample lists
            (streaming), or None: inputs are then fed by name ("input0", "input1", ...) to `run`.
        batch_size: most samples per batch.
        num_threads: CPU threads of the pipeline.
        device_id: CUDA device for `mixed`/GPU operators, or None for a CPU-only pipeline.
        seed: the pipeline's seed (no operator here draws from it; every draw is the reader's).
        streaming: prefetch two batches ahead; otherwise run one batch at a time (probing).
        graph_args: `image_graph` / `audio_graph` keyword arguments other than `gpu`.
    Returns:
        The built `Pipeline`.
    """
    gpu = device_id is not None
    graph = image_graph if modality == "image" else audio_graph
    dtypes = INPUTS[modality]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2 if streaming else 1, exec_pipelined=streaming,
                  exec_async=streaming)
    def pipeline():
        ndim = [1 if d != types.INT32 else 0 for d in dtypes]
        if source is not None:
            inputs = fn.external_source(source=source, num_outputs=len(dtypes), batch=True,
                                        dtype=list(dtypes), ndim=ndim)
        else:
            inputs = [fn.external_source(name=f"input{k}", dtype=d, ndim=n)
                      for k, (d, n) in enumerate(zip(dtypes, ndim))]
        return graph(*inputs, gpu=gpu, **graph_args)

    pipe = pipeline()
    pipe.build()
    return pipe


def to_torch(batch) -> torch.Tensor:
    """A dense DALI `TensorList` (CPU or GPU) as a torch tensor on the same device (a copy)."""
    if isinstance(batch, TensorListGPU):
        from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

        return to_torch_tensor(batch.as_tensor(), copy=True)
    return torch.from_numpy(np.ascontiguousarray(batch.as_array()))
