"""data2vec 2.0: the student sees only visible tokens, M copies share one teacher pass, the decoder."""
import pytest
import torch
from torch.testing import assert_close

from d2v_engine.config import DecoderConfig, LossConfig, TargetConfig, TeacherConfig
from d2v_engine.models import build_encoder, get_spec
from d2v_engine.models.audio import alibi_slopes
from d2v_engine.models.data2vec2 import Data2Vec2
from d2v_engine.models.decoder import ConvDecoder, decoder_input
from d2v_engine.models.encoder import visible_index
from d2v_engine.models.image import sincos_positions
from d2v_engine.ops.reference import make_targets_ref, regression_loss_ref
from d2v_engine.teacher import EMATeacher
from tests.models.test_encoders import make_batch, num_tokens

MODELS = ["image_debug", "image_debug_v2", "audio_debug", "audio_debug_v2", "text_debug"]
M = 3


def v2_batch(spec, prob: float = 0.5, clones: int = M) -> dict[str, torch.Tensor]:
    """A collate-layout batch with [B, clones, T] masks that never mask padding."""
    batch = make_batch(spec)
    B, T = batch["mask"].shape
    mask = torch.rand(B, clones, T) < prob
    if spec.modality == "text":
        mask &= ~batch["padding_mask"][:, None]
        batch["tokens"] = batch["clean"]
    if spec.modality == "audio":
        frames = (~batch["padding_mask"]).sum(1) // 320 - 1      # a safe bound on the valid frames
        mask &= torch.arange(T)[None, None] < frames[:, None, None]
    batch["mask"] = mask
    return batch


def objective(name: str, cls_weight: float = 0.0, **decoder) -> tuple[Data2Vec2, EMATeacher]:
    spec = get_spec(name)
    encoder = build_encoder(spec)
    dec = DecoderConfig(layers=2, dim=32, kernel=3, groups=16, **decoder)
    model = Data2Vec2(encoder, dec, LossConfig(beta=0.0, scale="inv_sqrt_dim", cls_weight=cls_weight), M,
                      backend="reference")
    teacher = EMATeacher(encoder, TeacherConfig(anneal_steps=10), TargetConfig(top_k=2, layer_norm="instance",
                         final_norm="layer" if spec.modality == "image" else "none"), backend="reference",
                         copy=model.teacher_copy)
    return model, teacher


@pytest.mark.parametrize("name", MODELS)
def test_visible_forward_with_nothing_masked_is_the_full_forward(name):
    """Gathering every step of every clone reproduces the plain encoder on the sample (eval mode)."""
    spec = get_spec(name)
    encoder = build_encoder(spec).eval()
    batch = v2_batch(spec, prob=0.0)
    views = encoder.views(batch)
    full = encoder(views.teacher, padding_mask=views.padding_mask)
    padding = None if views.padding_mask is None else views.padding_mask.repeat_interleave(M, 0)
    visible = visible_index(batch["mask"].flatten(0, 1), padding, M)
    part = encoder(views.student, padding_mask=views.padding_mask, visible=visible)
    for r in range(len(visible.rows)):
        b = int(visible.rows[r])
        valid = slice(None) if padding is None else ~padding[r]
        assert_close(part.x[r, : int((~padding[r]).sum()) if padding is not None else None],
                     full.x[b][valid], rtol=1e-5, atol=1e-5)
        if spec.modality == "image":
            assert_close(part.cls[r], full.cls[b], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_the_student_encodes_only_visible_tokens_and_one_teacher_pass_serves_all_copies(name):
    spec = get_spec(name)
    model, teacher = objective(name)
    batch = v2_batch(spec)
    lengths, teacher_calls = [], []
    model.encoder.encoder.register_forward_pre_hook(lambda m, args: lengths.append(tuple(args[0].shape[:2])))
    teacher.module.register_forward_pre_hook(lambda m, args: teacher_calls.append(args[0].shape[0]))
    loss, stats = model(batch, teacher)
    B, _, T = batch["mask"].shape
    hidden = batch["mask"].flatten(0, 1)
    padding = model.encoder.views(batch).padding_mask
    if padding is not None:
        hidden = hidden | padding.repeat_interleave(M, 0)
    visible = int((~hidden).sum(1).max()) + (spec.modality == "image")   # + CLS
    assert lengths == [(B * M, visible)]
    assert teacher_calls == [B]                                          # clean samples, once
    assert stats["pred"].shape == stats["target"].shape == (int(batch["mask"].sum()), model.encoder.dim)
    loss.backward()
    assert model.decoder.proj.weight.grad is not None and model.encoder.encoder.layers[0].attention.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["image_debug_v2", "audio_debug_v2", "text_debug"])
def test_masked_inputs_never_reach_the_student(name):
    """With one copy per sample, changing the input at its masked steps leaves the student's output alone."""
    spec = get_spec(name)
    encoder = build_encoder(spec).eval()
    batch = v2_batch(spec, clones=1)
    views = encoder.views(batch)
    mask = batch["mask"][:, 0]
    padding = views.padding_mask
    visible = visible_index(mask, padding, 1)
    student = views.student.clone()
    if spec.modality == "image":
        p, side = spec.patch_size, spec.image_size // spec.patch_size
        pixels = mask.view(-1, side, side).repeat_interleave(p, 1).repeat_interleave(p, 2)
        student = torch.where(pixels[:, None], torch.randn_like(student), student)
    elif spec.modality == "audio":
        student = torch.where(mask[..., None], torch.randn_like(student), student)
    else:
        student = torch.where(mask, torch.randint_like(student, 4, spec.vocab_size - 1), student)
    assert not torch.equal(student, views.student)
    slots = torch.ones_like(visible.keep, dtype=torch.bool) if visible.padding is None else ~visible.padding
    assert_close(encoder(student, padding_mask=padding, visible=visible).x[slots],
                 encoder(views.student, padding_mask=padding, visible=visible).x[slots])


def test_targets_of_all_copies_are_the_samples_targets():
    """The rows the objective regresses are make_targets of the clean sample, gathered per copy."""
    model, teacher = objective("image_debug_v2", cls_weight=2.56)
    batch = v2_batch(get_spec("image_debug_v2"))
    mask = batch["mask"].flatten(0, 1)
    rows, mean = teacher.targets(batch["images"], mask=mask, padding_mask=None, repeat=M, token_mean=True)
    out = teacher.module(batch["images"], top_k=2)
    full = make_targets_ref(out.layer_results, layer_norm="instance", final_norm="layer")
    idx = mask.nonzero()
    assert_close(rows, full[idx[:, 0] // M, idx[:, 1]])
    assert_close(mean, full.mean(1))

    # The loss: mean squared error x 1/sqrt(C) over masked rows + 2.56 x the CLS loss's mean over copies.
    torch.manual_seed(5)
    loss, stats = model(batch, teacher)
    torch.manual_seed(5)
    pred, cls = model.predict(model.encoder.views(batch), mask)
    scale = model.encoder.dim ** -0.5
    expected = regression_loss_ref(pred, rows, beta=0, scale=scale, reduction="mean") + 2.56 * \
        regression_loss_ref(cls, mean.repeat_interleave(M, 0), beta=0, scale=scale, reduction="mean")
    assert_close(loss, expected)


def test_decoder_input_restores_the_order():
    x = torch.randn(4, 3, 8)
    mask = torch.ones(4, 6, dtype=torch.bool)
    keep = torch.stack([torch.randperm(6)[:3].sort().values for _ in range(4)])
    mask.scatter_(1, keep, False)
    visible = visible_index(mask, None, 2)
    assert torch.equal(visible.keep, keep)
    padding = mask & (torch.arange(6) == int(mask[1].nonzero()[-1]))[None] & (torch.arange(4) == 1)[:, None]
    full = decoder_input(x, visible, 6, noise_std=0.01, padding_mask=padding)
    assert_close(full.gather(1, keep[..., None].expand(-1, -1, 8)), x)
    noise = full[mask & ~padding]
    assert 0.007 < float(noise.std()) < 0.013 and abs(float(noise.mean())) < 0.005
    assert padding.sum() == 1 and not full[padding].any()             # padding: zeros, not noise


def test_visible_index_pads_rows_with_fewer_visible_steps():
    mask = torch.tensor([[0, 1, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    padding = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    visible = visible_index(mask, padding, 1)
    assert visible.keep[:, :1].tolist() == [[0], [2]] and visible.keep[0].tolist() == [0, 2]
    assert visible.padding.tolist() == [[False, False], [False, True]]


@pytest.mark.parametrize("grid, kernel, residual", [((7, 7), 3, True), (None, 7, True), (None, 4, False),
                                                    ((4, 4), 2, True)])
def test_conv_decoder_keeps_the_length_and_mixes_neighbours_only(grid, kernel, residual):
    cfg = DecoderConfig(layers=1, dim=32, kernel=kernel, groups=4, residual=residual)
    dec = ConvDecoder(cfg, 32, grid)
    steps = 49 if grid == (7, 7) else 16 if grid else 20
    x = torch.randn(2, steps, 32, requires_grad=True)
    y = dec(x)
    assert y.shape == x.shape
    # One conv block: output step t depends on steps within the kernel's reach only.
    y[0, 0].sum().backward()
    reach = (x.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    if grid is None:
        assert max(reach) <= kernel // 2
    else:
        assert all(s // grid[1] <= kernel // 2 and s % grid[1] <= kernel // 2 for s in reach)


def test_sincos_positions_and_alibi_slopes():
    table = sincos_positions((3, 5), 16)
    assert table.shape == (15, 16)
    assert_close(table[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    assert len({tuple(row.tolist()) for row in table}) == 15           # every patch its own code
    assert_close(table[5, :8], table[0, :8])                            # same column, same first half
    assert_close(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    assert alibi_slopes(12).shape == (12,) and bool((alibi_slopes(12) > 0).all())
