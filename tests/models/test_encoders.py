"""Encoders of every modality on the shared Transformer: shapes, targets, masking, padding, teacher copies."""
import copy
import dataclasses

import pytest
import torch
from torch.testing import assert_close

from d2v_engine.models import MODEL_REGISTRY, EncoderOutput, Views, build_encoder, get_spec
from d2v_engine.models.audio import conv_output_length
from d2v_engine.models.encoder import TransformerBlock, build_attn_mask
from d2v_engine.models.image import relative_position_index
from d2v_engine.models.registry import ModelSpec, with_overrides
from d2v_engine.models.text import roberta_positions

DEBUG = sorted(n for n in MODEL_REGISTRY if n.endswith("_debug"))
B = 3
AUDIO_SAMPLES = 6000
TEXT_LEN = 13


def make_batch(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """A random batch in the collate layout of `d2v_interfaces`; audio and text have one padded row."""
    index, labels = torch.arange(B), torch.full((B,), -1)
    if spec.modality == "image":
        s = spec.image_size
        return dict(images=torch.randn(B, 3, s, s), mask=torch.rand(B, spec.num_patches) < 0.5,
                    index=index, labels=labels)
    if spec.modality == "audio":
        pad = torch.zeros(B, AUDIO_SAMPLES, dtype=torch.bool)
        pad[1, AUDIO_SAMPLES - 2500:] = True
        frames = conv_output_length(spec.conv_layers, AUDIO_SAMPLES)
        return dict(audio=torch.randn(B, AUDIO_SAMPLES), padding_mask=pad,
                    mask=torch.rand(B, frames) < 0.5, index=index, labels=labels)
    clean = torch.randint(4, spec.vocab_size - 1, (B, TEXT_LEN))
    clean[:, 0], clean[:, -1] = 0, 2
    clean[1, 8], clean[1, 9:] = 2, spec.pad_idx
    pad = clean.eq(spec.pad_idx)
    mask = (torch.rand(B, TEXT_LEN) < 0.3) & ~pad
    tokens = clean.masked_fill(mask, spec.vocab_size - 1)
    return dict(tokens=tokens, clean=clean, padding_mask=pad, mask=mask, index=index, labels=labels)


def build(name: str, **overrides) -> torch.nn.Module:
    return build_encoder(with_overrides(get_spec(name), **overrides))


def run(model, views: Views, *, student: bool = True, **kw) -> EncoderOutput:
    x = views.student if student else views.teacher
    mask = views.embed_mask if student else None
    return model(x, mask=mask, padding_mask=views.padding_mask, **kw)


def num_tokens(spec: ModelSpec) -> int:
    if spec.modality == "image":
        return spec.num_patches
    if spec.modality == "audio":
        return conv_output_length(spec.conv_layers, AUDIO_SAMPLES)
    return TEXT_LEN


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", DEBUG)
def test_forward_shapes(name, masked):
    model = build(name)
    spec, views = model.spec, model.views(make_batch(model.spec))
    out = model(views.student, mask=views.embed_mask if masked else None, padding_mask=views.padding_mask)
    assert out.x.shape == (B, num_tokens(spec), spec.transformer.dim)
    assert out.layer_results == []
    assert torch.isfinite(out.x).all()
    if spec.modality == "image":
        assert out.cls.shape == (B, spec.transformer.dim) and out.padding_mask is None
    else:
        assert out.cls is None and out.padding_mask.shape == (B, num_tokens(spec))


@pytest.mark.parametrize("name", DEBUG)
def test_top_k_returns_k_outputs(name):
    model = build(name, target_output="block").eval()
    spec, views = model.spec, model.views(make_batch(model.spec))
    for k in (1, model.num_layers):
        out = run(model, views, top_k=k)
        assert len(out.layer_results) == k
        assert all(t.shape == (B, num_tokens(spec), model.dim) for t in out.layer_results)
    # End-of-block target of the last block = the output (images: before the final LayerNorm).
    last = out.layer_results[-1]
    assert_close(model.layernorm(last) if spec.modality == "image" else last, out.x)
    with pytest.raises(ValueError):
        run(model, views, top_k=model.num_layers + 1)


@pytest.mark.parametrize("target", ["ffn", "block"])
@pytest.mark.parametrize("name", DEBUG)
def test_target_output_matches_hooks(name, target):
    model = build(name, target_output=target).eval()
    fc2_out, block_out = [], []
    for block in model.encoder.layers:
        block.feed_forward.output_dense.register_forward_hook(lambda m, i, o: fc2_out.append(o))
        block.register_forward_hook(lambda m, i, o: block_out.append(o[0]))
    out = run(model, model.views(make_batch(model.spec)), top_k=model.num_layers)
    for i, block in enumerate(model.encoder.layers):
        if target == "ffn":
            want = fc2_out[i] if block.lambda_1 is None else block.lambda_2 * fc2_out[i]
        else:
            want = block_out[i]
        if model.modality == "image":
            want = want[:, 1:]
        assert_close(out.layer_results[i], want)


def test_image_mask_replaces_only_masked_patches():
    model = build("image_debug").eval()
    batch = make_batch(model.spec)
    seen = []
    model.encoder.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    plain = model(batch["images"])
    unmasked = model(batch["images"], mask=torch.zeros_like(batch["mask"]))
    masked = model(batch["images"], mask=batch["mask"])
    assert_close(unmasked.x, plain.x)
    ref, h = seen[0], seen[2]
    m = batch["mask"]
    assert_close(h[:, 0], ref[:, 0])
    assert_close(h[:, 1:][~m], ref[:, 1:][~m])
    assert_close(h[:, 1:][m], model.embeddings.mask_token.view(1, -1).expand(int(m.sum()), -1))
    assert not torch.allclose(masked.x, plain.x)


def test_audio_mask_embedding_replaces_masked_frames():
    model = build("audio_debug").eval()
    views = model.views(make_batch(model.spec))
    seen = []
    model.pos_conv_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    run(model, views)
    masked, kept = views.embed_mask & ~views.padding_mask, ~views.embed_mask & ~views.padding_mask
    assert_close(seen[0][masked], model.masked_spec_embed.expand(int(masked.sum()), -1))
    assert_close(seen[0][kept], views.student[kept])
    assert (seen[0][views.padding_mask] == 0).all()


def test_text_valid_outputs_ignore_padded_tokens():
    model = build("text_debug").eval()
    views = model.views(make_batch(model.spec))
    pad = views.padding_mask
    other = views.teacher.masked_scatter(pad, torch.randint(4, 100, (int(pad.sum()),)))
    a = model(views.teacher, padding_mask=pad, top_k=2)
    b = model(other, padding_mask=pad, top_k=2)
    for x, y in zip([a.x] + a.layer_results, [b.x] + b.layer_results):
        assert_close(x[~pad], y[~pad])
    # Without the padding mask the valid positions do see the padded tokens.
    c = model(other, padding_mask=torch.zeros_like(pad))
    assert not torch.allclose(a.x[~pad], c.x[~pad])


def test_audio_valid_outputs_ignore_padding():
    model = build("audio_debug").eval()
    batch = make_batch(model.spec)
    feats, frame_pad = model.local_features(batch["audio"], batch["padding_mask"])
    valid = conv_output_length(model.spec.conv_layers, (~batch["padding_mask"]).sum(-1))
    assert_close((~frame_pad).sum(-1), valid)
    # Valid frames' receptive fields lie inside the valid samples.
    noisy = batch["audio"].masked_scatter(batch["padding_mask"], torch.randn(int(batch["padding_mask"].sum())))
    assert_close(model.local_features(noisy, batch["padding_mask"])[0][~frame_pad], feats[~frame_pad])
    # Padded frames are zeroed before the position conv and masked as attention keys.
    other = feats.masked_scatter(frame_pad.unsqueeze(-1), torch.randn(int(frame_pad.sum()) * model.dim))
    a = model(feats, padding_mask=frame_pad, top_k=2)
    b = model(other, padding_mask=frame_pad, top_k=2)
    for x, y in zip([a.x] + a.layer_results, [b.x] + b.layer_results):
        assert_close(x[~frame_pad], y[~frame_pad])


@pytest.mark.parametrize("name", ["image_debug", "text_debug"])
def test_block_masks_padded_keys(name):
    spec = get_spec(name).transformer
    block = TransformerBlock(spec).eval()
    h = torch.randn(B, 7, spec.dim)
    pad = torch.zeros(B, 7, dtype=torch.bool)
    pad[0, 4:], pad[2, 6:] = True, True
    other = h.masked_scatter(pad.unsqueeze(-1), torch.randn(int(pad.sum()) * spec.dim))
    mask = build_attn_mask(None, pad, h.dtype)
    for a, b in zip(block(h, mask), block(other, mask)):
        assert_close(a[~pad], b[~pad])
    assert not torch.allclose(block(h)[0][~pad], block(other)[0][~pad])


@pytest.mark.parametrize("name", DEBUG)
def test_views(name):
    model = build(name)
    batch = make_batch(model.spec)
    views = model.views(batch)
    if model.modality == "image":
        assert views.student is batch["images"] and views.teacher is batch["images"]
        assert views.padding_mask is None and views.embed_mask is batch["mask"]
    elif model.modality == "audio":
        frames = conv_output_length(model.spec.conv_layers, AUDIO_SAMPLES)
        assert views.student.shape == (B, frames, model.dim) and views.student.requires_grad
        assert_close(views.teacher, views.student)
        assert not views.teacher.requires_grad
        assert views.padding_mask.shape == (B, frames) and views.embed_mask is batch["mask"]
    else:
        assert views.student is batch["tokens"] and views.teacher is batch["clean"]
        assert views.padding_mask is batch["padding_mask"] and views.embed_mask is None


@pytest.mark.parametrize("name", DEBUG)
def test_teacher_copy_without_excluded_parts(name):
    student = build(name)
    teacher = copy.deepcopy(student).eval()
    for attr in student.teacher_exclude:
        setattr(teacher, attr, None)
    assert all(hasattr(student, attr) for attr in student.teacher_exclude + student.teacher_copy)
    views = student.views(make_batch(student.spec))
    with torch.no_grad():
        out = run(teacher, views, student=False, top_k=2)
        want = run(student.eval(), views, student=False, top_k=2)
    assert len(out.layer_results) == 2
    assert_close(out.x, want.x)


@pytest.mark.parametrize("name", DEBUG)
def test_grad_checkpointing_is_exact(name):
    # Dropout and stochastic depth on: checkpointing must replay the same random draws.
    model = build(name, dropout=0.1, drop_path=0.1).train()
    views = model.views(make_batch(model.spec))
    results = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        torch.manual_seed(1)
        out = run(model, views, top_k=2)
        (out.x.square().mean() + sum(t.mean() for t in out.layer_results)).backward(retain_graph=True)
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, grads_a), (b, grads_b) = results
    assert_close(b.x, a.x)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for n in grads_a:
        assert_close(grads_b[n], grads_a[n], msg=n)


def test_layerdrop_never_skips_collected_blocks():
    model = build("text_debug", layerdrop=1.0).train()
    ran = []
    for i, block in enumerate(model.encoder.layers):
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    views = model.views(make_batch(model.spec))
    out = run(model, views, top_k=2)
    assert ran == [2, 3] and len(out.layer_results) == 2
    ran.clear()
    run(model.eval(), views, top_k=1)
    assert ran == [0, 1, 2, 3]


@pytest.mark.parametrize("name", DEBUG)
def test_on_layer_streams_instead_of_collecting(name):
    model = build(name).eval()
    views = model.views(make_batch(model.spec))
    streamed = []
    out = run(model, views, top_k=3, on_layer=lambda i, t: streamed.append((i, t)))
    want = run(model, views, top_k=3)
    assert out.layer_results == []
    assert [i for i, _ in streamed] == [model.num_layers - 3 + j for j in range(3)]
    for (_, t), w in zip(streamed, want.layer_results):
        assert_close(t, w)


@pytest.mark.parametrize("name, low, high", [("image_base", 85e6, 87e6), ("audio_base", 93e6, 95e6),
                                             ("text_base", 124e6, 125e6)])
def test_parameter_counts(name, low, high):
    with torch.device("meta"):
        model = build_encoder(dataclasses.replace(get_spec(name), vocab_size=50265))
    assert low <= sum(p.numel() for p in model.parameters()) <= high


def test_conv_output_length():
    conv = get_spec("audio_base").conv_layers
    assert conv_output_length(conv, 16000) == 49 and conv_output_length(conv, 320000) == 999
    assert conv_output_length(conv, 100) == 0
    lengths = torch.tensor([400, 4000, 16000, 100])
    assert conv_output_length(conv, lengths).tolist() == [conv_output_length(conv, n) for n in lengths.tolist()]
    model = build("audio_debug")
    for n in (400, 719, 720, 3333):
        assert model.local_features(torch.randn(1, n), None)[0].shape[1] == conv_output_length(conv, n)


def test_relative_position_index():
    index = relative_position_index((3, 4))
    n_rel = (2 * 3 - 1) * (2 * 4 - 1)
    assert index.shape == (13, 13) and set(index.unique().tolist()) == set(range(n_rel + 3))
    assert (index[0, 1:] == n_rel).all() and (index[1:, 0] == n_rel + 1).all() and index[0, 0] == n_rel + 2
    # Same 2-D offset, same row: patch (0,0)->(1,2) and patch (1,1)->(2,3) (row-major, +1 for CLS).
    assert index[1 + 0, 1 + 6] == index[1 + 5, 1 + 11]
    assert index[1 + 6, 1 + 0] != index[1 + 0, 1 + 6]


def test_roberta_positions():
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert roberta_positions(valid, 1).tolist() == [[2, 3, 4, 1], [2, 3, 4, 5]]


def test_image_init_scales_residual_outputs_with_depth():
    model = build("image_debug")
    stds = [block.feed_forward.output_dense.weight.std().item() for block in model.encoder.layers]
    for layer_id, std in enumerate(stds, start=1):
        assert abs(std * (2 * layer_id) ** 0.5 / 0.02 - 1) < 0.1
    assert (model.relative_position_bias.relative_position_bias_table == 0).all()
    assert model.encoder.layers[0].attention.k_proj.bias is None


def test_image_variants_of_the_fine_tuned_checkpoints():
    """rel_pos_bias="layer": a table per block, each acting on its own block; pooling="mean": no final norm."""
    spec = dataclasses.replace(get_spec("image_debug"), rel_pos_bias="layer", pooling="mean")
    model = build_encoder(spec).eval()
    names = set(model.state_dict())
    assert model.relative_position_bias is None and not any(n.startswith("layernorm.") for n in names)
    tables = [f"encoder.layers.{i}.attention.relative_position_bias.relative_position_bias_table"
              for i in range(spec.transformer.depth)]
    assert names >= set(tables)
    x = torch.randn(2, 3, spec.image_size, spec.image_size)
    before = model(x, top_k=spec.transformer.depth).layer_results
    with torch.no_grad():
        model.encoder.layers[2].attention.relative_position_bias.relative_position_bias_table.normal_()
    after = model(x, top_k=spec.transformer.depth).layer_results
    assert_close(after[1], before[1])                 # blocks before 2 do not see block 2's table
    assert not torch.allclose(after[2], before[2])
    none = build_encoder(dataclasses.replace(spec, rel_pos_bias="none"))
    assert not any("relative_position" in n for n in none.state_dict())


def test_text_positions_skip_pad_tokens_whatever_the_attention_mask():
    """Hugging Face's RoBERTa and fairseq number positions by non-<pad> tokens, not by the attention mask."""
    model = build("text_debug").eval()
    tokens = torch.randint(4, 100, (2, 9))
    tokens[1, 6:] = model.spec.pad_idx
    attend_all = model(tokens, padding_mask=torch.zeros_like(tokens, dtype=torch.bool))
    want, _ = model.encoder(model.embeddings(tokens, tokens.ne(model.spec.pad_idx)))
    assert_close(attend_all.x, want)


def test_std_across_samples_sees_positional_collapse():
    """Rows that depend on their position only: high `masked_std`, ~0 `std_across_samples`."""
    from d2v_engine.models.data2vec import masked_std, std_across_samples
    B, T, C = 8, 30, 16
    mask = torch.rand(B, T) < 0.5
    positions = mask.nonzero()[:, 1]
    by_position = torch.randn(T, C) * 2.0
    collapsed = by_position[positions]                       # each row a function of its index t
    assert masked_std(collapsed) > 1.0
    assert std_across_samples(collapsed, mask) < 0.01
    # Content rows (independent per sample): the spread across samples is the rows' own spread.
    content = torch.randn(int(mask.sum()), C) * 3.0 + by_position[positions]
    spread = std_across_samples(content, mask)
    # Reference: the pooled per-position variance, positions masked in at least two samples.
    var = torch.cat([content[positions == t].var(dim=0) for t in range(T) if (positions == t).sum() >= 2])
    assert_close(spread, var.mean().add(1e-6).sqrt(), rtol=1e-4, atol=1e-5)
    assert 2.5 < float(spread) < 3.5


def test_circular_position_convolution_leaves_no_absolute_position():
    """audio_debug (circular padding) is equivariant to rolling the frames; zero padding is not."""
    spec = get_spec("audio_debug")
    assert spec.pos_conv_padding == "circular"
    torch.manual_seed(0)
    x = torch.randn(2, 40, spec.transformer.dim)
    for padding in ("circular", "zeros"):
        encoder = build_encoder(dataclasses.replace(spec, pos_conv_padding=padding)).eval()
        with torch.no_grad():
            out, rolled = encoder(x).x, encoder(x.roll(7, dims=1)).x
        if padding == "circular":
            assert_close(rolled, out.roll(7, dims=1), rtol=1e-4, atol=1e-4)
        else:
            assert (rolled - out.roll(7, dims=1)).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, masked", [(50, False), (37, True)])
def test_low_precision_cpu_attention_matches_fp32(dtype, T, masked):
    """`attend` on a CPU in bf16/fp16 (two matmuls and a softmax, not SDPA's kernel) against fp32
    SDPA on the same rounded inputs: outputs and gradients within the low precision's rounding."""
    from d2v_engine.models.encoder import attend

    B, H, D = 4, 3, 64
    q, k, v = (torch.randn(B, H, T, D).to(dtype) for _ in range(3))
    bias = torch.randn(1, H, T, T).to(dtype)
    padding = torch.rand(B, T) < 0.3 if masked else None
    mask = build_attn_mask(bias, padding, dtype)
    low = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.float().requires_grad_() for t in (q, k, v)]
    out = attend(*low, mask, 0.0)
    want = torch.nn.functional.scaled_dot_product_attention(*ref, attn_mask=mask.float())
    assert out.dtype == dtype
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=5e-3, rtol=5e-3)
    assert_close(out.float(), want, **tol)
    g = torch.randn_like(want)
    out.backward(g.to(dtype))
    want.backward(g)
    for got, exp in zip(low, ref):
        assert_close(got.grad.float(), exp.grad, atol=10 * tol["atol"], rtol=10 * tol["rtol"])
    # fp32 keeps SDPA's result exactly
    f32 = attend(q.float(), k.float(), v.float(), mask.float(), 0.0)
    assert torch.equal(f32, torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                               attn_mask=mask.float()))
