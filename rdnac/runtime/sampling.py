"""Token sampling on the device, one row of logits per sequence.

Order, as Hugging Face applies its processors: repetition penalty (over
prompt + generated ids) -> temperature -> top-k -> top-p -> min-p -> sample.
Temperature 0 is greedy (argmax of the penalized logits).

The returned logprob is log_softmax of the penalized logits, before
temperature and truncation: it scores the token under the model (with the
penalty the request asked for), so it does not change with the sampling
knobs and is finite for every token, greedy or sampled.

Sampling uses the exponential race: argmax(p / q) with q ~ Exp(1) draws from
p. Each seeded request draws its noise from its own torch.Generator on the
device, one [V] row per sampled token, so its tokens depend only on its seed
and its logits, not on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    """Per-row sampling parameters for a [B, V] logits batch."""
    temperatures: list[float]
    top_ks: list[int]  # 0: off
    top_ps: list[float]  # 1.0: off
    min_ps: list[float]  # 0.0: off
    repetition_penalties: list[float]  # 1.0: off
    token_ids: list[list[int]]  # prompt + generated ids, for the repetition penalty
    generators: list[torch.Generator | None]  # None: the device's default generator


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


def truncate(logits: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> torch.Tensor:
    """Mask (to -inf) what top-k, then top-p, then min-p exclude, by the rules of HF's logits warpers."""
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
        remove[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    if any(p > 0 for p in min_p):
        probs = logits.softmax(dim=-1)
        threshold = torch.tensor(min_p, dtype=logits.dtype, device=device)[:, None] * probs.amax(-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (token ids [B] int64, their logprobs [B] float32), both on the logits' device."""
    # logits: [B, V] float32
    device = logits.device
    logits = apply_repetition_penalty(logits.float(), batch.token_ids, batch.repetition_penalties)
    logprobs = logits.log_softmax(dim=-1)
    tokens = logits.argmax(dim=-1)
    sampled_rows = [i for i, t in enumerate(batch.temperatures) if t > 0]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, dtype=torch.int64, device=device)

        def pick(values: list) -> list:
            return [values[i] for i in sampled_rows]

        temperature = torch.tensor(pick(batch.temperatures), dtype=torch.float32, device=device)
        scaled = truncate(logits[rows] / temperature[:, None], pick(batch.top_ks), pick(batch.top_ps),
                          pick(batch.min_ps))
        probs = scaled.softmax(dim=-1)  # [S, V]
        noise = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(sampled_rows) if batch.generators[i] is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=device).exponential_()
        for j, i in enumerate(sampled_rows):
            if batch.generators[i] is not None:
                noise[j].exponential_(generator=batch.generators[i])
        tokens[rows] = (probs / noise).argmax(dim=-1)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]
