"""Masks for the student, one vectorised function per strategy, computed in the data collate.

Every random number is a pure function of (seed, epoch, sample index, draw counter, stream), drawn
from a counter-based hash (`counter_uniform`) rather than a stateful generator. A sample's mask
therefore never depends on which other samples share its batch, on the batch order, on the number of
data-loader workers or ranks, or on how far a resumed run has advanced: only the audio `same_count`
equalisation looks across the batch, on purpose. Each strategy draws from its own streams, so adding
a draw to one never shifts another's.

- images: `block_mask`, BEiT's block-wise generator (data2vec 1.0 vision, ~60% of the patches);
- audio: `span_mask`, fixed-length spans with random starts (fairseq `compute_mask_indices`, 1.0);
- text: `bert_mask`, BERT's 15% selection with 80/10/10 replacement.

data2vec 2.0 masks M copies ("clones") of every sample, each with an exact masked count, so that
the student can encode the visible tokens as a dense batch. They return [B, M, T] bool (clone j of
sample b draws its own numbers: counters j * n .. j * n + n - 1 of the sample's streams, so a
clone's mask does not depend on M):

- images: `block_mask_2d`, fairseq's `compute_block_mask_2d` (inverse: the blocks are what is kept);
- audio: `block_mask_1d`, fairseq's `compute_block_mask_1d` (centred spans);
- text: `random_mask`, MAE's random masking of a fixed fraction of the ordinary tokens.
"""

import math

import torch
from torch import Tensor

from d2v_engine.errors import UserError

_M32 = 0xFFFFFFFF
_BIG_KEY = 1 << 32  # sorts after every 32-bit hash value: marks a candidate that may not be drawn
_BLOCK_ATTEMPTS = 10  # BEiT tries this many blocks per round before giving the round up
_BLOCK_MAX_ROUNDS = 100  # 14x14/120 needs at most ~25 rounds; this only bounds impossible cases

# Stream tags, one per kind of draw; block rounds add the round number to theirs.
_STREAM_BLOCK = 1 << 20
_STREAM_SPAN_COUNT = 2 << 20
_STREAM_SPAN_START = 3 << 20
_STREAM_SPAN_EQUALISE = 4 << 20
_STREAM_BERT_COUNT = 5 << 20
_STREAM_BERT_PICK = 6 << 20
_STREAM_BERT_ACTION = 7 << 20
_STREAM_BERT_TOKEN = 8 << 20
_STREAM_BLOCK_CENTRE = 9 << 20
_STREAM_BLOCK_EXACT = 10 << 20
_STREAM_RANDOM_PICK = 11 << 20


def _mul32(x, c: int):
    """(x * c) mod 2**32 for 32-bit x (int or int64 tensor), without int64 overflow.

    Splitting x into 16-bit halves keeps every product below 2**49, so the arithmetic is exact on
    int64 tensors (a plain x * c could reach 2**64 and wrap).
    """
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """lowbias32 finaliser (C. Wellons' hash-prospector): a well-mixing bijection of 32-bit words.

    Values stay in [0, 2**32), so int64 right shifts are logical shifts.
    """
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _stream_key(seed: int, epoch: int, stream: int) -> int:
    """Absorbs (seed, epoch, stream), 64 bits each, into one 32-bit key (plain Python ints)."""
    key = 0x243F6A88
    for value in (seed, epoch, stream):
        key = _mix32(key ^ (value & _M32))
        key = _mix32(key ^ ((value >> 32) & _M32))
    return key


def counter_bits(seed: int, epoch: int, index: Tensor, n: int, stream: int) -> Tensor:
    """Random 32-bit words, a pure function of (seed, epoch, index[b], j, stream).

    Args:
        seed, epoch, stream: integers (any size; 64 bits of each are used).
        index: [B] int64 global sample indices.
        n: number of draws per sample (the counter j runs over 0..n-1).

    Returns:
        [B, n] int64 in [0, 2**32).
    """
    key = _stream_key(seed, epoch, stream)
    index = index.to(torch.int64).reshape(-1)
    sample = _mix32(_mix32(key ^ (index & _M32)) ^ ((index >> 32) & _M32))
    # A Weyl sequence spreads consecutive counters over the word before the two mixing rounds.
    counter = _mul32(torch.arange(n, dtype=torch.int64, device=index.device), 0x9E3779B9)
    return _mix32(_mix32((sample[:, None] + counter[None, :]) & _M32))


def counter_uniform(seed: int, epoch: int, index: Tensor, n: int, stream: int) -> Tensor:
    """Uniform numbers in [0, 1), a pure function of (seed, epoch, index[b], j, stream).

    Args:
        seed, epoch, stream: integers; different streams give independent numbers.
        index: [B] int64 global sample indices.
        n: number of draws per sample.

    Returns:
        [B, n] float32 in [0, 1), with 24 random bits each (exactly representable).
    """
    return (counter_bits(seed, epoch, index, n, stream) >> 8).to(torch.float32) * 2.0**-24


def _uniform_f64(seed: int, epoch: int, index: Tensor, n: int, stream: int) -> Tensor:
    # float64 so that u * n never rounds up to n in the integer draws below.
    return counter_uniform(seed, epoch, index, n, stream).to(torch.float64)


def _first_k(keys: Tensor, k: Tensor) -> Tensor:
    """The k[b] candidates with the smallest keys in each row (draw without replacement).

    Args:
        keys: [B, N] int64; candidates that may not be drawn hold `_BIG_KEY`.
        k: [B] int64 number to draw per row (at most the number of drawable candidates).

    Returns:
        [B, N] bool, True = drawn.
    """
    order = keys.argsort(dim=1, stable=True)  # stable: ties (p ~ 2**-32) break by position
    ranks = torch.arange(keys.shape[1], device=keys.device).expand_as(keys)
    return torch.zeros_like(keys, dtype=torch.bool).scatter_(1, order, ranks < k[:, None])


def block_mask(index: Tensor, *, seed: int, epoch: int, grid: tuple[int, int], num_masked: int,
               min_block: int = 16, max_block: int = 0, min_aspect: float = 0.3) -> Tensor:
    """BEiT block-wise masking of image patches (data2vec 1.0 vision: 14x14 grid, 120 patches).

    Rounds repeat until a row has `num_masked` patches. In each round a row tries up to 10
    rectangles: area ~ U(min_block, cap) with cap = min(num_masked - count, max_block or H*W),
    aspect ~ exp(U(log min_aspect, -log min_aspect)), h = round(sqrt(area * aspect)) < H,
    w = round(sqrt(area / aspect)) < W, random top/left; the first one adding between 1 and cap new
    patches is kept, so a row never passes `num_masked`. Unlike BEiT, a round that adds nothing
    does not end the row (BEiT then stops short of 120 on ~30% of 14x14 masks): the next round
    draws afresh, up to a round limit (100) that only impossible requests reach.

    Args:
        index: [B] int64 global sample indices.
        seed, epoch: run seed and epoch number.
        grid: (H, W) patches.
        num_masked: patches to mask per image.
        min_block: smallest block area in patches.
        max_block: largest block area; 0 = no limit beyond the number still to mask.
        min_aspect: smallest block aspect ratio (the largest is its inverse).

    Returns:
        [B, H*W] bool, row-major patches, True = masked.
    """
    height, width = grid
    if not 0 < num_masked <= height * width:
        raise UserError(f"cannot mask {num_masked} patches of a {height}x{width} grid; "
                        "lower mask.prob.")
    if not 0 < min_aspect <= 1 or min_block < 1:
        raise UserError("mask.min_aspect must lie in (0, 1] and mask.min_block must be positive.")
    area_cap = max_block if max_block > 0 else height * width
    mask = torch.zeros(index.numel(), height, width, dtype=torch.bool, device=index.device)
    count = torch.zeros(index.numel(), dtype=torch.int64, device=index.device)
    for round_ in range(_BLOCK_MAX_ROUNDS):
        todo = count < num_masked
        if not bool(todo.any()):
            break
        cap = (num_masked - count).clamp(max=area_cap)
        draws = _uniform_f64(seed, epoch, index, 4 * _BLOCK_ATTEMPTS, _STREAM_BLOCK + round_)
        box, added = _block_round(mask, draws.view(-1, _BLOCK_ATTEMPTS, 4), cap, todo,
                                  min_block, min_aspect)
        mask |= box
        count += added
    return mask.view(index.numel(), height * width)


def _draw_blocks(draws: Tensor, cap: Tensor, grid: tuple[int, int], min_block: int,
                 min_aspect: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Candidate rectangles of one round, drawn as BEiT does.

    Args:
        draws: [B, A, 4] float64 uniforms (area, aspect, top, left) per attempt.
        cap: [B] int64 most new patches a block may add.
        grid: (H, W) patches.

    Returns:
        (top, left, h, w) [B, A] int64, and fits [B, A] bool (h < H and w < W; the other
        attempts are void and their top/left meaningless).
    """
    height, width = grid
    area = min_block + (cap[:, None] - min_block) * draws[..., 0]
    log_aspect = math.log(min_aspect) * (1 - 2 * draws[..., 1])
    h = torch.round(torch.sqrt(area * torch.exp(log_aspect))).long()
    w = torch.round(torch.sqrt(area * torch.exp(-log_aspect))).long()
    fits = (h < height) & (w < width)
    # randint(0, H - h), both ends included; the clamp keeps void attempts in range.
    top = (draws[..., 2] * (height - h + 1).clamp(min=1)).long()
    left = (draws[..., 3] * (width - w + 1).clamp(min=1)).long()
    return top, left, h.clamp(max=height), w.clamp(max=width), fits


def _block_round(mask: Tensor, draws: Tensor, cap: Tensor, todo: Tensor, min_block: int,
                 min_aspect: float) -> tuple[Tensor, Tensor]:
    """One round of `block_mask`: all attempts at once, keeping each row's first acceptable one.

    The mask changes only when an attempt is accepted, which ends the round, so evaluating the
    attempts in parallel against the same mask is exactly the sequential recipe.

    Args:
        mask: [B, H, W] bool current mask.
        draws: [B, A, 4] float64 uniforms (area, aspect, top, left) per attempt.
        cap: [B] int64 most new patches a block may add.
        todo: [B] bool rows still below their target.

    Returns:
        ([B, H, W] bool block to add (all False for rows without one), [B] int64 patches added).
    """
    batch, height, width = mask.shape
    top, left, h, w, fits = _draw_blocks(draws, cap, (height, width), min_block, min_aspect)
    # Unmasked patches inside each rectangle from a summed-area table: four lookups per attempt
    # instead of painting B x A x H x W boxes.
    table = torch.nn.functional.pad((~mask).long().cumsum(1).cumsum(2), (1, 0, 1, 0))
    flat = table.view(batch, -1)

    def corner(r: Tensor, c: Tensor) -> Tensor:
        return flat.gather(1, r * (width + 1) + c)

    new = (corner(top + h, left + w) - corner(top, left + w) - corner(top + h, left)
           + corner(top, left))
    ok = todo[:, None] & fits & (new > 0) & (new <= cap[:, None])
    accepted = ok.any(dim=1)
    first = ok.long().argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    top, left, h, w = (t.gather(1, first) for t in (top, left, h, w))  # each [B, 1]
    rows = torch.arange(height, device=mask.device).view(1, height, 1)
    cols = torch.arange(width, device=mask.device).view(1, 1, width)
    box = ((rows >= top[..., None]) & (rows < (top + h)[..., None])
           & (cols >= left[..., None]) & (cols < (left + w)[..., None]))
    box &= accepted[:, None, None]
    return box, torch.where(accepted, new.gather(1, first)[:, 0], 0)


def span_mask(index: Tensor, lengths: Tensor, *, seed: int, epoch: int, num_frames: int,
              prob: float = 0.65, span: int = 10, min_masks: int = 1,
              same_count: bool = True) -> Tensor:
    """Span masking of audio frames (fairseq `compute_mask_indices` of data2vec 1.0, static spans).

    A row with L valid frames draws num = max(min_masks, int(prob * L / span + u)) distinct span
    starts from [0, L - span); each start masks `span` frames, clipped at L. When that range is
    too short (L - span <= num), fairseq draws from [0, num] instead; here from [0, min(num + 1, L))
    (and at most that many starts), so no span starts in the padding and a row with L >= 1 always
    gets a masked frame. Spans may overlap, so ~49% of the frames are masked at prob 0.65, span 10.

    Args:
        index: [B] int64 global sample indices.
        lengths: [B] int64 valid frames per row (the rest is padding, never masked).
        seed, epoch: run seed and epoch number.
        num_frames: T, frames per row of the output.
        prob: expected fraction of frames that start a span, times `span`.
        span: span length in frames.
        min_masks: fewest spans per row.
        same_count: keep, in every row, a random subset of its masked frames as large as the
            smallest row's count (the only draw that looks across the batch: equal counts let the
            model gather masked frames into a dense tensor).

    Returns:
        [B, T] bool, True = masked.
    """
    lengths = lengths.to(torch.int64).reshape(-1)
    if lengths.numel() != index.numel() or bool(((lengths < 0) | (lengths > num_frames)).any()):
        raise ValueError(f"lengths must be {index.numel()} values in [0, {num_frames}]")
    if span < 1 or not 0 < prob <= 1:
        raise UserError("mask.length must be positive and mask.prob must lie in (0, 1].")
    if index.numel() == 0:
        return torch.zeros(0, num_frames, dtype=torch.bool, device=index.device)
    u = _uniform_f64(seed, epoch, index, 1, _STREAM_SPAN_COUNT)[:, 0]
    num = torch.floor(prob * lengths / span + u).long().clamp(min=min_masks)
    num_starts = torch.where(lengths - span > num, lengths - span, torch.minimum(num + 1, lengths))
    num = torch.minimum(num, num_starts)
    positions = torch.arange(num_frames, device=index.device)  # num_starts <= L <= num_frames
    keys = counter_bits(seed, epoch, index, num_frames, _STREAM_SPAN_START)
    keys = torch.where(positions < num_starts[:, None], keys, _BIG_KEY)
    starts = _first_k(keys, num)
    # Frame t is covered iff a start lies in (t - span, t]: a difference of running start counts.
    running = starts.long().cumsum(dim=1)
    before = torch.nn.functional.pad(running, (span, 0))[:, :num_frames]
    mask = (running - before > 0) & (positions < lengths[:, None])
    if same_count:
        mask = _equalise_counts(mask, index, seed, epoch)
    return mask


def _equalise_counts(mask: Tensor, index: Tensor, seed: int, epoch: int) -> Tensor:
    """Keeps a random subset of each row's masked frames, as many as the smallest row has.

    Args:
        mask: [B, T] bool.
        index: [B] int64 global sample indices.

    Returns:
        [B, T] bool with the same number of True in every row.
    """
    smallest = mask.sum(dim=1).min()
    keys = counter_bits(seed, epoch, index, mask.shape[1], _STREAM_SPAN_EQUALISE)
    keys = torch.where(mask, keys, _BIG_KEY)
    return _first_k(keys, smallest.expand(mask.shape[0]))


def bert_mask(index: Tensor, tokens: Tensor, special: Tensor, *, seed: int, epoch: int,
              mask_id: int, random_range: tuple[int, int], prob: float = 0.15,
              replace_prob: float = 0.8, random_prob: float = 0.1) -> tuple[Tensor, Tensor]:
    """BERT masking: select exactly int(prob * n + u) of a row's n ordinary tokens (at least one).

    Each selected token independently becomes `<mask>` with probability replace_prob, a uniformly
    random id from random_range with probability random_prob, and stays unchanged otherwise; all
    selected positions carry the loss.

    Args:
        index: [B] int64 global sample indices.
        tokens: [B, T] int64 token ids.
        special: [B, T] bool, True = never selected (<s>, </s>, <pad>, ...).
        seed, epoch: run seed and epoch number.
        mask_id: id of `<mask>`.
        random_range: (lo, hi): random replacements are drawn from [lo, hi).
        prob, replace_prob, random_prob: selected fraction and the replacement split.

    Returns:
        (inputs [B, T] int64 student input, selected [B, T] bool True = selected).
    """
    if tokens.shape != special.shape or tokens.dim() != 2 or tokens.shape[0] != index.numel():
        raise ValueError(f"tokens {tuple(tokens.shape)} and special {tuple(special.shape)} must "
                         f"both be [B, T] with B = {index.numel()}")
    low, high = random_range
    if high <= low:
        raise ValueError(f"random_range {random_range} is empty")
    num_tokens = tokens.shape[1]
    ordinary = (~special).sum(dim=1)
    u = _uniform_f64(seed, epoch, index, 1, _STREAM_BERT_COUNT)[:, 0]
    count = torch.floor(prob * ordinary + u).long()
    count = torch.maximum(count, ordinary.clamp(max=1)).clamp(max=ordinary)
    keys = counter_bits(seed, epoch, index, num_tokens, _STREAM_BERT_PICK)
    selected = _first_k(torch.where(special, _BIG_KEY, keys), count)
    action = counter_uniform(seed, epoch, index, num_tokens, _STREAM_BERT_ACTION)
    token_bits = counter_bits(seed, epoch, index, num_tokens, _STREAM_BERT_TOKEN)
    random_ids = low + token_bits % (high - low)
    replace = selected & (action < replace_prob)
    randomise = selected & ~replace & (action < replace_prob + random_prob)
    inputs = torch.where(replace, mask_id, tokens)
    inputs = torch.where(randomise, random_ids, inputs)
    return inputs, selected


# ---------------------------------------------------------------------------------- data2vec 2.0

def _clone_bits(seed: int, epoch: int, index: Tensor, clones: int, n: int, stream: int) -> Tensor:
    """[B * M, n] random words: row b * M + j holds counters j * n .. j * n + n - 1 of sample b."""
    return counter_bits(seed, epoch, index, clones * n, stream).view(-1, n)


def _exact_count(painted: Tensor, valid: Tensor, target: Tensor, bits: Tensor) -> Tensor:
    """Exactly target[r] steps per row: a random subset of the painted ones, topped up with random
    unpainted valid steps when there are too few (fairseq's `require_same_masks` adjustment).

    Args:
        painted: [R, T] bool; valid: [R, T] bool (never chosen outside); target: [R] int64, at most
        the row's valid count; bits: [R, T] random words.
    Returns:
        [R, T] bool with target[r] True entries per row, all valid.
    """
    tier = torch.where(painted, 0, 1 << 32) + torch.where(valid, 0, 1 << 34)
    return _first_k(bits + tier, target)


def _paint(centres: Tensor, lengths: Tensor, span: int) -> list[Tensor]:
    """Steps covered by centred spans of `span` steps, clamped into [0, length): one tensor per offset."""
    offset = span // 2
    return [(centres + k - offset).clamp(min=0).minimum(lengths[:, None] - 1) for k in range(span)]


def block_mask_1d(index: Tensor, lengths: Tensor, *, seed: int, epoch: int, num_frames: int,
                  clones: int, prob: float, span: int, adjust: float = 0.0,
                  inverse: bool = False) -> Tensor:
    """data2vec 2.0 audio masking (fairseq `compute_block_mask_1d`, overlapping spans).

    A row with L valid frames draws int(L * (p + adjust) / span) centres uniformly (with
    replacement), masks a span of `span` frames around each (offsets -span//2 .. span - 1 - span//2,
    clamped into the clip), then removes random masked frames or adds random unmasked ones until
    exactly int(L * p) are masked. p = prob, or 1 - prob with `inverse` (the spans are then what is
    kept). Padding is never masked.

    Args:
        index: [B] int64 global sample indices.
        lengths: [B] int64 valid frames per sample (the rest of the T = num_frames is padding).
        seed, epoch: run seed and epoch number.
        num_frames: T.
        clones: M masks per sample.
        prob, span, adjust, inverse: as above (`mask.prob`, `mask.length`, `mask.adjust`, `mask.inverse`).
    Returns:
        [B, M, T] bool, True = masked; every row of sample b masks the same number of frames.
    """
    lengths = lengths.to(torch.int64).reshape(-1)
    if lengths.numel() != index.numel() or bool(((lengths < 0) | (lengths > num_frames)).any()):
        raise ValueError(f"lengths must be {index.numel()} values in [0, {num_frames}]")
    if span < 1 or not 0 < prob < 1 or clones < 1:
        raise UserError("mask.length and method.clones must be positive and mask.prob must lie in (0, 1).")
    batch = index.numel()
    p = 1.0 - prob if inverse else prob
    rows = lengths.repeat_interleave(clones)                                   # [R]
    most = max(1, int(num_frames * (p + adjust) / span))
    count = torch.floor(rows * (p + adjust) / span).long()                     # fairseq's int(): floor
    u = counter_uniform(seed, epoch, index, clones * most, _STREAM_BLOCK_CENTRE).view(-1, most)
    centres = (u.double() * rows[:, None]).long()
    steps = torch.arange(num_frames, device=index.device)
    painted = torch.zeros(batch * clones, num_frames + 1, dtype=torch.bool, device=index.device)
    drawn = torch.arange(most, device=index.device)[None, :] < count[:, None]
    for at in _paint(centres, rows.clamp(min=1), span):
        painted.scatter_(1, torch.where(drawn, at, num_frames), True)          # void draws -> column T
    valid = steps[None, :] < rows[:, None]
    bits = _clone_bits(seed, epoch, index, clones, num_frames, _STREAM_BLOCK_EXACT)
    chosen = _exact_count(painted[:, :num_frames] & valid, valid, torch.floor(rows * p).long(), bits)
    mask = (valid & ~chosen) if inverse else chosen
    return mask.view(batch, clones, num_frames)


def block_mask_2d(index: Tensor, *, seed: int, epoch: int, grid: tuple[int, int], clones: int,
                  prob: float, length: int, adjust: float = 0.0, inverse: bool = False) -> Tensor:
    """data2vec 2.0 image masking (fairseq `compute_block_mask_2d`): square blocks, exact counts.

    With L = H * W patches and p = prob (or 1 - prob with `inverse`), a row draws int(L * (p +
    adjust) / length^2) block centres uniformly (with replacement), paints the length x length block
    around each (clipped at the borders), then removes random painted patches or adds random unpainted
    ones until exactly int(L * p) are painted. Without `inverse` the painted patches are masked; with
    it they are the ones kept, so every row has exactly int(L * (1 - prob)) visible patches
    (base recipe: prob 0.8, adjust 0.07, length 3 -> 5 blocks, 39 of 196 patches visible).

    Args:
        index: [B] int64 global sample indices.
        seed, epoch: run seed and epoch number.
        grid: (H, W) patches.
        clones: M masks per sample.
        prob, length, adjust, inverse: `mask.prob`, `mask.length`, `mask.adjust`, `mask.inverse`.
    Returns:
        [B, M, H*W] bool, row-major patches, True = masked.
    """
    height, width = grid
    if length < 1 or not 0 < prob < 1 or clones < 1:
        raise UserError("mask.length and method.clones must be positive and mask.prob must lie in (0, 1).")
    num = height * width
    p = 1.0 - prob if inverse else prob
    target = int(num * p)
    if not 0 < target < num:
        raise UserError(f"mask.prob={prob} leaves no patch {'kept' if inverse else 'masked'} of a "
                        f"{height}x{width} grid, or no patch at all on the other side; change mask.prob.")
    batch, rows = index.numel(), index.numel() * clones
    count = max(1, int(num * (p + adjust) / length ** 2))
    u = counter_uniform(seed, epoch, index, clones * count, _STREAM_BLOCK_CENTRE).view(rows, count)
    centre = (u.double() * num).long()
    top, left = centre // width, centre % width
    painted = torch.zeros(rows, num, dtype=torch.bool, device=index.device)
    for r in _paint(top, torch.full((rows,), height, device=index.device), length):
        for c in _paint(left, torch.full((rows,), width, device=index.device), length):
            painted.scatter_(1, r * width + c, True)
    valid = torch.ones_like(painted)
    bits = _clone_bits(seed, epoch, index, clones, num, _STREAM_BLOCK_EXACT)
    chosen = _exact_count(painted, valid, torch.full((rows,), target, device=index.device), bits)
    return (~chosen if inverse else chosen).view(batch, clones, num)


def random_mask(index: Tensor, special: Tensor, *, seed: int, epoch: int, clones: int,
                prob: float) -> Tensor:
    """data2vec 2.0 text masking (MAE's random masking): of a row's n ordinary tokens, keep a random
    int(n * (1 - prob)) and mask the rest; special tokens (<s>, </s>, padding) are never masked.

    Args:
        index: [B] int64 global sample indices.
        special: [B, T] bool, True = never masked.
        seed, epoch: run seed and epoch number.
        clones: M masks per sample.
        prob: masked fraction (fairseq 0.48).
    Returns:
        [B, M, T] bool, True = masked (the student never sees these tokens).
    """
    if not 0 < prob < 1 or clones < 1:
        raise UserError("method.clones must be positive and mask.prob must lie in (0, 1).")
    batch, steps = special.shape
    if batch != index.numel():
        raise ValueError(f"special is {tuple(special.shape)}, expected {index.numel()} rows")
    special = special.repeat_interleave(clones, dim=0)
    ordinary = (~special).sum(dim=1)
    masked = ordinary - torch.floor(ordinary * (1.0 - prob)).long()
    bits = _clone_bits(seed, epoch, index, clones, steps, _STREAM_RANDOM_PICK)
    return _first_k(torch.where(special, _BIG_KEY, bits), masked).view(batch, clones, steps)
