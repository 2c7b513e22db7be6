"""make_targets: normalise each of the top-K teacher outputs, average them, normalise again, and
keep the masked rows.

Cases (bf16 teacher outputs, the data2vec base recipes of configs/base_*.yaml):
  audio base  K 8, B 8, T 500, C 768, instance norm per layer, no final norm, half the steps masked
  image base  K 6, B 16, T 196, C 768, layer norm per layer and after the average, 60% masked
  text base   K 10, B 8, T 512, C 768, layer norm per layer, no final norm, 15% masked
Essential bytes (the issue's bandwidth floor): two reads of every layer output plus the masked
fp32 rows written.

Providers:
  reference      ops/reference.py
  torch_compile  torch.compile of the reference
  cpp            the C++ extension
  triton         the Triton kernel (CUDA only)

Usage: python benchmarks/bench_make_targets.py [--quick] [--providers cpp,reference]
"""

import torch
from harness import Case, Figure, main, op_providers

from d2v_engine.ops.reference import make_targets_ref


def _case(name: str, k: int, batch: int, steps: int, channels: int, layer_norm: str,
          final_norm: str, masked: float) -> Case:
    per_row = round(steps * masked)  # the same count in every sequence, as the masking makes it
    element = torch.bfloat16.itemsize
    total = 2 * k * batch * steps * channels * element + batch * per_row * channels * 4

    def build(device):
        generator = torch.Generator().manual_seed(0)
        layers = [torch.randn(batch, steps, channels, generator=generator).to(device,
                                                                              torch.bfloat16)
                  for _ in range(k)]
        order = torch.rand(batch, steps, generator=generator).argsort(dim=1)
        mask = (order < per_row).to(device)
        return dict(layers=layers, mask=mask, layer_norm=layer_norm, final_norm=final_norm)

    label = f"{name} K{k} B{batch} T{steps} C{channels} {layer_norm}/{final_norm} {masked:.0%}"
    return Case(label, total, build)


def cases(quick: bool) -> list[Case]:
    if quick:
        return [_case("audio", 3, 2, 50, 64, "instance", "none", 0.5)]
    return [_case("audio_base", 8, 8, 500, 768, "instance", "none", 0.5),
            _case("image_base", 6, 16, 196, 768, "layer", "layer", 0.6),
            _case("text_base", 10, 8, 512, 768, "layer", "none", 0.15)]


def _call(fn, inputs):
    return lambda: fn(inputs["layers"], layer_norm=inputs["layer_norm"],
                      final_norm=inputs["final_norm"], mask=inputs["mask"])


PROVIDERS = op_providers("make_targets", make_targets_ref, _call)

FIGURES = [  # the CPU targets
    Figure("audio_base", "cpp", "reference", at_least=5.0),
    Figure("audio_base", "cpp", "floor", at_most=2.0),
]

if __name__ == "__main__":
    main("make_targets", cases, PROVIDERS, description=__doc__.split("\n")[0],
         figures=FIGURES)
