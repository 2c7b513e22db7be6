"""Masking: statistics over many samples against the data2vec 1.0 recipes, and determinism."""

import time

import pytest
import torch

from d2v_engine.errors import UserError
from d2v_engine.masking import (bert_mask, block_mask, block_mask_1d, block_mask_2d, counter_uniform,
                               random_mask, span_mask)


@pytest.fixture(autouse=True)
def _single_thread():
    """Masks are computed in data-loader workers, which run single-threaded: measure them so.

    (On a busy 2-core machine, intra-op threads waiting on each other make these small ops up to
    100x slower.)
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fresh_indices(n: int) -> torch.Tensor:
    """Random, distinct global sample indices (some beyond 2**32) so tests never reuse one set."""
    return torch.randperm(1 << 20)[:n] * 4099 + torch.randint(0, 4099, (n,))


def _runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of True in a 1-D bool tensor."""
    padded = torch.cat([torch.tensor([False]), row, torch.tensor([False])]).int()
    edges = padded.diff()
    starts = (edges == 1).nonzero().flatten()
    ends = (edges == -1).nonzero().flatten()
    return list(zip(starts.tolist(), (ends - starts).tolist()))


# counter_uniform -----------------------------------------------------------------------------

def test_counter_uniform_is_uniform_and_decorrelated():
    u = counter_uniform(3, 1, _fresh_indices(512), 512, stream=7)
    assert u.shape == (512, 512) and u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    counts = torch.histc(u, bins=16, min=0.0, max=1.0)
    expected = u.numel() / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50.0  # 15 degrees of freedom: p < 1e-5 beyond this
    assert abs(float(u.mean()) - 0.5) < 0.003
    lag = torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]
    across = torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1]
    assert abs(float(lag)) < 0.01 and abs(float(across)) < 0.01


def test_counter_uniform_is_a_pure_function_of_its_keys():
    index = torch.tensor([0, 1, 2**33 + 5, 17])
    u = counter_uniform(1, 2, index, 8, stream=3)
    assert torch.equal(u, counter_uniform(1, 2, index, 8, stream=3))
    assert torch.equal(u[2:3], counter_uniform(1, 2, index[2:3], 8, stream=3))
    assert torch.equal(u[:, :5], counter_uniform(1, 2, index, 5, stream=3))
    for changed in (dict(seed=9), dict(epoch=3), dict(stream=4)):
        keys = dict(seed=1, epoch=2, stream=3) | changed
        other = counter_uniform(keys["seed"], keys["epoch"], index, 8, keys["stream"])
        assert (other != u).float().mean() > 0.99


# block_mask (images) -------------------------------------------------------------------------

def _boundary_fraction(mask: torch.Tensor, grid: tuple[int, int]) -> float:
    """Fraction of neighbouring patch pairs with one masked and one visible patch."""
    m = mask.view(-1, *grid)
    horizontal = (m[:, :, 1:] != m[:, :, :-1]).float().mean()
    vertical = (m[:, 1:] != m[:, :-1]).float().mean()
    return float(horizontal + vertical) / 2


def test_block_mask_matches_beit_statistics_14x14():
    mask = block_mask(_fresh_indices(2048), seed=0, epoch=0, grid=(14, 14), num_masked=120)
    assert mask.shape == (2048, 196) and mask.dtype == torch.bool
    counts = mask.sum(dim=1)
    assert int(counts.min()) >= 120
    assert 0.61 <= float(counts.float().mean()) / 196 <= 0.62
    # i.i.d. masking at p = 0.61 would give 2 p (1 - p) = 0.48: blocks give far fewer boundaries.
    assert _boundary_fraction(mask, (14, 14)) < 0.3


def test_block_mask_small_grid_7x7():
    mask = block_mask(_fresh_indices(2048), seed=5, epoch=2, grid=(7, 7), num_masked=29,
                      min_block=4)
    counts = mask.sum(dim=1)
    assert int(counts.min()) >= 29
    assert 0.58 <= float(counts.float().mean()) / 49 <= 0.61


def test_block_mask_respects_max_block_and_rectangular_grid():
    mask = block_mask(_fresh_indices(256), seed=1, epoch=0, grid=(8, 12), num_masked=50,
                      min_block=4, max_block=9)
    assert mask.shape == (256, 96)
    assert int(mask.sum(dim=1).min()) >= 50


def test_block_mask_is_independent_of_batch_composition():
    index = _fresh_indices(64)
    full = block_mask(index, seed=4, epoch=1, grid=(14, 14), num_masked=120)
    perm = torch.randperm(64)
    assert torch.equal(block_mask(index[perm], seed=4, epoch=1, grid=(14, 14),
                                  num_masked=120), full[perm])
    assert torch.equal(block_mask(index[10:13], seed=4, epoch=1, grid=(14, 14),
                                  num_masked=120), full[10:13])
    other_epoch = block_mask(index, seed=4, epoch=2, grid=(14, 14), num_masked=120)
    assert (other_epoch != full).any(dim=1).all()


def test_block_mask_is_fast_for_a_batch():
    index = _fresh_indices(256)
    block_mask(index, seed=0, epoch=0, grid=(14, 14), num_masked=120)  # warm-up
    start = time.perf_counter()
    block_mask(index, seed=0, epoch=1, grid=(14, 14), num_masked=120)
    assert time.perf_counter() - start < 0.5


def test_block_mask_rejects_impossible_requests():
    with pytest.raises(UserError):
        block_mask(torch.arange(2), seed=0, epoch=0, grid=(4, 4), num_masked=17)


# span_mask (audio) ---------------------------------------------------------------------------

def test_span_mask_masks_49_percent_of_long_rows():
    lengths = torch.full((512,), 1000)
    mask = span_mask(_fresh_indices(512), lengths, seed=0, epoch=0, num_frames=1000,
                     same_count=False)
    # 65 distinct starts among 990, 10 frames each: 1 - (1 - 65/990)^10 = 0.493 away from the
    # row ends, a little less near them.
    assert abs(float(mask.float().mean()) - 0.493) < 0.01


def test_span_mask_equal_counts_and_nothing_in_padding():
    lengths = torch.randint(200, 801, (256,))
    lengths[0] = 800
    mask = span_mask(_fresh_indices(256), lengths, seed=1, epoch=3, num_frames=800)
    counts = mask.sum(dim=1)
    assert (counts == counts[0]).all() and int(counts[0]) > 0
    frames = torch.arange(800)
    assert not (mask & (frames >= lengths[:, None])).any()


def test_span_mask_runs_are_whole_spans():
    lengths = torch.randint(50, 401, (128,))
    mask = span_mask(_fresh_indices(128), lengths, seed=2, epoch=0, num_frames=400,
                     same_count=False)
    for row, length in zip(mask, lengths.tolist()):
        runs = _runs(row)
        assert runs, "every row has at least min_masks spans"
        for start, size in runs:
            assert size >= 10 or start + size == length, (start, size, length)


@pytest.mark.parametrize("length", [0, 1, 5, 10, 11, 15, 20])
def test_span_mask_short_rows(length):
    lengths = torch.full((64,), length)
    mask = span_mask(_fresh_indices(64), lengths, seed=0, epoch=0, num_frames=30,
                     same_count=False)
    assert not mask[:, length:].any()
    assert bool(mask.any(dim=1).all()) == (length > 0)


def test_span_mask_is_independent_of_batch_composition():
    index = _fresh_indices(32)
    lengths = torch.randint(100, 301, (32,))
    full = span_mask(index, lengths, seed=7, epoch=0, num_frames=300, same_count=False)
    part = span_mask(index[5:9], lengths[5:9], seed=7, epoch=0, num_frames=320,
                     same_count=False)
    assert torch.equal(part[:, :300], full[5:9]) and not part[:, 300:].any()
    other_epoch = span_mask(index, lengths, seed=7, epoch=1, num_frames=300, same_count=False)
    assert (other_epoch != full).any(dim=1).all()


# bert_mask (text) ----------------------------------------------------------------------------

def _text_batch(batch: int, steps: int, vocab: int = 1000):
    """Random `<s> ... </s> <pad>...` rows: ids, special flags."""
    lengths = torch.randint(3, steps + 1, (batch,))
    tokens = torch.randint(5, vocab, (batch, steps))
    positions = torch.arange(steps)
    tokens[:, 0] = 0
    tokens[positions[None] == (lengths - 1)[:, None]] = 2
    tokens[positions[None] >= lengths[:, None]] = 1
    return tokens, tokens <= 4


def test_bert_mask_selection_and_split():
    tokens, special = _text_batch(2048, 128)
    inputs, selected = bert_mask(_fresh_indices(2048), tokens, special, seed=0, epoch=0,
                                 mask_id=4, random_range=(5, 1000))
    ordinary = (~special).sum(dim=1)
    counts = selected.sum(dim=1)
    low = torch.floor(0.15 * ordinary.double()).long().clamp(min=1)
    assert ((counts >= low) & (counts <= low + 1)).all()
    assert abs(float(counts.sum() / ordinary.sum()) - 0.15) < 0.003
    assert not (selected & special).any()
    assert torch.equal(inputs[~selected], tokens[~selected])
    chosen, original = inputs[selected], tokens[selected]
    replaced = (chosen == 4).float().mean()
    randomised = (chosen != original) & (chosen != 4)
    assert abs(float(replaced) - 0.8) < 0.01
    assert abs(float(randomised.float().mean()) - 0.1) < 0.01
    assert ((chosen >= 5) & (chosen < 1000) | (chosen == 4)).all()


def test_bert_mask_tiny_rows():
    tokens = torch.tensor([[0, 2, 1, 1], [0, 7, 2, 1], [0, 7, 8, 2]])
    inputs, selected = bert_mask(_fresh_indices(3), tokens, tokens <= 4, seed=0, epoch=0,
                                 mask_id=4, random_range=(5, 10))
    assert selected.sum(dim=1).tolist()[:2] == [0, 1] and int(selected[2].sum()) >= 1
    assert torch.equal(inputs[:, 0], tokens[:, 0])


def test_bert_mask_is_independent_of_batch_composition_and_padding_width():
    tokens, special = _text_batch(16, 40)
    index = _fresh_indices(16)
    kwargs = dict(seed=3, epoch=0, mask_id=4, random_range=(5, 1000))
    inputs, selected = bert_mask(index, tokens, special, **kwargs)
    wide = torch.cat([tokens[3:6], torch.ones(3, 8, dtype=torch.long)], dim=1)
    wide_in, wide_sel = bert_mask(index[3:6], wide, wide <= 4, **kwargs)
    assert torch.equal(wide_sel[:, :40], selected[3:6]) and not wide_sel[:, 40:].any()
    assert torch.equal(wide_in[:, :40], inputs[3:6])
    _, other_epoch = bert_mask(index, tokens, special, **kwargs | dict(epoch=1))
    assert not torch.equal(other_epoch, selected)


# data2vec 2.0 masks --------------------------------------------------------------------------

@pytest.mark.parametrize("grid, prob, length, adjust, inverse, visible", [
    ((14, 14), 0.8, 3, 0.07, True, 39),     # the base recipe: 39 of 196 patches kept
    ((14, 14), 0.75, 3, 0.1, True, 49),     # the large recipe
    ((7, 7), 0.8, 2, 0.07, True, 9),        # default_v2 on Fashion-MNIST
    ((8, 12), 0.6, 3, 0.0, False, 39),      # non-square, blocks masked
])
def test_block_mask_2d_hits_its_exact_visible_count(grid, prob, length, adjust, inverse, visible):
    mask = block_mask_2d(_fresh_indices(256), seed=3, epoch=1, grid=grid, clones=5, prob=prob,
                         length=length, adjust=adjust, inverse=inverse)
    assert mask.shape == (256, 5, grid[0] * grid[1]) and mask.dtype == torch.bool
    assert torch.equal((~mask).sum(-1), torch.full((256, 5), visible))
    # Clones of one image differ, and every patch is visible somewhere (no position is special).
    assert (mask[:, 0] != mask[:, 1]).any(-1).float().mean() > 0.9
    freq = (~mask).float().mean((0, 1))
    assert float(freq.min()) > 0.25 * visible / mask.shape[-1]


def test_block_mask_2d_inverse_keeps_blocks():
    """Inverse masking keeps square blocks: visible patches cluster (more than random kept sets)."""
    mask = block_mask_2d(_fresh_indices(512), seed=0, epoch=0, grid=(14, 14), clones=2, prob=0.8,
                         length=3, adjust=0.07, inverse=True)
    shuffled = mask[..., torch.randperm(196)]
    assert _boundary_fraction(mask.flatten(0, 1), (14, 14)) < 0.6 * _boundary_fraction(
        shuffled.flatten(0, 1), (14, 14))


def test_block_mask_1d_exact_counts_spans_and_padding():
    index = _fresh_indices(300)
    lengths = torch.randint(1, 120, (300,))
    mask = block_mask_1d(index, lengths, seed=1, epoch=0, num_frames=120, clones=3, prob=0.5, span=5,
                         adjust=0.05)
    assert mask.shape == (300, 3, 120)
    assert torch.equal(mask.sum(-1), (lengths * 0.5).floor().long()[:, None].expand(-1, 3))
    steps = torch.arange(120)
    assert not (mask & (steps >= lengths[:, None, None])).any()    # never in the padding
    long_rows = mask[lengths > 60].flatten(0, 1)
    runs = [n for row in long_rows[:100] for _, n in _runs(row)]
    assert sum(runs) / len(runs) > 3.0                              # spans, not single frames


def test_random_mask_counts_and_specials():
    tokens = 40
    special = torch.zeros(64, tokens, dtype=torch.bool)
    lengths = torch.randint(3, tokens + 1, (64,))
    special |= torch.arange(tokens)[None] >= lengths[:, None] - 1   # </s> and padding
    special[:, 0] = True                                             # <s>
    mask = random_mask(_fresh_indices(64), special, seed=2, epoch=0, clones=4, prob=0.48)
    ordinary = (~special).sum(-1)
    assert torch.equal(mask.sum(-1), (ordinary - (ordinary * 0.52).floor().long())[:, None].expand(-1, 4))
    assert not (mask & special[:, None]).any()


@pytest.mark.parametrize("draw", ["2d", "1d", "random"])
def test_v2_masks_are_pure_functions_of_sample_and_clone(draw):
    """A clone's mask depends on (seed, epoch, sample, clone) only: not on M, the batch or its order."""
    index = _fresh_indices(24)

    def masks(idx: torch.Tensor, clones: int, seed: int = 4, epoch: int = 2) -> torch.Tensor:
        if draw == "2d":
            return block_mask_2d(idx, seed=seed, epoch=epoch, grid=(14, 14), clones=clones, prob=0.8,
                                 length=3, adjust=0.07, inverse=True)
        if draw == "1d":
            return block_mask_1d(idx, torch.full((len(idx),), 90), seed=seed, epoch=epoch, num_frames=90,
                                 clones=clones, prob=0.5, span=5, adjust=0.05)
        return random_mask(idx, torch.zeros(len(idx), 50, dtype=torch.bool), seed=seed, epoch=epoch,
                           clones=clones, prob=0.48)

    full = masks(index, 8)
    perm = torch.randperm(24)
    assert torch.equal(masks(index[perm], 8), full[perm])
    assert torch.equal(masks(index, 3), full[:, :3])
    assert not torch.equal(masks(index, 8, epoch=3), full)
    assert not torch.equal(masks(index, 8, seed=5), full)


def test_v2_masks_refuse_impossible_requests():
    with pytest.raises(UserError, match="mask.prob"):
        block_mask_2d(torch.arange(2), seed=0, epoch=0, grid=(2, 2), clones=1, prob=0.9, length=2,
                      inverse=True)
    with pytest.raises(UserError):
        random_mask(torch.arange(2), torch.zeros(2, 5, dtype=torch.bool), seed=0, epoch=0, clones=0, prob=0.5)
