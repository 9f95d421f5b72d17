"""The torch references of the core IR ops: the living definition of each (see `ops.py`, whose `OPS` table
pairs each with its attributes and shape rule, and whose docstring lists the ops' inputs and outputs).

The interpreter runs these, and every Triton kernel is tested against them. Op families with their own
module keep their references there: `collectives`, `moe`, `linear_attention`, `mla`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rdnac.ir.fp8 import from_kv_cache, to_kv_cache
from rdnac.ir.rope_math import rope_cos_sin, rotate


def embedding(token_ids: torch.Tensor, weight: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """weight's rows at token_ids; an id of -1 (another rank's vocabulary, `collectives.shard_ids`) gives a
    zero row."""
    if bool((token_ids < 0).any()):
        out = weight[token_ids.clamp(min=0)] * (token_ids >= 0).unsqueeze(-1).to(weight.dtype)
        return out * scale if scale != 1.0 else out
    out = weight[token_ids]  # [T, H]
    return out * scale if scale != 1.0 else out


def rms_norm(x: torch.Tensor, *rest: torch.Tensor, eps: float, unit_offset: bool = False):
    """y = norm(x [+ residual]) * w; with a residual also returns the sum.

    The statistic is float32. Plain: the normalized value is cast back before
    the weight product, as the Hugging Face Llama family does. unit_offset
    (Gemma): y = (norm(x) * (1 + w)) in float32, cast once to x's dtype, as
    transformers' Gemma3RMSNorm does."""
    weight = rest[-1]
    residual_out = None
    if len(rest) == 2:
        x = x + rest[0]
        residual_out = x
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        y = (normed * (1.0 + weight.float())).to(x.dtype)
    else:
        y = weight * normed.to(x.dtype)
    return y if residual_out is None else (y, residual_out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, *, num_heads: int, head_dim: int,
                  eps: float, unit_offset: bool = False) -> torch.Tensor:
    num_tokens = x.shape[0]
    y = rms_norm(x.reshape(num_tokens, num_heads, head_dim), weight, eps=eps, unit_offset=unit_offset)
    return y.reshape(num_tokens, num_heads * head_dim)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, *, num_heads: int, num_kv_heads: int,
         head_dim: int, rotary_dim: int, theta: float, style: str = "neox", scaling: dict | None = None):
    num_tokens = q.shape[0]
    cos, sin = rope_cos_sin(positions, rotary_dim, theta, scaling)
    q = rotate(q.reshape(num_tokens, num_heads, head_dim), cos, sin, rotary_dim, style)
    k = rotate(k.reshape(num_tokens, num_kv_heads, head_dim), cos, sin, rotary_dim, style)
    return q.reshape(num_tokens, -1), k.reshape(num_tokens, -1)


def kv_cache_write(k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, *, num_kv_heads: int, head_dim: int, k_scale: float = 1.0,
                   v_scale: float = 1.0) -> None:
    """Scatter each token's K and V to its cache slot; slots < 0 (padding) are skipped. An FP8 cache
    stores K / k_scale and V / v_scale, saturated and rounded (`rdnac.ir.fp8.to_kv_cache`)."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = to_kv_cache(k[keep].reshape(-1, num_kv_heads, head_dim), k_cache.dtype, k_scale)
    v_cache[blocks, offsets] = to_kv_cache(v[keep].reshape(-1, num_kv_heads, head_dim), v_cache.dtype, v_scale)


def qk_norm_rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       *norm_weights: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                       rotary_dim: int, theta: float, style: str = "neox", scaling: dict | None = None,
                       qk_norm: bool = False, eps: float = 1e-6, unit_offset: bool = False, k_scale: float = 1.0,
                       v_scale: float = 1.0) -> torch.Tensor:
    """[head_rms_norm(q), head_rms_norm(k)] -> rope -> kv_cache_write(k', v) as one op; returns q'.

    Defined as that chain, so it rounds exactly where the unfused ops do."""
    if qk_norm:
        q_norm, k_norm = norm_weights
        q = head_rms_norm(q, q_norm, num_heads=num_heads, head_dim=head_dim, eps=eps, unit_offset=unit_offset)
        k = head_rms_norm(k, k_norm, num_heads=num_kv_heads, head_dim=head_dim, eps=eps, unit_offset=unit_offset)
    q, k = rope(q, k, positions, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                rotary_dim=rotary_dim, theta=theta, style=style, scaling=scaling)
    kv_cache_write(k, v, slot_mapping, k_cache, v_cache, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   k_scale=k_scale, v_scale=v_scale)
    return q


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
              seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, positions: torch.Tensor,
              sinks: torch.Tensor | None = None, *, num_heads: int, num_kv_heads: int, head_dim: int,
              scale: float, sliding_window: int = 0, softcap: float = 0.0, k_scale: float = 1.0,
              v_scale: float = 1.0) -> torch.Tensor:
    """Paged attention over each sequence's cached keys, in float32 (FP8 caches read as their bits
    times k_scale / v_scale: `rdnac.ir.fp8.from_kv_cache`).

    Query i of sequence b sits at positions[i] and sees key positions j with
    j <= positions[i] (causal), j < seq_lens[b], and, with a window W > 0,
    j > positions[i] - W. Keys of sequence b are read from cache slots
    block_tables[b, j // BS] * BS + j % BS."""
    block_size = k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape[0], num_heads, head_dim, dtype=q.dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        start, end, ctx = cu[b], cu[b + 1], lens[b]
        if end == start:
            continue
        j = torch.arange(ctx, device=q.device)
        slots = block_tables[b, j // block_size].long() * block_size + j % block_size
        keys = from_kv_cache(k_cache.reshape(-1, num_kv_heads, head_dim)[slots], k_scale)  # [S, Hk, D]
        values = from_kv_cache(v_cache.reshape(-1, num_kv_heads, head_dim)[slots], v_scale)
        keys = keys.repeat_interleave(group, dim=1)  # [S, Hq, D]
        values = values.repeat_interleave(group, dim=1)
        queries = q[start:end].reshape(-1, num_heads, head_dim).float()  # [Tq, Hq, D]
        scores = torch.einsum("thd,shd->hts", queries, keys) * scale  # [Hq, Tq, S]
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        pos = positions[start:end].long()[:, None]  # [Tq, 1]
        allowed = j[None, :] <= pos
        if sliding_window > 0:
            allowed &= j[None, :] > pos - sliding_window
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        if sinks is not None:
            sink = sinks.float()[:, None, None].expand(num_heads, end - start, 1)
            probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
        else:
            probs = torch.softmax(scores, -1)
        out[start:end] = torch.einsum("hts,shd->thd", probs, values).to(q.dtype)
    return out.reshape(q.shape[0], num_heads * head_dim)


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *rest: torch.Tensor,
               weight_scheme: str, act_scheme: str, fp8_format: str, block_size: list | None = None,
               has_bias: bool = False, group: int = 0, out_dtype: str | None = None) -> torch.Tensor:
    """y = Q(x) @ W.T (+ bias) in float32, cast to `out_dtype` (default: x's dtype; float32 for an FP8 lm_head).

    W = fp8 bits * weight_scale: per "tensor" ([1]), "channel" ([N]) or "block"
    ([ceil(N/bn), ceil(K/bk)] with block_size [bn, bk]). Q(x): "dynamic_token"
    quantizes each row to fp8 with scale amax/FP8_MAX; "dynamic_group" per row
    and group of bk columns (block schemes); "static" with the given
    input_scale [1]; "none" keeps x (a16w8); "prequantized": x is fp8 already, with x_scale [T, 1]
    (group 0) or [T, ceil(K/group)], and the output is `out_dtype`.
    rest = (input_scale if static, x_scale if prequantized, bias if has_bias)."""
    from rdnac.ir.fp8 import FP8_MAX, FORMATS, dequantize_weight, quantize_rows

    rest = list(rest)
    input_scale = rest.pop(0) if act_scheme in ("static", "prequantized") else None
    bias = rest.pop(0) if has_bias else None
    w = dequantize_weight(weight, weight_scale, weight_scheme, tuple(block_size) if block_size else None)
    if act_scheme == "none":
        xq = x.float()
    elif act_scheme == "dynamic_token":
        q, s = quantize_rows(x, fp8_format)
        xq = q.float() * s
    elif act_scheme == "dynamic_group":
        group = block_size[1]
        q, s = quantize_rows(x, fp8_format, group)
        xq = q.float() * s.repeat_interleave(group, 1)[:, : x.shape[1]]
    elif act_scheme == "static":
        s = input_scale.float().reshape(())
        xq = (x.float() / s).clamp(-FP8_MAX[fp8_format], FP8_MAX[fp8_format]).to(FORMATS[fp8_format]).float() * s
    elif act_scheme == "prequantized":  # the same products as the dynamic schemes above
        s = input_scale.float()
        xq = x.float() * (s.repeat_interleave(group, 1)[:, : x.shape[1]] if group else s)
    else:
        raise ValueError(f"unknown act_scheme {act_scheme!r}")
    y = xq @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(getattr(torch, out_dtype) if out_dtype else x.dtype)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *rest: torch.Tensor,
                weight_scheme: str, act_scheme: str, has_bias: bool = False, group: int = 0,
                out_dtype: str | None = None) -> torch.Tensor:
    """y = Q(x) @ (int8 W * weight_scale).T (+ bias) in float32, cast to `out_dtype` (default x's dtype):
    `linear_fp8` with fp8_format "int8". weight_scheme "channel" ([N]) or "tensor" ([1]); act_scheme
    "dynamic_token" (Q: per row, scale amax/127, rounded to integers) or "prequantized" (x is int8 with
    x_scale [T, 1]). rest = (x_scale if prequantized, bias if has_bias)."""
    assert weight_scheme in ("channel", "tensor") and act_scheme in ("dynamic_token", "prequantized"), \
        (weight_scheme, act_scheme)
    return linear_fp8(x, weight, weight_scale, *rest, weight_scheme=weight_scheme, act_scheme=act_scheme,
                      fp8_format="int8", has_bias=has_bias, group=group, out_dtype=out_dtype)


def gated_act(*xs: torch.Tensor, act: str = "silu") -> torch.Tensor:
    gate, up = xs if len(xs) == 2 else xs[0].chunk(2, dim=-1)
    return _ACTIVATIONS[act](gate) * up


def linear_gated_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     act: str = "silu") -> torch.Tensor:
    """gated_act(linear(x, weight, bias), act): weight [2I, K] holds the gate rows, then the up rows."""
    return gated_act(linear(x, weight, bias), act=act)


def rms_norm_quant(x: torch.Tensor, *rest: torch.Tensor, eps: float, unit_offset: bool = False,
                   fp8_format: str, group: int = 0):
    """(q, scale) = quantize_rows(rms_norm(x [+ residual])); with a residual also returns the sum."""
    from rdnac.ir.fp8 import quantize_rows

    out = rms_norm(x, *rest, eps=eps, unit_offset=unit_offset)
    y, residual_out = (out, None) if isinstance(out, torch.Tensor) else out
    q, scale = quantize_rows(y, fp8_format, group)
    return (q, scale) if residual_out is None else (q, scale, residual_out)


def gated_act_quant(*xs: torch.Tensor, act: str = "silu", fp8_format: str, group: int = 0):
    """(q, scale) = quantize_rows(gated_act(...))."""
    from rdnac.ir.fp8 import quantize_rows

    return quantize_rows(gated_act(*xs, act=act), fp8_format, group)


def gated_act_linear_fp8(gate_up: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *rest: torch.Tensor,
                         act: str, fp8_format: str, group: int, out_dtype: str | None = None,
                         **linear_attrs) -> torch.Tensor:
    """linear_fp8(*gated_act_quant(gate_up), ...) with act_scheme "prequantized"; rest = ((bias,) if has_bias)."""
    q, scale = gated_act_quant(gate_up, act=act, fp8_format=fp8_format, group=group)
    return linear_fp8(q, weight, weight_scale, scale, *rest, **linear_attrs, act_scheme="prequantized",
                      fp8_format=fp8_format, group=group, out_dtype=out_dtype or str(gate_up.dtype)[6:])


def attention_quant(*ins: torch.Tensor, fp8_format: str, group: int = 0, **attrs):
    """(q, scale) = quantize_rows(attention(...)): the attention output in o_proj's FP8 activations."""
    from rdnac.ir.fp8 import quantize_rows

    return quantize_rows(attention(*ins, **attrs), fp8_format, group)


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b


def logits(x: torch.Tensor, logits_indices: torch.Tensor, weight: torch.Tensor, *,
           softcap: float = 0.0) -> torch.Tensor:
    out = F.linear(x[logits_indices.long()], weight).float()  # [R, V]
    if softcap > 0:
        out = softcap * torch.tanh(out / softcap)
    return out


def argmax(logits_: torch.Tensor) -> torch.Tensor:
    return logits_.argmax(dim=-1)


def split(x: torch.Tensor, *, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """Column views of x [T, N]: sizes[i] columns each, in order (no copy; rows keep x's stride)."""
    return tuple(torch.split(x, list(sizes), dim=1))
