"""transformers peers for the harness (`rdnac bench --peers`): eager (dynamic cache) and static cache + torch.compile.

Both run `generate` on the same checkpoint: TPOT is (time for 1 + n new tokens - time for 1 new token) / n
with prompts of `context - n // 2` tokens, so the mean context matches the rdnac measurement; prefill is a
single forward over the prompt. Each static-cache batch size compiles anew (not counted in the TPOT).
"""

from __future__ import annotations

import time

import torch

NEW_TOKENS = 64


def _generate_seconds(model, ids: torch.Tensor, new: int, **kw) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _tpot(model, batch: int, context: int, **kw) -> tuple[float, float]:
    prompt = context - NEW_TOKENS // 2
    ids = torch.randint(300, 30000, (batch, prompt), generator=torch.Generator().manual_seed(batch)).cuda()
    started = time.perf_counter()
    _generate_seconds(model, ids, NEW_TOKENS + 1, **kw)  # warm-up (compiles for this shape)
    warmup = time.perf_counter() - started
    one = min(_generate_seconds(model, ids, 1, **kw) for _ in range(2))
    full = _generate_seconds(model, ids, NEW_TOKENS + 1, **kw)
    return (full - one) / NEW_TOKENS, warmup


def measure_transformers(ckpt, batches: list[int], compile_batches: list[int], prefill: list[int], context: int,
                         copy_gbps: float):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    c = model.config
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2
    with torch.no_grad():
        for mode, sizes, kw in (("eager", batches, {}),
                                ("static+compile", compile_batches, {"cache_implementation": "static"})):
            for batch in sizes:
                t, warmup = _tpot(model, batch, context, **kw)
                read = weight_bytes + batch * context * kv_per_token
                yield {"engine": f"transformers {mode}", "batch": batch, "context": context,
                       "tpot_ms": round(t * 1e3, 3), "tokens_per_s": round(batch / t, 1),
                       "achieved_GBps": round(read / t / 1e9, 1), "pct_of_copy": round(100 * read / t / 1e9 / copy_gbps, 1),
                       "warmup_s": round(warmup, 1)}
        for tokens in prefill:
            ids = torch.randint(300, 30000, (1, tokens)).cuda()
            model(ids)
            torch.cuda.synchronize()
            times = []
            for _ in range(3):
                start = time.perf_counter()
                model(ids, logits_to_keep=1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            yield {"engine": "transformers eager", "prefill_tokens": tokens, "prefill_ms": round(min(times) * 1e3, 2),
                   "tokens_per_s": round(tokens / min(times))}
    del model
    torch.cuda.empty_cache()
