"""ema_update_ over a whole model's parameter list: ema <- decay * ema + (1 - decay) * student,
and the teacher's compute-dtype shadow written from it.

Cases: the real ViT-B (`image_base`) and text-base parameter lists (shapes from the model
registry, built on the meta device, materialised as random tensors). Essential bytes per element:
EMA read and written (8), student read (4 or 2), shadow written (2).

Providers:
  loop           the original fairseq/data2vec EMA: per parameter mul_, add_ (fp32), copy_
  reference      ops/reference.py (the same loop, plus argument checks)
  foreach        the strongest plain-PyTorch composition: upcast, _foreach_lerp_, _foreach_copy_
  torch_compile  torch.compile of the reference
  cpp            the C++ extension (multi-tensor, one pass, cached plan)
  triton         the Triton kernel (CUDA only)

Usage: python benchmarks/bench_ema_update.py [--quick] [--providers cpp,foreach]
"""

import torch
from harness import Case, Figure, Provider, Skip, main

from d2v_engine import ops
from d2v_engine.models.registry import build_encoder, get_spec
from d2v_engine.ops.reference import ema_update_ref

DECAY = 0.9998


def parameter_shapes(model: str) -> list[torch.Size]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        encoder = build_encoder(get_spec(model))
    return [p.shape for p in encoder.parameters()]


def _case(model: str, student_dtype: torch.dtype, shadow_dtype: torch.dtype | None) -> Case:
    shapes = parameter_shapes(model)
    numel = sum(s.numel() for s in shapes)
    shadow_bytes = 0 if shadow_dtype is None else shadow_dtype.itemsize
    per_element = 8 + student_dtype.itemsize + shadow_bytes

    def build(device):
        ema = [torch.randn(s, device=device) for s in shapes]
        student = [torch.randn(s, device=device, dtype=student_dtype) for s in shapes]
        shadow = None if shadow_dtype is None else \
            [torch.empty(s, device=device, dtype=shadow_dtype) for s in shapes]
        return dict(ema=ema, student=student, shadow=shadow)

    label = f"{model} {len(shapes)}x {numel / 1e6:.1f}M {_short(student_dtype)} student"
    label += "" if shadow_dtype is None else f" + {_short(shadow_dtype)} shadow"
    return Case(label, numel * per_element, build)


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def cases(quick: bool) -> list[Case]:
    if quick:
        return [_case("image_debug", torch.bfloat16, torch.bfloat16)]
    return [_case("image_base", torch.bfloat16, torch.bfloat16),
            _case("image_base", torch.float32, None),
            _case("text_base", torch.bfloat16, torch.bfloat16)]


# providers ------------------------------------------------------------------------------------

def loop(inputs):
    ema, student, shadow = inputs["ema"], inputs["student"], inputs["shadow"]

    @torch.no_grad()
    def run():
        for i, (e, s) in enumerate(zip(ema, student)):
            e.mul_(DECAY)
            e.add_(s.to(e.dtype), alpha=1 - DECAY)
            if shadow is not None:
                shadow[i].copy_(e)
    return run


def reference(inputs):
    return lambda: ops.ema_update_(inputs["ema"], inputs["student"], DECAY, inputs["shadow"],
                                   backend="reference")


def foreach(inputs):
    ema, student, shadow = inputs["ema"], inputs["student"], inputs["shadow"]
    upcast = student[0].dtype != torch.float32

    @torch.no_grad()
    def run():
        source = [s.float() for s in student] if upcast else student
        torch._foreach_lerp_(ema, source, 1 - DECAY)
        if shadow is not None:
            torch._foreach_copy_(shadow, ema)
    return run


def torch_compile(inputs):
    compiled = torch.compile(ema_update_ref)
    args = (inputs["ema"], inputs["student"], DECAY, inputs["shadow"])
    try:
        compiled(*args)
    except Exception as error:  # noqa: BLE001  (any compiler failure is a skip with its reason)
        raise Skip(f"torch.compile failed: {type(error).__name__}: {str(error)[:120]}") from None
    return lambda: compiled(*args)


def backend(name):
    def setup(inputs):
        if name not in ops._BACKENDS:
            raise Skip(f"the {name} backend is not available in this build")
        return lambda: ops.ema_update_(inputs["ema"], inputs["student"], DECAY, inputs["shadow"],
                                       backend=name)
    return setup


PROVIDERS = [
    Provider("loop", loop),
    Provider("reference", reference),
    Provider("foreach", foreach),
    Provider("torch_compile", torch_compile),
    Provider("cpp", backend("cpp"), devices=("cpu",)),
    Provider("triton", backend("triton"), devices=("cuda",)),
]

FIGURES = [  # the CPU target: bf16 student and bf16 shadow on ViT-B
    Figure("image_base 211x 85.7M bf16 student + bf16 shadow", "cpp", "foreach", at_least=1.6),
]

if __name__ == "__main__":
    main("ema_update", cases, PROVIDERS, description=__doc__.split("\n")[0],
         figures=FIGURES)
