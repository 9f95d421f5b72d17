"""transformers peers for the harness (`rdnac bench --peers`): eager (dynamic cache) and static cache + torch.compile.

Both run `generate` on the same checkpoint: TPOT is (time for 1 + n new tokens - time for 1 new token) / n
with prompts of `context - n // 2` tokens, so the mean context matches the rdnac measurement; prefill is a
single forward over the prompt. Each static-cache batch size compiles anew (not counted in the TPOT).
`measure_transformers_family` is the eager one for the MoE, hybrid and MLA shapes (rdnac.bench.families):
several contexts, bandwidth from rdnac's byte count of the same checkpoint, out-of-memory sizes recorded.
"""

from __future__ import annotations

import gc
import time

import torch

NEW_TOKENS = 64


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _generate_seconds(model, ids: torch.Tensor, new: int, **kw) -> float:
    _sync(ids.device.type)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
    _sync(ids.device.type)
    return time.perf_counter() - start


def _tpot(model, batch: int, context: int, new_tokens: int = NEW_TOKENS, **kw) -> tuple[float, float]:
    prompt = max(1, context - new_tokens // 2)
    high = min(30000, model.config.get_text_config().vocab_size)
    ids = torch.randint(min(300, high // 2), high, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    ids = ids.to(model.device)
    started = time.perf_counter()
    _generate_seconds(model, ids, new_tokens + 1, **kw)  # warm-up (compiles for this shape)
    warmup = time.perf_counter() - started
    one = min(_generate_seconds(model, ids, 1, **kw) for _ in range(2))
    full = _generate_seconds(model, ids, new_tokens + 1, **kw)
    return (full - one) / new_tokens, warmup


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


def load_transformers(ckpt, device: str):
    """transformers' model of `ckpt` in bf16 on `device`, and a note of how it runs: MXFP4 experts are
    dequantized to bf16 on load (what transformers does without the `kernels` package's MXFP4 kernels; asked
    for explicitly, so a machine with `kernels` installed but no network does not try to fetch them); GDN
    layers run its torch fallback unless flash-linear-attention and causal-conv1d are installed."""
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM
    from transformers.utils.import_utils import is_causal_conv1d_available, is_flash_linear_attention_available

    config = json.loads((Path(ckpt) / "config.json").read_text())
    kw, notes = {}, []
    if config.get("quantization_config", {}).get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config

        kw["quantization_config"] = Mxfp4Config(dequantize=True)
        notes.append("MXFP4 experts dequantized to bf16 on load")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, **kw).to(device).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    if "linear_attention" in (getattr(model.config.get_text_config(), "layer_types", None) or []):
        fast = is_flash_linear_attention_available() and is_causal_conv1d_available()
        notes.append("GDN: flash-linear-attention kernels" if fast else "GDN: transformers' torch fallback")
    notes.append(f"attention: {model.config._attn_implementation}")
    experts = getattr(model.config, "_experts_implementation", None)
    if experts:
        notes.append(f"experts: {experts}")
    return model, "; ".join(notes)


def measure_transformers_family(ckpt, batches: list[int], contexts: list[int], prefill: list[int], read_bytes,
                                copy_gbps: float, device: str = "cuda", new_tokens: int = 16):
    """transformers eager (no torch.compile) on `ckpt`: decode TPOT at each batch x context and prefill at
    each size, achieved bandwidth from `read_bytes(batch, context)` (the bytes the step needs, as rdnac's
    plan of the same checkpoint counts them). A size that runs out of device memory gives a record saying
    so and the rest go on."""
    model, note = load_transformers(ckpt, device)
    oom = (torch.cuda.OutOfMemoryError,) if device == "cuda" else ()
    with torch.no_grad():
        for context in contexts:
            for batch in batches:
                head = {"engine": "transformers eager", "batch": batch, "context": context}
                try:
                    t, warmup = _tpot(model, batch, context, new_tokens)
                except oom as e:
                    yield {**head, "error": f"out of device memory ({str(e).splitlines()[0][:160]})", "note": note}
                    torch.cuda.empty_cache()
                    continue
                read = read_bytes(batch, context)
                yield {**head, "tpot_ms": round(t * 1e3, 3), "tokens_per_s": round(batch / t, 1),
                       "bytes_read_GB": round(read / 1e9, 3), "achieved_GBps": round(read / t / 1e9, 1),
                       "pct_of_copy": round(100 * read / t / 1e9 / copy_gbps, 1), "warmup_s": round(warmup, 1),
                       "new_tokens": new_tokens, "note": note}
        for tokens in prefill:
            head = {"engine": "transformers eager", "prefill_tokens": tokens}
            ids = torch.randint(3, min(30000, model.config.get_text_config().vocab_size), (1, tokens)).to(device)
            try:
                model(ids, logits_to_keep=1)
                times = []
                for _ in range(2):
                    _sync(device)
                    start = time.perf_counter()
                    model(ids, logits_to_keep=1)
                    _sync(device)
                    times.append(time.perf_counter() - start)
            except oom as e:
                yield {**head, "error": f"out of device memory ({str(e).splitlines()[0][:160]})", "note": note}
                torch.cuda.empty_cache()
                continue
            yield {**head, "prefill_ms": round(min(times) * 1e3, 2), "tokens_per_s": round(tokens / min(times)),
                   "note": note}
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
