"""The closed op set of the IR: attributes, shape rule and torch reference.

The reference functions (`references.py`, and the op families' own modules)
are the living definition of each op: the interpreter runs them, and every
Triton kernel is tested against them.
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

from rdnac.ir import collectives
from rdnac.ir import linear_attention as la
from rdnac.ir import mla
from rdnac.ir import moe
from rdnac.ir.graph import TensorSpec
from rdnac.ir.references import (  # noqa: F401 (the ops' references, reached as ops.<name>)
    embedding, rms_norm, linear, head_rms_norm, rope, kv_cache_write, qk_norm_rope_cache, attention,
    linear_fp8, linear_int8, gated_act, linear_gated_act, rms_norm_quant, gated_act_quant,
    gated_act_linear_fp8, attention_quant, add, logits, argmax, split)

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
