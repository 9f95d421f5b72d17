"""Fused MoE family: IR ops `moe_route`, `moe_experts`, `moe_experts_mxfp4` and `moe_experts_fp8_block`
(references: `rdnac.ir.moe`).

`moe_route` is one kernel (`moe_route.py`). The expert MLP of T tokens, each routed to k of E experts
(ids in [0, E), as `moe_route` gives them), runs as five launches (four at decode) with grids fixed by
shapes alone (no host sync, so every decode bucket captures into a CUDA graph).

Expert parallelism (`--ep`): E is the rank's local experts and the ids are local, `shard_ids`'s
`id - tp.expert_start` with -1 for another rank's experts (`rdnac.compiler.passes.shard`). An id outside
[0, E) matches no expert in the count and align kernels, so the sort drops its slot (it lands in no
expert's block, the grouped GEMMs never see it) and the top-k sum skips it: the rank's partial output,
which the all_reduce after the node adds up. Same grids, same order, still no host sync.

1. `_moe_count_kernel` (E programs): how many of the T*k routed slots (slot s = token s // k, choice
   s % k) chose each expert. Up to `COUNT_IN_ALIGN_MAX_SLOTS` slots (decode) the align kernel counts
   them itself instead, and this launch goes.
2. `_moe_align_kernel` (E programs): expert e's rows start at the sum of the earlier experts' counts,
   each rounded up to BLOCK_M; it writes its slots there in slot order (deterministic), fills its
   padding with the sentinel T*k, names itself as the expert of its blocks, and program 0 writes the
   padded total. At most T*k + min(E, T*k) * (BLOCK_M - 1) rows, a bound from shapes only.
3. `moe_gemm._moe_gemm_kernel` GATED: gate/up grouped GEMM with the activation fused -> [T*k, I].
4. `moe_gemm._moe_gemm_kernel`: down grouped GEMM, bias, times the routing weight -> [T*k, H] float32.
5. `_moe_sum_kernel`: each token's k rows added in slot order (rows of dropped ids skipped), cast once to
   x's dtype -> [T, H].

The top-k sum is a separate reduce rather than atomics in the down GEMM's epilogue: float atomics
add in arrival order, and graph replay and eager must give the same tokens. Dense weights are
x's dtype; MXFP4 experts stay 4-bit in memory and take one of three paths by config, ranked by the
cost model per phase and logged with each MoE node's kernel selection: decoded in the grouped GEMM's
inner loop (W4A16, `moe_gemm.py`), a grouped GEMV that decodes by bit shifts (GEMV, decode sizes)
or decoded once per step into a scratch for the dense GEMM (DEQUANT, two launches more; prefill),
both in `moe_gemv.py`. FP8 block experts (DeepSeek's 128x128 scales) stay FP8: activations quantized per
128 columns, a block-scaled grouped GEMM per projection (`moe_fp8.py`).
Configs and their LDS estimate: `moe_configs.py`; cost model: `rdnac.compiler.cost_model._estimate_moe`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.ir.fp8 import FORMATS
from rdnac.kernels.fp8_quant import quantize_activations
from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2
from rdnac.kernels.moe_configs import config_space, default_config  # noqa: F401 (the family API)
from rdnac.kernels.moe_fp8 import _moe_fp8_block_gemm_kernel
from rdnac.kernels.moe_gemm import _moe_gemm_kernel
from rdnac.kernels.moe_gemv import DEQUANT_BLOCK_K, DEQUANT_BLOCK_R, _moe_gemv_mxfp4_kernel, _mxfp4_dequant_kernel
from rdnac.kernels.moe_route import moe_route

ACTS = ("silu", "gelu", "gelu_tanh", "swiglu_oai")
SCAN_BLOCK = 256  # routed slots per step of the count and align kernels
SUM_BLOCK = 1024  # hidden columns per program of the top-k sum
# Up to this many routed slots (a decode step of 64 tokens, top-8) the align kernel counts the experts
# itself, one launch fewer: E programs x slots x E compares stays a few thousand per program.
COUNT_IN_ALIGN_MAX_SLOTS = 512
COUNT_TILE = 4096  # slots x experts compared per step when counting in the align kernel
_SUM = tl.standard._sum_combine  # tl.sum / tl.cumsum are jit functions the interpreter path cannot call

# Shape ints fixed by the weights (never token counts): binaries specialize on their divisibility by 16.
AOT_DIVISIBLE = {"_moe_sum_kernel": ("H",)}


@triton.jit
def _moe_count_kernel(ids_ptr, counts_ptr, num_slots, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    # ids [num_slots] int32 -> counts[e] = how many slots chose expert e (program e)
    expert = tl.program_id(0)
    hits = tl.full((BLOCK_S,), 0, tl.int32)
    for s0 in range(0, num_slots, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1)
        hits += (ids == expert).to(tl.int32)
    tl.store(counts_ptr + expert, tl.reduce(hits, 0, _SUM))


@triton.jit
def _moe_align_kernel(ids_ptr, counts_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, num_slots, num_experts,
                      BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
                      COUNT: tl.constexpr = False, BLOCK_C: tl.constexpr = 16, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    # program e: its slots at sorted[start : start + count] in slot order, the sentinel num_slots up to
    # start + padded, block_expert[start / BLOCK_M + b] = e; program 0: num_padded = the padded total.
    # COUNT: every program counts all experts itself ([BLOCK_C, BLOCK_E] compares per step), so the count
    # launch goes; worth it while the routed slots are few (decode), not at prefill.
    expert = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    if COUNT:
        offs_c = tl.arange(0, BLOCK_C)
        counts = tl.full((BLOCK_E,), 0, tl.int32)
        for c0 in range(0, num_slots, BLOCK_C):
            ids = tl.load(ids_ptr + c0 + offs_c, mask=c0 + offs_c < num_slots, other=-1)  # [BC]
            counts += tl.reduce((ids[:, None] == offs_e[None, :]).to(tl.int32), 0, _SUM)
    else:
        counts = tl.load(counts_ptr + offs_e, mask=offs_e < num_experts, other=0)  # [BE]
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.reduce(tl.where(offs_e < expert, padded, 0), 0, _SUM)
    count = tl.reduce(tl.where(offs_e == expert, counts, 0), 0, _SUM)
    my_padded = tl.reduce(tl.where(offs_e == expert, padded, 0), 0, _SUM)
    tl.store(num_padded_ptr, tl.reduce(padded, 0, _SUM), mask=expert == 0)
    offs_s = tl.arange(0, BLOCK_S)
    for b0 in range(0, my_padded // BLOCK_M, BLOCK_S):
        tl.store(block_expert_ptr + start // BLOCK_M + b0 + offs_s, expert, mask=b0 + offs_s < my_padded // BLOCK_M)
    offs_p = tl.arange(0, BLOCK_M)
    tl.store(sorted_ptr + start + count + offs_p, num_slots, mask=count + offs_p < my_padded)
    pos = start  # where this expert's next slot goes
    for s0 in range(0, num_slots, BLOCK_S):
        offs = s0 + offs_s
        hit = (tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1) == expert).to(tl.int32)  # [BS]
        rank = tl.associative_scan(hit, 0, _SUM)  # inclusive: 1 at the block's first hit
        tl.store(sorted_ptr + pos + rank - 1, offs, mask=hit == 1)
        pos += tl.reduce(hit, 0, _SUM)


@triton.jit
def _moe_sum_kernel(y_ptr, ids_ptr, out_ptr, H, NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr,
                    BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    # y [T * TOP_K, H] float32 (weighted expert outputs per slot) -> out [T, H]: the k slots in order. A slot
    # whose id is outside [0, NUM_EXPERTS) (-1: another rank's expert) was sorted into no block, so its y row
    # was never written: it adds nothing.
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    total = tl.full((BLOCK_H,), 0.0, tl.float32)
    for j in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + token * TOP_K + j)
        width = tl.where((expert >= 0) & (expert < NUM_EXPERTS), H, 0)  # a dropped slot's row: no columns
        total += tl.load(y_ptr + (token * TOP_K + j) * H + offs, mask=offs < width, other=0.0)
    tl.store(out_ptr + token * H + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- wrappers


def sort_bound(num_slots: int, num_experts: int, block_m: int) -> int:
    """Rows of the expert-sorted slot list, from shapes only: every slot, plus the padding of each
    expert that can hold one (at most min(E, slots) of them), rounded up to whole blocks."""
    return cdiv(num_slots + min(num_experts, num_slots) * (block_m - 1), block_m) * block_m


def sort_slots(ids: torch.Tensor, num_experts: int, block_m: int, launcher: Launcher):
    """(sorted [bound] int32, block_expert [bound / block_m] int32, num_padded [1] int32) of ids [T, k]:
    the slots grouped by expert, each expert's rows aligned to block_m (see the module docstring)."""
    num_slots = ids.numel()
    bound = sort_bound(num_slots, num_experts, block_m)
    dev = ids.device
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)  # [E]
    sorted_slots = torch.empty(bound, dtype=torch.int32, device=dev)  # [bound]
    block_expert = torch.empty(bound // block_m, dtype=torch.int32, device=dev)  # [bound / BM]
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    block_e = next_power_of_2(num_experts)
    count_in_align = num_slots <= COUNT_IN_ALIGN_MAX_SLOTS
    if not count_in_align:
        launcher.launch(_moe_count_kernel, (num_experts,), (ids, counts, num_slots),
                        constexprs=dict(BLOCK_S=SCAN_BLOCK), num_warps=4, num_stages=1)
    launcher.launch(_moe_align_kernel, (num_experts,),
                    (ids, counts, sorted_slots, block_expert, num_padded, num_slots, num_experts),
                    constexprs=dict(BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_S=SCAN_BLOCK, COUNT=count_in_align,
                                    BLOCK_C=max(1, COUNT_TILE // block_e)),
                    num_warps=4, num_stages=1)
    return sorted_slots, block_expert, num_padded


def _fused_moe(x, weights, ids, w13, w13_scales, w2, w2_scales, b13, b2, act, alpha, limit, config, launcher):
    is_mxfp4 = w13_scales is not None
    T, H = x.shape
    E = w13.shape[0]
    top_k = ids.shape[1]
    inter = w13.shape[1] // 2
    assert act in ACTS, f"moe_experts requires act in {ACTS}; got {act!r}"
    assert tuple(weights.shape) == tuple(ids.shape) == (T, top_k), (weights.shape, ids.shape)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32, (ids.dtype, weights.dtype)
    assert x.stride(1) == 1, "moe_experts: x needs unit stride along H"
    k13, k2 = (2 * w13.shape[2], 2 * w2.shape[2]) if is_mxfp4 else (w13.shape[2], w2.shape[2])
    assert k13 == H and k2 == inter and w2.shape[:2] == (E, H), (tuple(w13.shape), tuple(w2.shape))
    if is_mxfp4:
        assert w13.dtype == w2.dtype == w13_scales.dtype == w2_scales.dtype == torch.uint8
        assert w13_scales.shape == (E, 2 * inter, H // 32) and w2_scales.shape == (E, H, inter // 32)
    else:
        assert w13.dtype == w2.dtype == x.dtype, f"moe_experts: x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype}"
    assert (b13 is None) == (b2 is None)
    for w in (w13, w2, w13_scales, w2_scales, b13, b2):
        assert w is None or w.is_contiguous(), "moe_experts: expert weights must be contiguous"
    out = torch.empty((T, H), dtype=x.dtype, device=x.device)  # [T, H]
    if T == 0:
        return out
    c = config["constexprs"]
    block_m, block_n, block_k = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    assert block_k % 32 == 0, f"moe_experts: BLOCK_K must be a multiple of 32 (MXFP4 scale blocks); got {config}"
    ids, weights = ids.contiguous(), weights.contiguous()  # slot s = t * k + j
    num_slots = T * top_k
    sorted_slots, block_expert, num_padded = sort_slots(ids, E, block_m, launcher)
    num_blocks = block_expert.shape[0]
    has_bias = b13 is not None
    hidden = torch.empty((num_slots, inter), dtype=x.dtype, device=x.device)  # [T*k, I]
    y = torch.empty((num_slots, H), dtype=torch.float32, device=x.device)  # [T*k, H]
    warps, stages = config["num_warps"], config["num_stages"]
    # MXFP4 paths (moe_gemv.py): GEMV decodes in a matrix-free loop (decode sizes); DEQUANT writes each
    # projection's experts as x's dtype once into one scratch and runs the dense GEMM over it (prefill).
    is_gemv, is_dequant = is_mxfp4 and c.get("GEMV", False), is_mxfp4 and c.get("DEQUANT", False)
    scratch = torch.empty(E * 2 * inter * H, dtype=x.dtype, device=x.device) if is_dequant else None
    flags = dict(ACT=act, HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    if not is_gemv:
        flags["MXFP4"] = is_mxfp4 and not is_dequant
    kernel = _moe_gemv_mxfp4_kernel if is_gemv else _moe_gemm_kernel
    for gated, a, w, ws, bias, n, k, dst in ((True, x, w13, w13_scales, b13, inter, H, hidden),
                                             (False, hidden, w2, w2_scales, b2, H, inter, y)):
        if is_dequant:  # [E, rows, K/2] bytes -> scratch [E, rows, K]
            w_dense = scratch[:w.numel() * 2].view(E, w.shape[1], k)
            launcher.launch(_mxfp4_dequant_kernel, (cdiv(E * w.shape[1], DEQUANT_BLOCK_R), cdiv(k, DEQUANT_BLOCK_K)),
                            (w, ws, w_dense, E * w.shape[1], k),
                            constexprs=dict(BLOCK_R=DEQUANT_BLOCK_R, BLOCK_K=DEQUANT_BLOCK_K), num_warps=4,
                            num_stages=1)
            w, ws = w_dense, None
        ws_arg = ws if ws is not None else w  # never read without MXFP4
        launcher.launch(kernel, (num_blocks, cdiv(n, block_n)),
                        (a, w, ws_arg, bias if has_bias else w, weights, dst, sorted_slots, block_expert, num_padded,
                         num_slots, n, k, a.stride(0), w.stride(0), w.stride(1), ws_arg.stride(0), ws_arg.stride(1),
                         bias.stride(0) if has_bias else 0, dst.stride(0), float(alpha), float(limit)),
                        constexprs=dict(flags, GATED=gated, ROW_DIV=top_k if gated else 1),
                        num_warps=warps, num_stages=stages)
    launcher.launch(_moe_sum_kernel, (T, cdiv(H, SUM_BLOCK)), (y, ids, out, H),
                    constexprs=dict(NUM_EXPERTS=E, TOP_K=top_k, BLOCK_H=SUM_BLOCK), num_warps=4, num_stages=1)
    return out


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                b13: torch.Tensor | None = None, b2: torch.Tensor | None = None, *, act: str,
                alpha: float = 1.702, limit: float = 7.0, config: dict, launcher: Launcher) -> torch.Tensor:
    """[T, H]: each token's k experts (w13 [E, 2I, H], w2 [E, H, I], x's dtype) weighted and summed."""
    return _fused_moe(x, weights, ids, w13, None, w2, None, b13, b2, act, alpha, limit, config, launcher)


def moe_experts_mxfp4(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13_blocks: torch.Tensor,
                      w13_scales: torch.Tensor, w2_blocks: torch.Tensor, w2_scales: torch.Tensor,
                      b13: torch.Tensor | None = None, b2: torch.Tensor | None = None, *, act: str,
                      alpha: float = 1.702, limit: float = 7.0, config: dict, launcher: Launcher) -> torch.Tensor:
    """moe_experts with both expert weights in MXFP4 (blocks u8 [E, N, K/2], e8m0 scales u8 [E, N, K/32])."""
    return _fused_moe(x, weights, ids, w13_blocks, w13_scales, w2_blocks, w2_scales, b13, b2, act, alpha, limit,
                      config, launcher)


def moe_experts_fp8_block(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
                          w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, *, act: str,
                          fp8_format: str, act_scheme: str, block_size: list, alpha: float = 1.702,
                          limit: float = 7.0, config: dict, launcher: Launcher) -> torch.Tensor:
    """moe_experts with FP8 experts in [bn, bk] blocks (`moe_fp8.py`): x, then the [T*k, I] intermediate,
    quantized per (row, bk columns) by `fp8_quant` (act_scheme dynamic_group; "none": a16w8), each
    projection one block-scaled grouped GEMM; seven launches (six at decode, as moe_experts)."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    inter, top_k = two_i // 2, ids.shape[1]
    bn, bk = block_size
    assert act in ACTS and act_scheme in ("dynamic_group", "none"), (act, act_scheme)
    assert w13.dtype == w2.dtype == FORMATS[fp8_format], f"moe_experts_fp8_block: {fp8_format} weights; got {w13.dtype}"
    assert tuple(w2.shape) == (E, H, inter) and tuple(w13_scale.shape) == (E, 2 * cdiv(inter, bn), cdiv(H, bk)) \
        and tuple(w2_scale.shape) == (E, cdiv(H, bn), cdiv(inter, bk)), (w13.shape, w13_scale.shape, w2_scale.shape)
    assert tuple(weights.shape) == tuple(ids.shape) == (T, top_k) and ids.dtype == torch.int32
    assert x.stride(1) == 1 and all(w.is_contiguous() for w in (w13, w13_scale, w2, w2_scale))
    out = torch.empty((T, H), dtype=x.dtype, device=x.device)  # [T, H]
    if T == 0:
        return out
    c = config["constexprs"]
    block_m, block_n, block_k = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    assert bk % block_k == 0, f"moe_experts_fp8_block: BLOCK_K {block_k} must divide the scale block's K {bk}"
    ids, weights = ids.contiguous(), weights.contiguous()  # slot s = t * k + j
    num_slots = T * top_k
    sorted_slots, block_expert, num_padded = sort_slots(ids, E, block_m, launcher)
    is_a16 = act_scheme == "none"
    hidden = torch.empty((num_slots, inter), dtype=x.dtype, device=x.device)  # [T*k, I]
    y = torch.empty((num_slots, H), dtype=torch.float32, device=x.device)  # [T*k, H]
    for gated, a, w, ws, n, dst in ((True, x, w13, w13_scale, inter, hidden), (False, hidden, w2, w2_scale, H, y)):
        if is_a16:
            a_scale = weights  # never read
        else:  # [rows, K] fp8 and its [rows, cdiv(K, bk)] scales: linear_fp8's dynamic_group
            a, a_scale = quantize_activations(a, None, fp8_format, bk, launcher=launcher)
        launcher.launch(_moe_fp8_block_gemm_kernel, (block_expert.shape[0], cdiv(n, block_n)),
                        (a, a_scale, w, ws, weights, dst, sorted_slots, block_expert, num_padded, num_slots, n,
                         a.shape[1], a.stride(0), 0 if is_a16 else a_scale.stride(0), w.stride(0), w.stride(1),
                         ws.stride(0), ws.stride(1), dst.stride(0), float(alpha), float(limit)),
                        constexprs=dict(GATED=gated, ROW_DIV=top_k if gated else 1, ACT=act, IS_A16=is_a16,
                                        SCALE_BLOCK_N=bn, SCALE_BLOCK_K=bk, BLOCK_M=block_m, BLOCK_N=block_n,
                                        BLOCK_K=block_k),
                        num_warps=config["num_warps"], num_stages=config["num_stages"])
    launcher.launch(_moe_sum_kernel, (T, cdiv(H, SUM_BLOCK)), (y, ids, out, H),
                    constexprs=dict(NUM_EXPERTS=E, TOP_K=top_k, BLOCK_H=SUM_BLOCK), num_warps=4, num_stages=1)
    return out


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel, dtype_name  # noqa: E402


def _route_problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:
    return {"op": "moe_route", "M": ins[0].shape[0], "E": ins[0].shape[1], "top_k": a["top_k"],
            "scoring": a["scoring"]}


def _experts_problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:
    # ins: x, weights, ids, then w13, w2 (dense) or w13 blocks, scales, w2 blocks, scales (MXFP4) or w13, its
    # scales, w2, its scales (FP8 block), then b13, b2
    x, weights, w13 = ins[0], ins[1], ins[3]
    is_mxfp4, is_fp8 = w13.dtype == torch.uint8, w13.dtype in FORMATS.values()
    num_weight_inputs = 4 if is_mxfp4 or is_fp8 else 2
    w2 = ins[3 + num_weight_inputs // 2]  # [E, H, I] (MXFP4: [E, H, I/2] bytes)
    fmt = "mxfp4" if is_mxfp4 else "fp8_block" if is_fp8 else "dense"
    p = {"op": "moe_experts", "M": x.shape[0], "E": w13.shape[0], "H": x.shape[1],
         "I": w2.shape[2] * (2 if is_mxfp4 else 1), "top_k": weights.shape[1], "dtype": dtype_name(x),
         "weight_format": fmt, "has_bias": len(ins) == 5 + num_weight_inputs, "act": a["act"]}
    if is_fp8:  # activations FP8 (w8a8) or x's dtype (a16w8): the tiles' LDS and the tuning key differ
        p["act_scheme"] = a["act_scheme"]
    return p


FAMILY = KernelFamily("moe", config_space=config_space, default_config=default_config, cost_model="moe",
                      tuning_key=("op", "E", "H", "I", "top_k", "dtype", "weight_format"),
                      ops={"moe_route": OpKernel(moe_route, _route_problem),
                           "moe_experts": OpKernel(moe_experts, _experts_problem),
                           "moe_experts_mxfp4": OpKernel(moe_experts_mxfp4, _experts_problem),
                           "moe_experts_fp8_block": OpKernel(moe_experts_fp8_block, _experts_problem)})
