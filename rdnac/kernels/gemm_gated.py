"""Gated GEMM family: IR op `linear_gated_act`, m = gated_act(x @ W.T + bias, act) in one kernel.

W [2I, K] is a merged gate/up weight (rows [0, I) gate, [I, 2I) up, as
`merge_linears` writes it). A program owns BLOCK_N output columns n of
[0, I) and keeps two fp32 accumulators over `gemm._gemm_kernel`'s K loop:
acc_g over gate rows n and acc_u over up rows I + n (one x tile load, two
weight tile loads and two dots per K step). The epilogue adds the bias
halves, rounds both to the output dtype (what the unfused GEMM writes), then
applies `activation._gated_act_kernel`'s formula op for op, so m is the
unfused pair's output bit for bit (same tile shape and K order); the [T, 2I]
gate_up tensor and the activation launch are gone.

SPLIT_K is not supported (the activation needs the whole K sum): the kernel
has no split constexpr. Two other forms are configs of this node too, with the
merged GEMM's constexprs plus a flag, offered only by `rdnac tune` for the sizes
where they measure faster (on an H200 the fused kernel wins at one token and
loses at prefill sizes, where one [128, 256] wgmma tile beats two [128, 128]
accumulators):
  UNFUSED: the unfused pair, `gemm.linear` writing gate_up [M, 2I], then
           `activation.gated_act` with the config's `act_config`;
  WIDE:    `gemm._gemm_kernel` with GATED=act: one merged tile holds gate and
           up columns interleaved (BLOCK_N / 2 pairs) and its epilogue stores
           act(gate) * up, so [M, 2I] and the second launch are gone; split-K
           only with SELF_REDUCE (`wide_configs`).
WIDE writes the unfused pair's bits for the same GEMM config (each output
element's K loop is the same). The config space is gemm's for the merged
[2I, K] GEMM in the same M regime, SPLIT_K 1 only, with BLOCK_N halved: a
program's 2 x BLOCK_N accumulator columns are one gemm tile's worth of
registers, LDS and weight bytes. `config_space(problem)` takes {"M": bucket
label (see `gemm.m_bucket`), "N": I (the output width), "K", "dtype", "act"}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels import activation, gemm
from rdnac.kernels.activation import ACTIVATIONS, activate
from rdnac.kernels.gemm_tiles import tile_of, tile_ranges
from rdnac.kernels.launch import Launcher, cdiv

# Shape ints fixed by the weights (never token counts): binaries specialize on their divisibility by 16.
AOT_DIVISIBLE = {"_gemm_gated_kernel": ("N", "K", "stride_xm", "stride_wn", "stride_om")}


@triton.jit
def _gemm_gated_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                       ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_SIZE_M: tl.constexpr, PDL: tl.constexpr = False):
    # x: [M, K]; w: [2N, K] (gate rows, then up rows); bias: [2N]; out: [M, N]
    pid = tl.program_id(0)
    pid_m, pid_n = tile_of(pid, M, N, BLOCK_M, BLOCK_N, GROUP_SIZE_M)
    offs_m, offs_n, mask_m, mask_n = tile_ranges(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    if PDL:  # programmatic dependent launch: wait for the previous kernel (the trigger is after the loop)
        gdc_wait()
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm  # [BM] row pointers
    gate_cols = w_ptr + offs_n.to(tl.int64) * stride_wn  # [BN] gate rows of w
    up_cols = w_ptr + (N + offs_n).to(tl.int64) * stride_wn  # [BN] up rows of w

    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    a_ptrs = x_rows[:, None] + offs_k[None, :]  # [BM, BK]
    bg_ptrs = gate_cols[None, :] + offs_k[:, None]  # [BK, BN]
    bu_ptrs = up_cols[None, :] + offs_k[:, None]  # [BK, BN]
    acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.zeros is a jit function
    acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0  # masks the K tail of the last step
        # other=0, not 0.0: the interpreter converts a float `other` to bf16 bit by bit on every load.
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0)
        b_mask = (offs_k[:, None] < k_left) & mask_n[None, :]
        bg = tl.load(bg_ptrs, mask=b_mask, other=0)
        bu = tl.load(bu_ptrs, mask=b_mask, other=0)
        acc_g = tl.dot(a, bg, acc_g, input_precision="ieee")  # [BM, BN]; ieee: no tf32 for fp32 inputs
        acc_u = tl.dot(a, bu, acc_u, input_precision="ieee")
        a_ptrs += BLOCK_K
        bg_ptrs += BLOCK_K
        bu_ptrs += BLOCK_K

    if PDL:  # the main loop is done: let the next kernel's blocks be scheduled (as _gemm_kernel does)
        gdc_launch_dependents()
    if HAS_BIAS:
        acc_g += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(bias_ptr + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    # Round as the unfused GEMM stores gate_up, then _gated_act_kernel's formulas (activation.activate).
    act_dtype = out_ptr.dtype.element_ty
    gate = acc_g.to(act_dtype).to(tl.float32)
    up = acc_u.to(act_dtype).to(tl.float32)
    act = activate(gate, ACT)
    act = act.to(act_dtype).to(tl.float32)
    out_offs = offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptr + out_offs, (act * up).to(act_dtype), mask=mask_m[:, None] & mask_n[None, :])


def linear_gated_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, act: str = "silu",
                     config: dict, launcher: Launcher) -> torch.Tensor:
    """m [M, I] = act(gate) * up, where [gate | up] = x [M, K] @ weight [2I, K].T + bias [2I], in x's dtype."""
    gemm._check_operands("linear_gated_act", x, weight)
    assert act in ACTIVATIONS, f"linear_gated_act requires act in {ACTIVATIONS}; got {act!r}"
    M, width, K = x.shape[0], weight.shape[0], weight.shape[1]
    assert width % 2 == 0, f"linear_gated_act: weight must be [2I, K] (gate rows, then up); got {tuple(weight.shape)}"
    N = width // 2
    assert bias is None or tuple(bias.shape) == (width,), \
        f"linear_gated_act: bias must be [{width}]; got {tuple(bias.shape)}"
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)  # [M, I]
    if M == 0:
        return out
    c = config["constexprs"]
    if c.get("WIDE"):  # the merged GEMM's kernel and tile, storing act(gate) * up from its epilogue
        gemm_config = {**config, "constexprs": {k: v for k, v in c.items() if k != "WIDE"}}
        return gemm._launch_gemm(x, None, weight, bias, out, M, 0.0, config=gemm_config, launcher=launcher,
                                 is_gather=False, gated=act)
    if c.get("UNFUSED"):  # measured faster at this size: the merged GEMM, then the activation kernel
        gemm_config = {**config, "constexprs": {k: v for k, v in c.items() if k != "UNFUSED"}}
        del gemm_config["act_config"]
        gate_up = gemm.linear(x, weight, bias, config=gemm_config, launcher=launcher)  # [M, 2I]
        return activation.gated_act(gate_up, act=act, config=config["act_config"], launcher=launcher)
    assert c.get("SPLIT_K", 1) == 1, f"linear_gated_act has no split-K; got config {config}"
    block_m, block_n = c["BLOCK_M"], c["BLOCK_N"]
    grid = (cdiv(M, block_m) * cdiv(N, block_n),)
    launcher.launch(_gemm_gated_kernel, grid,
                    (x, weight, bias if bias is not None else weight,  # bias never read without HAS_BIAS
                     out, M, N, K, x.stride(0), weight.stride(0), out.stride(0)),
                    constexprs=dict(ACT=act, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                                    BLOCK_K=c["BLOCK_K"], GROUP_SIZE_M=c["GROUP_SIZE_M"]),
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


# ---------------------------------------------------------------- configs


def from_gemm_configs(configs: list[dict]) -> list[dict]:
    """gemm configs of the merged [2I, K] GEMM -> gated configs: SPLIT_K 1 only (no SELF_REDUCE),
    BLOCK_N halved (two accumulators of BLOCK_N columns) down to tl.dot's smallest N, 16; order kept."""
    out: list[dict] = []
    for cfg in configs:
        c = cfg["constexprs"]
        if c.get("SPLIT_K", 1) != 1 or c.get("SELF_REDUCE") or c.get("QUANT_A") or c["BLOCK_N"] // 2 < 16:
            continue
        gated = {"constexprs": {"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"] // 2, "BLOCK_K": c["BLOCK_K"],
                                "GROUP_SIZE_M": c["GROUP_SIZE_M"]},
                 "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        if gated not in out:
            out.append(gated)
    return out


def unfused_configs(configs: list[dict], problem: dict) -> list[dict]:
    """gemm configs of the merged [2I, K] GEMM -> configs that run it, then `activation.gated_act` with
    its default config: the unfused pair as a choice of this node (the same bits; `rdnac tune` offers
    them so a size where the fused kernel is slower keeps the two launches)."""
    act_config = activation.default_config({"I": problem["N"]})
    return [{**cfg, "constexprs": {**cfg["constexprs"], "UNFUSED": True}, "act_config": act_config} for cfg in configs]


def wide_configs(configs: list[dict]) -> list[dict]:
    """gemm configs of the merged [2I, K] GEMM -> WIDE configs: `gemm._gemm_kernel` with its GATED
    epilogue, the same tile (BLOCK_N columns of the merged GEMM = BLOCK_N / 2 gate/up pairs). A split-K
    config needs SELF_REDUCE (only the tile's last split holds the whole K sum); others are dropped."""
    return [{**cfg, "constexprs": {**cfg["constexprs"], "WIDE": True}} for cfg in configs
            if cfg["constexprs"].get("SPLIT_K", 1) == 1 or cfg["constexprs"].get("SELF_REDUCE")]


def merged_problem(problem: dict) -> dict:
    return {"M": problem["M"], "N": 2 * problem["N"], "K": problem["K"], "dtype": problem.get("dtype"),
            "has_bias": False}


def config_space(problem: dict) -> list[dict]:
    """Candidates for {"M": bucket label, "N": I, "K", "dtype", "act"} (dtype and act do not change them)."""
    return from_gemm_configs(gemm.config_space(merged_problem(problem)))


def default_config(problem: dict) -> dict:
    """gemm's default for the merged GEMM, without split-K and with BLOCK_N halved (a safe pick; the
    compiler ranks the space with the cost model instead). Decode steps 64 deep, not 128: with two
    weight tiles the 16x32x128 program spills on gfx1201 (Qwen3-8B's MLP, Triton 3.9 cross-compile)."""
    base = gemm.default_config(merged_problem(problem))
    block_k = base["constexprs"]["BLOCK_K"]
    if gemm.m_bucket(problem["M"]) <= gemm.DECODE_MAX_M:
        block_k = gemm._clamp_block_k(64, problem["K"])
    base = {**base, "constexprs": {**base["constexprs"], "SPLIT_K": 1, "BLOCK_K": block_k}}
    (config,) = from_gemm_configs([base])
    return config


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel, dtype_name  # noqa: E402


def _problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:  # N: the output width I (weight [2I, K])
    return {"M": ins[0].shape[0], "N": ins[1].shape[0] // 2, "K": ins[1].shape[1], "dtype": dtype_name(ins[0]),
            "act": a["act"]}


FAMILY = KernelFamily("gemm_gated", config_space=config_space, default_config=default_config,
                      cost_model="gemm_gated", tuning_key=("N", "K", "dtype", "act"),
                      ops={"linear_gated_act": OpKernel(linear_gated_act, _problem)})
