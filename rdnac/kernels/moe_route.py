"""MoE routing kernel: IR op `moe_route`, each token's k experts and their weights from the router logits.

One program per token row reads the row's E logits (BLOCK_E = next power of two >= E) and picks the k
largest, one at a time: the row maximum, then the lowest expert id holding it (exact ties pick the lower
id, as torch.topk on cpu does), which is then masked out. `SCORING`:

- "softmax_topk": softmax over all E in float32, then the k largest probabilities; `RENORMALIZE`
  divides them by their sum (Qwen3-MoE's `norm_topk_prob`, Mixtral).
- "topk_softmax": the k largest logits, then a softmax over those k (GPT-OSS).

DeepSeek's group-limited scorings run `_moe_group_route_kernel`, which holds the row as [groups, experts
per group]: "sigmoid_group_topk" (V3/R1: sigmoid scores, plus `correction_bias` for the choice only; a
group scores the sum of its two best choices) and "softmax_group_topk" (V2: softmax over all E; a group
scores its best expert). The `topk_group` best groups are picked one at a time (lowest group id among
exact ties), then the k best choices inside them as above; the weights are the unbiased scores,
divided by their sum + 1e-20 when `RENORMALIZE`. Every scoring multiplies its weights by
`routed_scaling_factor` last.

Outputs: weights [T, k] float32, ids [T, k] int32, both contiguous. Part of the MoE family record
(`rdnac.kernels.moe.FAMILY`); its config is only the warp count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.ir.moe import GROUP_SCORINGS
from rdnac.kernels.launch import Launcher, next_power_of_2

# tl.max/tl.min/tl.sum are @triton.jit functions the interpreter path cannot call: reduce with the
# standard combine functions instead (see rdnac/kernels/__init__.py)
_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min
_SUM = tl.standard._sum_combine

# the router logits' row stride is the expert count, a model-shape int: AOT binaries specialize on its
# divisibility by 16 as the JIT does (rdnac.kernels.launch.divisible_args)
AOT_DIVISIBLE = {"_moe_route_kernel": ("stride_lm",), "_moe_group_route_kernel": ("stride_lm",)}


@triton.jit
def _moe_route_kernel(logits_ptr, weights_ptr, ids_ptr, E, stride_lm, routed_scaling,
                      TOP_K: tl.constexpr, SCORING: tl.constexpr, RENORMALIZE: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    # logits [T, E] (any float dtype); weights [T, TOP_K] float32, ids [T, TOP_K] int32 (contiguous)
    row = tl.program_id(0).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)  # [BE]
    mask_e = offs_e < E
    x = tl.load(logits_ptr + row * stride_lm + offs_e, mask=mask_e, other=float("-inf")).to(tl.float32)
    if SCORING == "softmax_topk":
        p = tl.exp(x - tl.reduce(x, 0, _MAX))
        p = tl.where(mask_e, p, 0.0)
        score = tl.where(mask_e, p / tl.reduce(p, 0, _SUM), -1.0)  # padding lanes below every probability
    else:
        score = x
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    top = tl.full((BLOCK_K,), float("-inf"), tl.float32)
    top_ids = tl.full((BLOCK_K,), 0, tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.reduce(score, 0, _MAX)
        pick = tl.reduce(tl.where(score == best, offs_e, BLOCK_E), 0, _MIN)  # the lowest id among ties
        top = tl.where(offs_k == j, best, top)
        top_ids = tl.where(offs_k == j, pick, top_ids)
        score = tl.where(offs_e == pick, float("-inf"), score)
    mask_k = offs_k < TOP_K
    if SCORING == "softmax_topk":
        weights = top
        if RENORMALIZE:
            weights = top / tl.reduce(tl.where(mask_k, top, 0.0), 0, _SUM)
    else:  # softmax over the k picked logits; top[0] is their maximum
        w = tl.where(mask_k, tl.exp(top - tl.reduce(top, 0, _MAX)), 0.0)
        weights = w / tl.reduce(w, 0, _SUM)
    weights = weights * routed_scaling
    tl.store(weights_ptr + row * TOP_K + offs_k, weights, mask=mask_k)
    tl.store(ids_ptr + row * TOP_K + offs_k, top_ids, mask=mask_k)


@triton.jit
def _moe_group_route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, stride_lm, routed_scaling,
                            GROUP_SIZE: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                            TOP_K: tl.constexpr, IS_SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                            RENORMALIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
                            BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)  # [BG] groups
    i = tl.arange(0, BLOCK_S)  # [BS] experts within a group
    ok = (g < N_GROUP)[:, None] & (i < GROUP_SIZE)[None, :]
    expert = g[:, None] * GROUP_SIZE + i[None, :]  # [BG, BS] expert ids
    x = tl.load(logits_ptr + row * stride_lm + expert, mask=ok, other=float("-inf")).to(tl.float32)
    if IS_SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))  # padding lanes: 0
        choice = scores
        if HAS_BIAS:  # e_score_correction_bias steers the choice, not the weights
            choice = scores + tl.load(bias_ptr + expert, mask=ok, other=0.0).to(tl.float32)
    else:
        p = tl.where(ok, tl.exp(x - tl.reduce(tl.reduce(x, 1, _MAX), 0, _MAX)), 0.0)
        scores = p / tl.reduce(tl.reduce(p, 1, _SUM), 0, _SUM)
        choice = scores
    choice = tl.where(ok, choice, float("-inf"))
    best = tl.reduce(choice, 1, _MAX)  # [BG]
    if IS_SIGMOID:  # a group's score: its two best choices
        first = tl.reduce(tl.where(choice == best[:, None], i[None, :], BLOCK_S), 1, _MIN)
        group_score = best + tl.reduce(tl.where(i[None, :] == first[:, None], float("-inf"), choice), 1, _MAX)
    else:
        group_score = best
    group_score = tl.where(g < N_GROUP, group_score, float("-inf"))
    chosen = g < 0  # [BG] all False
    for _ in tl.static_range(TOPK_GROUP):
        top_group = tl.reduce(group_score, 0, _MAX)
        pick = tl.reduce(tl.where(group_score == top_group, g, BLOCK_G), 0, _MIN)
        chosen = chosen | (g == pick)
        group_score = tl.where(g == pick, float("-inf"), group_score)
    choice = tl.where(chosen[:, None], choice, float("-inf"))
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    top = tl.full((BLOCK_K,), 0.0, tl.float32)
    top_ids = tl.full((BLOCK_K,), 0, tl.int32)
    for j in tl.static_range(TOP_K):
        best_choice = tl.reduce(tl.reduce(choice, 1, _MAX), 0, _MAX)
        pick = tl.reduce(tl.reduce(tl.where(choice == best_choice, expert, N_GROUP * GROUP_SIZE), 1, _MIN), 0, _MIN)
        weight = tl.reduce(tl.reduce(tl.where(expert == pick, scores, 0.0), 1, _SUM), 0, _SUM)
        top = tl.where(offs_k == j, weight, top)
        top_ids = tl.where(offs_k == j, pick, top_ids)
        choice = tl.where(expert == pick, float("-inf"), choice)
    mask_k = offs_k < TOP_K
    if RENORMALIZE:
        top = top / (tl.reduce(tl.where(mask_k, top, 0.0), 0, _SUM) + 1e-20)
    top = top * routed_scaling
    tl.store(weights_ptr + row * TOP_K + offs_k, top, mask=mask_k)
    tl.store(ids_ptr + row * TOP_K + offs_k, top_ids, mask=mask_k)


def moe_route(router_logits: torch.Tensor, correction_bias: torch.Tensor | None = None, *, top_k: int,
              scoring: str, renormalize: bool = False, n_group: int = 1, topk_group: int = 1,
              routed_scaling_factor: float = 1.0, config: dict, launcher: Launcher) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, ids [T, k] int32) of each token's k experts, from router_logits [T, E]
    (and sigmoid_group_topk's correction_bias [E] float32)."""
    T, E = router_logits.shape
    assert scoring in ("softmax_topk", "topk_softmax", *GROUP_SCORINGS), f"moe_route: unknown scoring {scoring!r}"
    assert 1 <= top_k <= E, f"moe_route: top_k {top_k} must be in [1, {E}]"
    assert router_logits.stride(1) == 1, "moe_route: router logits need unit stride along E"
    weights = torch.empty((T, top_k), dtype=torch.float32, device=router_logits.device)  # [T, k]
    ids = torch.empty((T, top_k), dtype=torch.int32, device=router_logits.device)  # [T, k]
    if T == 0:
        return weights, ids
    if scoring in GROUP_SCORINGS:
        assert E % n_group == 0 and 1 <= topk_group <= n_group, (E, n_group, topk_group)
        launcher.launch(_moe_group_route_kernel, (T,),
                        (router_logits, router_logits if correction_bias is None else correction_bias, weights, ids,
                         router_logits.stride(0), float(routed_scaling_factor)),
                        constexprs=dict(GROUP_SIZE=E // n_group, N_GROUP=n_group, TOPK_GROUP=topk_group, TOP_K=top_k,
                                        IS_SIGMOID=scoring == "sigmoid_group_topk",
                                        HAS_BIAS=correction_bias is not None, RENORMALIZE=bool(renormalize),
                                        BLOCK_G=next_power_of_2(n_group), BLOCK_S=next_power_of_2(E // n_group),
                                        BLOCK_K=next_power_of_2(top_k)),
                        num_warps=config["num_warps"], num_stages=config["num_stages"])
        return weights, ids
    launcher.launch(_moe_route_kernel, (T,), (router_logits, weights, ids, E, router_logits.stride(0),
                                              float(routed_scaling_factor)),
                    constexprs=dict(TOP_K=top_k, SCORING=scoring, RENORMALIZE=bool(renormalize),
                                    BLOCK_E=next_power_of_2(E), BLOCK_K=next_power_of_2(top_k)),
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
    return weights, ids


def route_config_space(problem: dict) -> list[dict]:
    """One row of E logits per program: a warp holds 128 experts; wider routers get 4 warps first."""
    warps = (1, 4) if problem["E"] <= 128 else (4, 1)
    return [{"constexprs": {}, "num_warps": w, "num_stages": 1} for w in warps]
