"""The closed op set of the IR: attributes, shape rule and torch reference.

The reference functions are the living definition of each op: the
interpreter runs them, and every Triton kernel is tested against them.
An op's GPU kernels are registered where they are written: in its kernel
file's `FAMILY` record (`rdnac.kernels.registry`, which says how to add an op).

Tensors are flat per token: q is [T, H*D], not [T, H, D]. Ops that need
heads carry `num_heads`/`head_dim` attributes. Dims are ints or symbols
(`T`, `B`, `R`...); see `graph.py`.

| op              | inputs                                                        | outputs        |
|-----------------|---------------------------------------------------------------|----------------|
| embedding       | token_ids [T], weight [V, H]                                  | [T, H]         |
| rms_norm        | x [T, H], (residual [T, H]), weight [H]                       | y, (x+residual)|
| linear          | x [T, K], weight [N, K], (bias [N])                           | [T, N]         |
| head_rms_norm   | x [T, Hn*D], weight [D]                                       | [T, Hn*D]      |
| rope            | q [T, Hq*D], k [T, Hk*D], positions [T]                       | q', k'         |
| kv_cache_write  | k, v [T, Hk*D], slot_mapping [T], k_cache, v_cache [NB,BS,Hk,D] | (in place)   |
| qk_norm_rope_cache | q [T, Hq*D], k, v [T, Hk*D], positions [T], slot_mapping [T], | q' [T, Hq*D] |
|                 | k_cache, v_cache, (q_norm, k_norm [D] if attr qk_norm)        | (k', v: caches)|
| attention       | q [T, Hq*D], k_cache, v_cache, block_tables [B, MB],          | [T, Hq*D]      |
|                 | seq_lens [B], cu_seqlens_q [B+1], positions [T], (sinks [Hq]) |                |
| gated_act       | gate [T, I], up [T, I]  or  gate_up [T, 2I]                   | [T, I]         |
| linear_gated_act| x [T, K], weight [2I, K] (gate rows, then up), (bias [2I])    | [T, I]         |
| add             | a, b (same shape)                                             | a + b          |
| linear_fp8      | x [T, K], weight fp8 [N, K], weight_scale, (input_scale), (bias [N]) | [T, N]  |
|                 | prequantized: x_q fp8 [T, K], weight, weight_scale, x_scale [T, G], (bias) |         |
| linear_int8     | x [T, K], weight int8 [N, K], weight_scale [N] or [1], (bias [N])    | [T, N]  |
|                 | prequantized: x_q int8 [T, K], weight, weight_scale, x_scale [T, 1], (bias)  |       |
| rms_norm_quant  | x [T, H], (residual [T, H]), weight [H]                       | q fp8, scale, (x+residual) |
| gated_act_quant | gate [T, I], up [T, I]  or  gate_up [T, 2I]                   | q fp8 [T, I], scale |
| attention_quant | attention's inputs                                            | q fp8 [T, Hq*D], scale |
| gated_act_linear_fp8 | gate_up [T, 2I], weight fp8 [N, I], weight_scale, (bias [N]) | [T, N]         |
| logits          | x [T, H], logits_indices [R], weight [V, H]                   | [R, V] float32 |
| argmax          | logits [R, V]                                                 | [R] int64      |
| split           | x [T, N] (attr sizes, summing to N)                           | len(sizes) views [T, sizes[i]] |
| all_reduce, all_gather, shard_ids (tensor/expert parallelism): see `rdnac.ir.collectives`        |
| reduce_scatter, shard_rows, all_gather_rows, all_to_all, ep_dispatch, ep_combine: the same       |
| moe_route, moe_experts, moe_experts_mxfp4, moe_experts_fp8_block: see `rdnac.ir.moe`            |
| causal_conv1d, gated_delta_rule, gated_rms_norm(_quant), sigmoid_gate(_quant): `rdnac.ir.linear_attention` |
| mla_cache_write, mla_attention (multi-head latent attention): see `rdnac.ir.mla`                |

FP8 activation quantization fused into its producer: `rms_norm_quant`,
`gated_act_quant` and `attention_quant` compute `rms_norm` / `gated_act` /
`attention` exactly, then
`rdnac.ir.fp8.quantize_rows` (attr `group`: 0 = one scale per token [T, 1],
else one per token and `group` columns [T, ceil(H/group)]). Their consumer is
a `linear_fp8` with act_scheme "prequantized": the same op (same weight
inputs at the same positions, same kernels) whose x is already fp8 and whose
fourth input, where a static input scale would sit, is x_scale; attrs `group`
(as above) and `out_dtype` (x's dtype before quantization). Fused and
unfused graphs compute the same values bit for bit in the reference.

INT8 W8A8 (`linear_int8`) is `linear_fp8` with fp8_format "int8" (`rdnac.ir.fp8`:
x / scale rounded to the nearest integer, scale = amax / 127 per token): per-channel
(or per-tensor) weights, activations "dynamic_token" or "prequantized" by an
`rms_norm_quant` / `gated_act_quant` whose attr fp8_format is "int8" (the attr
names the 8-bit format, float or not).

FP8 KV cache (`--kv-cache-dtype fp8`): the cache inputs' dtype says it. The
ops that write a cache (`kv_cache_write`, `qk_norm_rope_cache`) store K / k_scale
and V / v_scale (float attrs, per-tensor static scales, default 1.0) saturated
to the format's range and rounded to nearest even; the ops that read one
(`attention`, `attention_quant`) multiply the bits by the same scales. Float
caches ignore the scales (the verifier keeps them 1.0).

`gated_act_linear_fp8` is `gated_act_quant` (merged gate_up form, attr `group` > 0) followed by the
prequantized `linear_fp8` reading it, as one op (`fuse_act_linear` builds it): the MLP's down projection
computing its own FP8 activations; defined as that chain, so it rounds where the two ops do.

`linear_gated_act` is `gated_act(linear(x, weight, bias), act)` as one op (the
MLP's merged gate/up GEMM with its activation; `fuse_gated_linear` builds it),
defined as that chain so it rounds exactly where the unfused ops do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from rdnac.ir import collectives
from rdnac.ir import linear_attention as la
from rdnac.ir import mla
from rdnac.ir import moe
from rdnac.ir.fp8 import from_kv_cache, to_kv_cache
from rdnac.ir.graph import TensorSpec
from rdnac.ir.rope_math import rope_cos_sin, rotate

Ref = Callable[..., "torch.Tensor | tuple[torch.Tensor, ...] | None"]
Infer = Callable[[dict, list[TensorSpec]], list[TensorSpec]]


@dataclass(frozen=True)
class OpDef:
    name: str
    required_attrs: tuple[str, ...]
    num_inputs: tuple[int, ...]  # accepted input counts
    infer: Infer
    reference: Ref
    has_side_effects: bool = False
    in_place: tuple[int, ...] = ()  # indices of the inputs it writes (KV caches)


# ---------------------------------------------------------------- references


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


# ---------------------------------------------------------------- shape rules


def _same(_attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [ins[0]]


def _embedding_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [TensorSpec(ins[1].dtype, (ins[0].shape[0], ins[1].shape[1]))]


def _rms_norm_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [ins[0], ins[0]] if len(ins) == 3 else [ins[0]]


def _linear_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [TensorSpec(ins[0].dtype, (ins[0].shape[0], ins[1].shape[0]))]


def _linear_fp8_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    dtype = attrs.get("out_dtype") or ins[0].dtype
    return [TensorSpec(dtype, (ins[0].shape[0], ins[1].shape[0]))]


def _quant_specs(attrs: dict, x: TensorSpec) -> list[TensorSpec]:
    """q fp8 [T, H] and its float32 scales [T, 1] or [T, ceil(H / group)]."""
    from rdnac.ir.fp8 import FORMATS

    num_tokens, width = x.shape  # width is a model dim: an int
    group = attrs.get("group", 0)
    num_groups = -(-width // group) if group else 1
    return [TensorSpec(str(FORMATS[attrs["fp8_format"]]).removeprefix("torch."), (num_tokens, width)),
            TensorSpec("float32", (num_tokens, num_groups))]


def _rms_norm_quant_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return _quant_specs(attrs, ins[0]) + ([ins[0]] if len(ins) == 3 else [])


def _gated_act_quant_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return _quant_specs(attrs, _gated_act_infer(attrs, ins)[0])


def _rope_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [ins[0], ins[1]]


def _gated_act_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    if len(ins) == 2:
        return [ins[0]]
    width = ins[0].shape[1]
    return [TensorSpec(ins[0].dtype, (ins[0].shape[0], width // 2 if isinstance(width, int) else width))]


def _linear_gated_act_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return _gated_act_infer(attrs, _linear_infer(attrs, ins))


def _logits_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [TensorSpec("float32", (ins[1].shape[0], ins[2].shape[0]))]


def _split_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [TensorSpec(ins[0].dtype, (ins[0].shape[0], int(n))) for n in attrs["sizes"]]


def _argmax_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [TensorSpec("int64", (ins[0].shape[0],))]


# ops that read the paged KV cache as `attention` does (same inputs, checks and kernel configs)
ATTENTION_OPS = ("attention", "attention_quant")
# where each op that writes or reads the paged K and V caches has them among its inputs
KV_CACHE_INPUTS = {"kv_cache_write": (3, 4), "qk_norm_rope_cache": (5, 6), **{op: (1, 2) for op in ATTENTION_OPS}}

OPS: dict[str, OpDef] = {op.name: op for op in [
    OpDef("embedding", (), (2,), _embedding_infer, embedding),
    OpDef("rms_norm", ("eps",), (2, 3), _rms_norm_infer, rms_norm),
    OpDef("linear", (), (2, 3), _linear_infer, linear),
    OpDef("head_rms_norm", ("num_heads", "head_dim", "eps"), (2,), _same, head_rms_norm),
    OpDef("rope", ("num_heads", "num_kv_heads", "head_dim", "rotary_dim", "theta"), (3,), _rope_infer, rope),
    OpDef("kv_cache_write", ("num_kv_heads", "head_dim"), (5,), lambda a, i: [], kv_cache_write,
          has_side_effects=True, in_place=(3, 4)),
    OpDef("qk_norm_rope_cache", ("num_heads", "num_kv_heads", "head_dim", "rotary_dim", "theta", "qk_norm"), (7, 9),
          _same, qk_norm_rope_cache, has_side_effects=True, in_place=(5, 6)),
    OpDef("attention", ("num_heads", "num_kv_heads", "head_dim", "scale"), (7, 8), _same, attention),
    OpDef("gated_act", ("act",), (1, 2), _gated_act_infer, gated_act),
    OpDef("add", (), (2,), _same, add),
    OpDef("linear_fp8", ("weight_scheme", "act_scheme", "fp8_format"), (3, 4, 5), _linear_fp8_infer, linear_fp8),
    OpDef("gated_act_linear_fp8", ("act", "weight_scheme", "fp8_format", "group"), (3, 4), _linear_fp8_infer,
          gated_act_linear_fp8),
    OpDef("linear_int8", ("weight_scheme", "act_scheme"), (3, 4, 5), _linear_fp8_infer, linear_int8),
    OpDef("rms_norm_quant", ("eps", "fp8_format", "group"), (2, 3), _rms_norm_quant_infer, rms_norm_quant),
    OpDef("linear_gated_act", ("act",), (2, 3), _linear_gated_act_infer, linear_gated_act),
    OpDef("gated_act_quant", ("act", "fp8_format", "group"), (1, 2), _gated_act_quant_infer, gated_act_quant),
    OpDef("attention_quant", ("num_heads", "num_kv_heads", "head_dim", "scale", "fp8_format", "group"), (7, 8),
          lambda attrs, ins: _quant_specs(attrs, ins[0]), attention_quant),
    OpDef("logits", (), (3,), _logits_infer, logits),
    OpDef("argmax", (), (1,), _argmax_infer, argmax),
    OpDef("split", ("sizes",), (1,), _split_infer, split),
    OpDef("all_reduce", (), (1,), collectives.all_reduce_infer, collectives.all_reduce),
    OpDef("all_gather", ("size",), (1,), collectives.all_gather_infer, collectives.all_gather),
    OpDef("shard_ids", ("size",), (2,), collectives.shard_ids_infer, collectives.shard_ids),
    OpDef("reduce_scatter", ("num_ranks",), (1,), collectives.rows_infer, collectives.reduce_scatter),
    OpDef("shard_rows", ("num_ranks",), (1,), collectives.rows_infer, collectives.shard_rows),
    OpDef("all_gather_rows", ("num_ranks",), (2,), collectives.all_gather_rows_infer, collectives.all_gather_rows),
    OpDef("all_to_all", ("num_ranks",), (1,), collectives.all_reduce_infer, collectives.all_to_all),
    OpDef("ep_dispatch", ("num_ranks", "experts_per_rank"), (2,), collectives.ep_dispatch_infer,
          collectives.ep_dispatch),
    OpDef("ep_combine", ("num_ranks", "experts_per_rank"), (3,), collectives.ep_combine_infer,
          collectives.ep_combine),
    OpDef("moe_route", ("top_k", "scoring"), (1, 2), moe.moe_route_infer, moe.moe_route),
    OpDef("moe_experts", ("act",), (5, 7), moe.moe_experts_infer, moe.moe_experts),
    OpDef("moe_experts_mxfp4", ("act",), (7, 9), moe.moe_experts_infer, moe.moe_experts_mxfp4),
    OpDef("moe_experts_fp8_block", ("act", "fp8_format", "act_scheme", "block_size"), (7,), moe.moe_experts_infer,
          moe.moe_experts_fp8_block),
    # linear attention: the conv and the delta rule write their sequences' state slots (input 2 / 7)
    OpDef("causal_conv1d", ("kernel_size",), (6,), la.same_as_x, la.causal_conv1d, has_side_effects=True,
          in_place=(2,)),
    OpDef("gated_delta_rule", ("num_k_heads", "num_v_heads", "k_head_dim", "v_head_dim"), (11,),
          la.gated_delta_rule_infer, la.gated_delta_rule, has_side_effects=True, in_place=(7,)),
    OpDef("gated_rms_norm", ("num_heads", "head_dim", "eps"), (3,), la.same_as_x, la.gated_rms_norm),
    OpDef("gated_rms_norm_quant", ("num_heads", "head_dim", "eps", "fp8_format", "group"), (3,),
          lambda attrs, ins: _quant_specs(attrs, ins[0]), la.gated_rms_norm_quant),
    OpDef("sigmoid_gate", (), (2,), la.same_as_x, la.sigmoid_gate),
    OpDef("sigmoid_gate_quant", ("fp8_format", "group"), (2,), lambda attrs, ins: _quant_specs(attrs, ins[0]),
          la.sigmoid_gate_quant),
    # multi-head latent attention: the write rotates k_pe and fills the layer's latent cache (input 4)
    OpDef("mla_cache_write", ("kv_lora_rank", "qk_rope_head_dim", "theta"), (5,), lambda a, i: [],
          mla.mla_cache_write, has_side_effects=True, in_place=(4,)),
    OpDef("mla_attention", ("num_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank",
                            "scale", "theta"), (7, 9), mla.mla_attention_infer, mla.mla_attention),
]}
