"""make_targets: normalise each of the top-K teacher outputs, average them, normalise again, and
keep the masked rows.

Cases (bf16 teacher outputs, the data2vec base recipes of configs/base_*.yaml):
  audio base  K 8, B 8, T 500, C 768, instance norm per layer, no final norm, half the steps masked
  image base  K 6, B 16, T 196, C 768, layer norm per layer and after the average, 60% masked
  text base   K 10, B 8, T 512, C 768, layer norm per layer, no final norm, 15% masked
  image v2    data2vec 2.0 base: K 10, M 16 masked clones of each of B 16 samples, T 196, C 768,
              instance norm per layer, layer norm after the average, 80% of each clone masked
              (157 of 196 steps): mask [B*M, T], targets computed once per sample (repeat=M)
Essential bytes (the issue's bandwidth floor): two reads of every layer output plus the masked
fp32 rows written (of every clone).

Providers (all with repeat=M):
  reference      ops/reference.py
  torch_compile  torch.compile of the reference
  cpp            the C++ extension
  triton         the Triton kernel (CUDA only)
  fairseq        cases with clones only: data2vec 2.0's own formulation, the reference's [B, T, C]
                 targets, then y.repeat_interleave(M, 0)[mask] (a [B*M, T, C] copy first)

Usage: python benchmarks/bench_make_targets.py [--quick] [--providers cpp,reference]
"""

import torch
from harness import Case, Figure, Provider, Skip, main, op_providers

from d2v_engine.ops.reference import make_targets_ref


def _case(name: str, k: int, batch: int, steps: int, channels: int, layer_norm: str,
          final_norm: str, masked: float, repeat: int = 1) -> Case:
    per_row = round(steps * masked)  # the same count in every sequence, as the masking makes it
    element = torch.bfloat16.itemsize
    total = 2 * k * batch * steps * channels * element + batch * repeat * per_row * channels * 4

    def build(device):
        generator = torch.Generator().manual_seed(0)
        layers = [torch.randn(batch, steps, channels, generator=generator).to(device,
                                                                              torch.bfloat16)
                  for _ in range(k)]
        # One mask per clone, rows b*M + j for the clones j of sample b (repeat_interleave order).
        order = torch.rand(batch * repeat, steps, generator=generator).argsort(dim=1)
        mask = (order < per_row).to(device)
        return dict(layers=layers, mask=mask, layer_norm=layer_norm, final_norm=final_norm,
                    repeat=repeat)

    clones = f" M{repeat}" if repeat > 1 else ""
    label = f"{name} K{k}{clones} B{batch} T{steps} C{channels} {layer_norm}/{final_norm} " \
            f"{masked:.0%}"
    return Case(label, total, build)


def cases(quick: bool) -> list[Case]:
    if quick:
        return [_case("audio", 3, 2, 50, 64, "instance", "none", 0.5),
                _case("image_v2", 3, 2, 20, 64, "instance", "layer", 0.8, repeat=4)]
    return [_case("audio_base", 8, 8, 500, 768, "instance", "none", 0.5),
            _case("image_base", 6, 16, 196, 768, "layer", "layer", 0.6),
            _case("text_base", 10, 8, 512, 768, "layer", "none", 0.15),
            _case("image_v2_base", 10, 16, 196, 768, "instance", "layer", 0.8, repeat=16)]


def _call(fn, inputs):
    return lambda: fn(inputs["layers"], layer_norm=inputs["layer_norm"],
                      final_norm=inputs["final_norm"], mask=inputs["mask"],
                      repeat=inputs["repeat"])


def _fairseq(inputs):
    """data2vec 2.0's code: every sample's targets, repeated for its clones, then masked."""
    repeat = inputs["repeat"]
    if repeat == 1:
        raise Skip("a case without clones (the reference provider is this formulation)")

    def run():
        y = make_targets_ref(inputs["layers"], layer_norm=inputs["layer_norm"],
                             final_norm=inputs["final_norm"])
        return y.repeat_interleave(repeat, 0)[inputs["mask"]]
    return run


PROVIDERS = op_providers("make_targets", make_targets_ref, _call) + [Provider("fairseq", _fairseq)]

FIGURES = [  # the CPU targets
    Figure("audio_base", "cpp", "reference", at_least=5.0),
    Figure("audio_base", "cpp", "floor", at_most=2.0),
]

if __name__ == "__main__":
    main("make_targets", cases, PROVIDERS, description=__doc__.split("\n")[0],
         figures=FIGURES)
