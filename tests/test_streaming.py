"""The streaming TargetAccumulator: same targets as make_targets, one fp32 buffer whatever K is.

Equality with `make_targets_ref` for every norm pair, padding and mask (reference backend, and
the Triton kernels, in the interpreter on CPU); the EMA teacher's streamed targets against the
list form for each modality; and the memory claim of DESIGN.md §3 measured for K = 1 and K = 8.
"""
import pytest
import torch
from asserts import assert_close
from torch.profiler import ProfilerActivity, profile, record_function
from triton_env import ON_GPU, triton_device  # noqa: F401  (fixture)

from d2v_engine.config import TargetConfig, TeacherConfig
from d2v_engine.models import build_encoder, get_spec
from d2v_engine.models.registry import with_overrides
from d2v_engine.ops.reference import make_targets_ref
from d2v_engine.ops.streaming import TargetAccumulator
from d2v_engine.teacher import EMATeacher

NORMS = ("instance", "layer", "none")
TOL = dict(rtol=1e-5, atol=1e-5)


def _padding(batch: int, steps: int, kind: str, device="cpu") -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "suffix":
        lengths = torch.randint(1, steps + 1, (batch,))
        lengths[0], lengths[-1] = steps, 1
        return (torch.arange(steps)[None] >= lengths[:, None]).to(device)
    padding = torch.rand(batch, steps) < 0.4  # anywhere, one sequence all padding
    padding[-1] = True
    return padding.to(device)


def _stream(layers, backend="reference", mask=None, repeat=1, token_mean=False, **kw):
    acc = TargetAccumulator(len(layers), backend=backend, **kw)
    for i, layer in enumerate(layers):
        acc(i, layer)
    return acc.finish(mask, repeat=repeat, token_mean=token_mean)


def _token_mean_ref(layers, **kw) -> torch.Tensor:
    """[B, C]: each sample's final targets averaged over its valid steps (0 for none)."""
    full = make_targets_ref(layers, **kw)
    padding = kw.get("padding_mask")
    valid = torch.ones(full.shape[:2], dtype=torch.bool) if padding is None else ~padding.cpu()
    return torch.stack([full[b][valid[b]].mean(dim=0) if valid[b].any() else full[b, 0] * 0
                        for b in range(full.shape[0])])


def _check_clones(layers, backend, repeat, padding, **kw):
    """finish(mask [B*repeat, T], repeat, token_mean) against make_targets_ref and the mean."""
    batch, steps = layers[0].shape[:2]
    mask = torch.rand(batch * repeat, steps, device=layers[0].device) < 0.8
    mask[-1] = False  # a clone without masked steps
    kw = dict(kw, padding_mask=padding)
    expected = make_targets_ref(layers, mask=mask, repeat=repeat, **kw)
    assert_close(_stream(layers, backend, mask=mask, repeat=repeat, **kw), expected, **TOL)
    rows, mean = _stream(layers, backend, mask=mask, repeat=repeat, token_mean=True, **kw)
    assert mean.dtype == torch.float32 and mean.shape == (batch, layers[0].shape[2])
    assert_close(rows, expected, **TOL)
    assert_close(mean, _token_mean_ref(layers, **kw), **TOL)
    full, mean = _stream(layers, backend, token_mean=True, **kw)  # no mask: [B, T, C] and mean
    assert_close(full, make_targets_ref(layers, **kw), **TOL)
    assert_close(mean, _token_mean_ref(layers, **kw), **TOL)


# equality with make_targets ---------------------------------------------------------------------

@pytest.mark.parametrize("layer_norm", NORMS)
@pytest.mark.parametrize("final_norm", NORMS)
@pytest.mark.parametrize("padding_kind", ["none", "suffix", "anywhere"])
def test_reference_backend_equals_make_targets(layer_norm, final_norm, padding_kind):
    layers = [torch.randn(3, 9, 33) * 3 + 1 for _ in range(5)]
    kw = dict(layer_norm=layer_norm, final_norm=final_norm,
              padding_mask=_padding(3, 9, padding_kind))
    mask = torch.rand(3, 9) < 0.5
    assert_close(_stream(layers, mask=mask, **kw), make_targets_ref(layers, mask=mask, **kw), **TOL)
    assert_close(_stream(layers, **kw), make_targets_ref(layers, **kw), **TOL)


@pytest.mark.parametrize("layer_norm,final_norm", [("instance", "layer"), ("layer", "instance"),
                                                   ("none", "none"), ("instance", "instance")])
@pytest.mark.parametrize("padding_kind", ["none", "anywhere"])
@pytest.mark.parametrize("repeat", [1, 3])
def test_reference_backend_clones_and_token_mean(layer_norm, final_norm, padding_kind, repeat):
    """data2vec 2.0: the rows of every masked clone, and the mean target of each sample."""
    layers = [torch.randn(3, 9, 33) * 3 + 1 for _ in range(3)]
    _check_clones(layers, "reference", repeat, _padding(3, 9, padding_kind),
                  layer_norm=layer_norm, final_norm=final_norm)


def test_low_precision_and_strided_layers():
    # bf16 block outputs and the image encoder's patch-token views out[:, 1:]
    layers = [torch.randn(2, 13, 40).bfloat16()[:, 1:] for _ in range(3)]
    for norms in (("layer", "layer"), ("instance", "instance")):
        kw = dict(layer_norm=norms[0], final_norm=norms[1])
        assert_close(_stream(layers, **kw), make_targets_ref(layers, **kw), **TOL)


def test_first_layer_is_not_modified():
    """An fp32 layer with no per-layer norm is not copied by .float(): the sum must not alias it."""
    layers = [torch.randn(2, 4, 8) for _ in range(2)]
    kept = [x.clone() for x in layers]
    _stream(layers, layer_norm="none")
    assert all(torch.equal(x, k) for x, k in zip(layers, kept))


@pytest.mark.parametrize("layer_norm,final_norm", [("instance", "none"), ("layer", "layer"),
                                                   ("none", "instance"), ("instance", "instance")])
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.gpu
def test_triton_backend_equals_make_targets(triton_device, layer_norm, final_norm, with_mask):
    shape = (8, 500, 768) if ON_GPU else (3, 7, 33)
    layers = [torch.randn(shape, device=triton_device).bfloat16() for _ in range(4)]
    padding = _padding(*shape[:2], "suffix", triton_device)
    mask = (torch.rand(shape[:2], device=triton_device) < 0.5) if with_mask else None
    kw = dict(layer_norm=layer_norm, final_norm=final_norm, padding_mask=padding)
    got = _stream(layers, backend="triton", mask=mask, **kw)
    assert_close(got, make_targets_ref(layers, mask=mask, **kw), **TOL)


@pytest.mark.parametrize("layer_norm,final_norm", [("instance", "layer"), ("layer", "instance")])
def test_triton_backend_clones_and_token_mean(triton_device, layer_norm, final_norm):
    shape = (16, 196, 768) if ON_GPU else (3, 7, 33)
    layers = [torch.randn(shape, device=triton_device).bfloat16() for _ in range(3)]
    _check_clones(layers, "triton", 4, _padding(*shape[:2], "suffix", triton_device),
                  layer_norm=layer_norm, final_norm=final_norm)


# errors -------------------------------------------------------------------------------------------

def test_misuse_is_refused():
    layer = torch.randn(2, 3, 4)
    acc = TargetAccumulator(2, layer_norm="layer")
    acc(0, layer)
    with pytest.raises(ValueError, match="1 of 2 layers"):
        acc.finish()
    with pytest.raises(ValueError, match="first was"):
        acc(1, torch.randn(2, 3, 5))
    acc(1, layer)
    with pytest.raises(ValueError, match="already added"):
        acc(2, layer)
    with pytest.raises(ValueError):
        TargetAccumulator(0, layer_norm="layer")
    clones = TargetAccumulator(1, layer_norm="layer")
    clones(0, layer)
    with pytest.raises(ValueError):
        clones.finish(repeat=2)  # clones need a mask
    with pytest.raises(ValueError):
        clones.finish(torch.ones(2, 3, dtype=torch.bool), repeat=2)  # [B, T], not [B*2, T]
    with pytest.raises(ValueError):
        TargetAccumulator(1, layer_norm="batch")(0, layer)
    late = TargetAccumulator(1, layer_norm="instance")
    late(0, layer)
    with pytest.raises(ValueError, match="padding mask before the first layer"):
        late.finish(padding_mask=torch.tensor([[False, False, True]] * 2))


def test_a_padding_mask_known_only_at_the_end_is_used_by_the_final_steps():
    """The text encoder derives its padding from pad tokens: fine unless the layers need it."""
    layers = [torch.randn(2, 6, 8) for _ in range(2)]
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 3:] = True
    acc = TargetAccumulator(2, layer_norm="layer", final_norm="instance")
    for i, layer in enumerate(layers):
        acc(i, layer)
    got = acc.finish(padding_mask=padding)
    assert_close(got, make_targets_ref(layers, layer_norm="layer", final_norm="instance",
                                       padding_mask=padding), **TOL)


# the teacher ------------------------------------------------------------------------------------

def _teacher(name: str, top_k: int, layer_norm: str, final_norm: str, depth: int = 4,
             backend: str = "reference", device: str = "cpu") -> EMATeacher:
    student = build_encoder(with_overrides(get_spec(name), depth=depth)).to(device)
    target = TargetConfig(top_k=top_k, layer_norm=layer_norm, final_norm=final_norm)
    return EMATeacher(student, TeacherConfig(), target, backend=backend)


def _teacher_input(name: str, batch: int, steps: int):
    """(teacher input, padding mask) for each modality."""
    spec = get_spec(name)
    if spec.modality == "image":
        return torch.randn(batch, 3, spec.image_size, spec.image_size), None
    padding = _padding(batch, steps, "suffix")
    if spec.modality == "audio":  # the teacher reads the student's CNN features
        return torch.randn(batch, steps, spec.transformer.dim), padding
    tokens = torch.randint(4, spec.vocab_size, (batch, steps)).masked_fill(padding, spec.pad_idx)
    return tokens, padding


@pytest.mark.parametrize("name,layer_norm,final_norm", [
    ("image_debug", "layer", "layer"), ("audio_debug", "instance", "none"),
    ("text_debug", "layer", "none"), ("audio_debug", "instance", "instance")])
def test_teacher_targets_equal_the_list_form(name, layer_norm, final_norm):
    teacher = _teacher(name, 3, layer_norm, final_norm)
    x, padding = _teacher_input(name, 3, 20)
    out = teacher.module(x, padding_mask=padding, top_k=3)
    mask = torch.rand(out.x.shape[:2]) < 0.5
    expected = make_targets_ref(out.layer_results, layer_norm=layer_norm, final_norm=final_norm,
                                mask=mask, padding_mask=out.padding_mask)
    assert_close(teacher.targets(x, mask=mask, padding_mask=padding), expected, **TOL)


def test_teacher_on_the_triton_backend(triton_device):
    """Targets and EMA update through the Triton kernels match a reference-backend teacher."""
    torch.manual_seed(1)
    fused = _teacher("audio_debug", 2, "instance", "layer", backend="triton",
                     device=triton_device)
    torch.manual_seed(1)
    plain = _teacher("audio_debug", 2, "instance", "layer", device=triton_device)
    student = build_encoder(with_overrides(get_spec("audio_debug"), depth=4)).to(triton_device)
    for teacher in (fused, plain):
        teacher.update(student, step=3)
    for name, value in fused.state_dict().items():
        assert_close(value, plain.state_dict()[name], rtol=1e-6, atol=1e-6)
    x, padding = _teacher_input("audio_debug", 3, 20)
    x, padding = x.to(triton_device), padding.to(triton_device)
    mask = torch.rand(3, 20, device=triton_device) < 0.5
    assert_close(fused.targets(x, mask=mask, padding_mask=padding),
                 plain.targets(x, mask=mask, padding_mask=padding), **TOL)


# memory -----------------------------------------------------------------------------------------

def _peak_bytes(*fns) -> list[int]:
    """For each function, run in turn: the peak of the bytes it allocated and has not freed yet.

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocator events (every
    allocation and free of the CPU allocator, with times), in one profiling session for all the
    functions (a session costs about a second), each function inside a named range.
    """
    if ON_GPU:
        peaks = []
        for fn in fns:
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - start)
        return peaks
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for i, fn in enumerate(fns):
            with record_function(f"measured_{i}"):
                fn()
    events = prof.profiler.kineto_results.events()
    spans = {e.name(): (e.start_ns(), e.end_ns()) for e in events
             if e.name().startswith("measured_")}
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    peaks = []
    for i in range(len(fns)):
        start, end = spans[f"measured_{i}"]
        live = peak = 0
        for time, nbytes in memory:
            if start <= time <= end:
                live += nbytes
                peak = max(peak, live)
        peaks.append(peak)
    return peaks


def _held_bytes(acc: TargetAccumulator) -> int:
    """Bytes of the tensors the accumulator holds between layers (its buffer; launchers' masks)."""
    held = [v for v in vars(acc).values() if isinstance(v, torch.Tensor)]
    if acc._kernels is not None:
        held += [v for v in vars(acc._kernels).values() if isinstance(v, torch.Tensor)]
    shared = None if acc.padding_mask is None else acc.padding_mask.untyped_storage().data_ptr()
    return sum(t.numel() * t.element_size() for t in held
               if t.untyped_storage().data_ptr() != shared)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_held_memory_is_one_buffer_whatever_k(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_device")
    device = "cuda" if ON_GPU else "cpu"
    batch, steps, channels = 2, 6, 24
    buffer_bytes = batch * steps * channels * 4
    padding = _padding(batch, steps, "suffix", device)
    for k in (1, 8):
        acc = TargetAccumulator(k, layer_norm="instance", final_norm="layer",
                                padding_mask=padding, backend=backend)
        for i in range(k):
            acc(i, torch.randn(batch, steps, channels, device=device).bfloat16())
            # the fp32 sum, plus the Triton launchers' [B] shift index: nothing per layer
            assert buffer_bytes <= _held_bytes(acc) <= buffer_bytes + batch * 4
        acc.finish(torch.rand(batch, steps, device=device) < 0.5)


def test_teacher_extra_memory_is_one_buffer_whatever_k():
    """DESIGN §3: the teacher's extra memory for targets is one fp32 [B, T, C] buffer for any K.

    Peak allocated bytes during `teacher.targets` on an 8-block audio teacher, above the peak of
    the same teacher's plain forward: for K = 1 and K = 8, at most one [B, T, C] fp32 buffer plus
    a fraction for temporaries. The list form (the K outputs, then make_targets), measured the
    same way, needs about 7 buffers more at K = 8: the control that the measurement can see it.
    """
    device = "cuda" if ON_GPU else "cpu"
    batch, steps, channels = 2, 96, 128
    buffer_bytes = batch * steps * channels * 4
    x = torch.randn(batch, steps, channels, device=device)
    padding = _padding(batch, steps, "suffix", device)
    mask = torch.rand(batch, steps, device=device) < 0.5
    teacher = _teacher("audio_debug", 1, "instance", "none", depth=8,
                       backend="triton" if ON_GPU else "reference", device=device)

    def forward(top_k: int):
        with torch.no_grad():
            return teacher.module(x, padding_mask=padding, top_k=top_k)

    def streaming(k: int):
        teacher.target_cfg = TargetConfig(top_k=k, layer_norm="instance", final_norm="none")
        teacher.targets(x, mask=mask, padding_mask=padding)

    def list_form(k: int):
        make_targets_ref(forward(k).layer_results, layer_norm="instance", mask=mask,
                         padding_mask=padding)

    forward(0)  # warm-up: the first forward allocates more (one-time caches)
    base, *peaks = _peak_bytes(lambda: forward(0), lambda: streaming(1), lambda: list_form(1),
                               lambda: streaming(8), lambda: list_form(8))
    extra = {(form, k): peak - base for (form, k), peak in
             zip([("streaming", 1), ("list", 1), ("streaming", 8), ("list", 8)], peaks)}
    print("\nextra peak over the plain forward, in [B, T, C] fp32 buffers: " + ", ".join(
        f"{form} K={k}: {value / buffer_bytes:.2f}" for (form, k), value in extra.items()))
    for k in (1, 8):
        assert extra["streaming", k] <= 1.5 * buffer_bytes
    assert extra["list", 8] > 5 * buffer_bytes
