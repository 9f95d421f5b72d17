"""Token sampling on the device: the one sampler of every entry point, on cpu and GPU, eager or captured.

Order, as Hugging Face applies its processors: repetition penalty (over
prompt + generated ids) -> temperature -> top-k -> top-p -> min-p -> draw.
Temperature 0 is greedy: exactly argmax of the (penalized) logits.

The draw is counter-based inverse-CDF sampling: one uniform u per token,
the first word of Philox-4x32-10 keyed by the request's 64-bit seed at
counter (0, step, 0, 0), `step` being the index of the token drawn (0 for the
first) -- Triton's `tl.rand(seed, step << 32)` -- picks the first token whose
cumulative probability (float64, in vocabulary order) exceeds u times the
total. A row's token depends only on its logits, its seed and its step: not
on the rest of the batch, the entry point, a preemption, or whether a graph
replayed it. There is no generator state: seeds and steps are tensors, so the
decode graphs capture `draw` and replay it with the next step's. One uniform
per token keeps the draw to a handful of row-wise passes over the logits
(a Gumbel-max draw would need a Philox word per vocabulary entry: ~130 torch
ops over [B, V]). An unseeded request is given a random seed when it is
added.

`draw` (greedy and temperature only) is pure tensor work with no host sync,
captured inside the decode graphs, as is a grammar's token bitmask applied
before it (`apply_token_bitmask`: one masked op over the batch, rows without a
grammar all ones; token_bitmask.py fills it); `sample` does everything (it
calls `draw` last, so a row that needs none of its extras gets the same token
either way).
The logprob returned is log_softmax of the penalized logits, before
temperature and truncation: it scores the token under the model, whatever
the sampling knobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_UNIFORM_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float: the largest scale keeping u < 1


def seed_to_int64(seed: int) -> int:
    """Any Python int as the signed 64-bit value with the same low 64 bits (the Philox key)."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def philox_uniform(seeds: torch.Tensor, steps: torch.Tensor, num_cols: int) -> torch.Tensor:
    """u[r, i] in [0, 1) for seeds [R] int64, steps [R] int64: Triton's tl.rand(seeds[r], (steps[r] << 32) | i)
    (`draw` takes i = 0 only)."""
    # int64 lanes hold uint32 values; a product of two wraps modulo 2**64, so its bits are the unsigned product's
    c0 = torch.arange(num_cols, dtype=torch.int64, device=seeds.device)[None, :]  # [1, V]: the token index
    c1 = (steps & _MASK32)[:, None]  # [R, 1]
    c2 = c3 = torch.zeros_like(c1)
    k0, k1 = (seeds & _MASK32)[:, None], ((seeds >> 32) & _MASK32)[:, None]
    for _ in range(10):
        p0, p1 = c2 * _ROUND_B, c0 * _ROUND_A
        c0, c1, c2, c3 = ((p0 >> 32) & _MASK32) ^ c1 ^ k0, p0 & _MASK32, ((p1 >> 32) & _MASK32) ^ c3 ^ k1, p1 & _MASK32
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    x = torch.where(c0 >= 1 << 31, c0 - (1 << 32), c0)  # the word as int32
    x = torch.where(x < 0, -x - 1, x).to(torch.float32)
    return x * _UNIFORM_SCALE  # [R, V]; the scalar is applied as float32 (no tensor made: capturable)


def draw(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Tokens [R] int64: argmax where temperature <= 0, else a draw from softmax(logits / T) by the rows'
    counter-based uniforms. Pure tensor work, no host sync: capturable in a CUDA graph."""
    # logits: [R, V] float32; temperature [R] float32; seeds, steps [R] int64
    is_sampled = temperature > 0
    scale = torch.where(is_sampled, temperature, torch.ones_like(temperature))[:, None]
    cdf = (logits / scale).softmax(dim=-1).double().cumsum(dim=-1)  # [R, V]; float64: u * total < total
    target = philox_uniform(seeds, steps, 1).double() * cdf[:, -1:]  # [R, 1]
    sampled = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=logits.shape[-1] - 1)
    return torch.where(is_sampled, sampled, logits.argmax(dim=-1))


@dataclass
class SamplingBatch:
    """Per-row sampling parameters for a [B, V] logits batch."""
    temperatures: list[float]
    top_ks: list[int]  # 0: off
    top_ps: list[float]  # 1.0: off
    min_ps: list[float]  # 0.0: off
    repetition_penalties: list[float]  # 1.0: off
    token_ids: list[list[int]]  # prompt + generated ids, for the repetition penalty
    seeds: list[int]
    steps: list[int]  # index of the token each row draws
    needs_logprobs: bool = False
    # OpenAI's penalties and biases, per row (empty: all off); they count generated tokens only
    presence_penalties: list[float] = field(default_factory=list)
    frequency_penalties: list[float] = field(default_factory=list)
    num_prompt_tokens: list[int] = field(default_factory=list)
    logit_biases: list[dict[int, float]] = field(default_factory=list)
    banned: list[list[int]] = field(default_factory=list)  # per row: ids masked out (EOS before min_tokens)
    # [B, ceil(V / 32)] int32 on the device: grammars' masks in xgrammar's layout (bit j of word w: token
    # 32 w + j may be drawn), all ones in rows without one (token_bitmask.py)
    token_bitmask: torch.Tensor | None = None

    @property
    def has_extras(self) -> bool:
        return any(self.presence_penalties) or any(self.frequency_penalties) or any(self.logit_biases) \
            or any(self.banned)

    @property
    def is_plain(self) -> bool:
        """Only greedy and temperature, and perhaps a grammar's bitmask: `apply_token_bitmask` then `draw` give
        its tokens (what the decode graphs capture)."""
        return not self.needs_logprobs and not self.has_extras and all(
            k == 0 and p == 1.0 and m == 0.0 and r == 1.0
            for k, p, m, r in zip(self.top_ks, self.top_ps, self.min_ps, self.repetition_penalties))

    @property
    def is_greedy(self) -> bool:
        return all(t <= 0 for t in self.temperatures)

    def draw_inputs(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(temperature [B] float32, seeds [B] int64, steps [B] int64) on `device`."""
        return (torch.tensor(self.temperatures, dtype=torch.float32, device=device),
                torch.tensor([seed_to_int64(s) for s in self.seeds], dtype=torch.int64, device=device),
                torch.tensor(self.steps, dtype=torch.int64, device=device))


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[list[int]], penalties: list[float]) -> torch.Tensor:
    """HF/vLLM: a seen token's logit is divided by the penalty if positive, multiplied if negative."""
    # logits: [B, V]
    rows = [i for i, p in enumerate(penalties) if p != 1.0]
    if not rows:
        return logits
    device = logits.device
    row_idx = torch.tensor([i for i in rows for _ in token_ids[i]], dtype=torch.int64, device=device)
    col_idx = torch.tensor([t for i in rows for t in token_ids[i]], dtype=torch.int64, device=device)
    seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)
    seen[row_idx, col_idx] = True
    penalty = torch.tensor(penalties, dtype=logits.dtype, device=device)[:, None]  # [B, 1]
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The logits with what a grammar's bitmask forbids at -inf: one masked op over the batch, no host sync."""
    # logits: [B, V] float32; bitmask: [B, ceil(V / 32)] int32 (bit j of word w: token 32 w + j allowed)
    assert bitmask.shape == (logits.shape[0], (logits.shape[-1] + 31) // 32), (bitmask.shape, logits.shape)
    # As bytes (little-endian, as every target is), token t is bit t % 8 of byte t // 8: unpacking bytes
    # takes a quarter of the memory traffic of unpacking 32-bit words.
    shifts = torch.arange(8, dtype=torch.uint8, device=logits.device)
    bits = (bitmask.contiguous().view(torch.uint8)[:, :, None] >> shifts) & 1  # [B, 4 W, 8] uint8
    return logits.masked_fill(bits.flatten(1)[:, :logits.shape[-1]] == 0, float("-inf"))


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The logits a row samples from and is scored by: repetition penalty (HF's, over prompt and output), then
    OpenAI's presence and frequency penalties (output only, as vLLM), logit_bias, banned ids, the grammar mask.
    Only index lists go to the device; the [B, V] work happens there."""
    # logits: [B, V] float32
    logits = apply_repetition_penalty(logits.float(), batch.token_ids, batch.repetition_penalties)
    if batch.has_extras:
        logits = _apply_extras(logits, batch)
    if batch.token_bitmask is not None:
        logits = apply_token_bitmask(logits, batch.token_bitmask)
    return logits


def _apply_extras(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """OpenAI's presence and frequency penalties, logit_bias and banned ids."""
    device, (num_rows, vocab) = logits.device, logits.shape

    def scatter(rows: list[int], cols: list[int], values: list[float], accumulate: bool) -> torch.Tensor:
        out = torch.zeros(num_rows, vocab, dtype=torch.float32, device=device)
        if rows:
            index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
            out.index_put_(index, torch.tensor(values, dtype=torch.float32, device=device), accumulate=accumulate)
        return out

    presence = batch.presence_penalties or [0.0] * num_rows
    frequency = batch.frequency_penalties or [0.0] * num_rows
    rows, cols = [], []
    for r in range(num_rows):
        if presence[r] or frequency[r]:
            out = [t for t in batch.token_ids[r][batch.num_prompt_tokens[r]:] if t < vocab]
            rows += [r] * len(out)
            cols += out
    if rows:
        counts = scatter(rows, cols, [1.0] * len(rows), accumulate=True)  # [B, V]: occurrences in the output
        penalty = (torch.tensor(frequency, device=device)[:, None] * counts
                   + torch.tensor(presence, device=device)[:, None] * (counts > 0).float())
        logits = logits - penalty
    biases = [(r, t, b) for r, row in enumerate(batch.logit_biases) for t, b in row.items() if t < vocab]
    if biases:
        logits = logits + scatter(*map(list, zip(*biases)), accumulate=False)
    banned = [(r, t) for r, row in enumerate(batch.banned) for t in row if t < vocab]
    if banned:
        is_banned = scatter(*map(list, zip(*banned)), [1.0] * len(banned), accumulate=False) > 0
        logits = logits.masked_fill(is_banned, float("-inf"))
    return logits


def truncate(logits: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> torch.Tensor:
    """Mask (to -inf) what top-k, then top-p, then min-p exclude, by the rules of HF's logits warpers.
    A row whose knobs are off is returned bit for bit."""
    # logits: [B, V], temperature applied; one knob value per row (0 / 1.0 / 0.0: off)
    device, vocab = logits.device, logits.shape[-1]
    if any(k > 0 for k in top_k):
        k = [min(k, vocab) if k > 0 else vocab for k in top_k]
        kth_index = torch.tensor(k, dtype=torch.int64, device=device)[:, None] - 1  # [B, 1]
        kth = logits.topk(max(k), dim=-1).values.gather(1, kth_index)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th value stay
    if any(p < 1.0 for p in top_p):
        ascending, order = logits.sort(dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= torch.tensor([1 - p for p in top_p], dtype=logits.dtype, device=device)[:, None]
        remove &= torch.tensor([p < 1.0 for p in top_p], device=device)[:, None]  # off rows: an underflowed
        remove[:, -1] = False  # probability of 0 must not be cut; keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    if any(p > 0 for p in min_p):
        probs = logits.softmax(dim=-1)
        threshold = torch.tensor(min_p, dtype=logits.dtype, device=device)[:, None] * probs.amax(-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def top_logprobs(logits: torch.Tensor, batch: SamplingBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs [B, k] float32, token ids [B, k] int64) of each row's k most likely tokens, scored as `sample`
    scores the chosen token: log_softmax of the penalized logits."""
    # logits: [B, V] float32
    return process_logits(logits, batch).log_softmax(dim=-1).topk(k, dim=-1)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (token ids [B] int64, their logprobs [B] float32 if the batch asks), on the logits' device."""
    # logits: [B, V] float32
    if batch.is_greedy and batch.is_plain and batch.token_bitmask is None:
        return logits.argmax(dim=-1), None
    temperature, seeds, steps = batch.draw_inputs(logits.device)
    logits = process_logits(logits, batch)
    if batch.is_plain:
        tokens = draw(logits, temperature, seeds, steps)
    else:
        # temperature first, as `draw` would apply it (the same division: the same bits), then draw at T = 1
        scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature))[:, None]
        scaled = truncate(logits / scale, batch.top_ks, batch.top_ps, batch.min_ps)
        sampled = draw(scaled, (temperature > 0).float(), seeds, steps)
        tokens = torch.where(temperature > 0, sampled, logits.argmax(dim=-1))
    if not batch.needs_logprobs:
        return tokens, None
    return tokens, logits.log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0]
