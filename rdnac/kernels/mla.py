"""MLA kernel family: IR ops `mla_cache_write` and `mla_attention` (references: rdnac/ir/mla.py).

`mla_cache_write`: one program per token writes [latent, rope(k_pe)] (R + Dr
wide) to its slot of the paged latent cache; slots < 0 (padding) are
skipped. k_pe is rotated with `rope.rope_lanes` (the reference's rounding).
`mla_attention`: the absorbed form in both phases, `rdnac.kernels.mla_attention`.

Config spaces (problem keys: op, phase, num_heads, kv_lora_rank,
qk_rope_head_dim, block_size, max_model_len, dtype, num_seqs, num_tokens):
  mla_cache_write: num_warps {1, 2, 4}.
  mla_attention: BLOCK_M (rows: heads, or (token, head) pairs in prefill) {16, 32} (+64 in prefill) x
    BLOCK_N (keys) {16, 32} x BLOCK_V (output latent columns per program: R, R/2, R/4; a narrower slice
    recomputes the scores per slice but holds a smaller accumulator) x num_warps {8, 4} x num_stages
    {1, 2} (x NUM_SPLITS {1, 2, 4, 8, 16} in decode); BLOCK_K 64 (score chunks over R).
    Default: 16 x 16, BLOCK_V = R, 8 warps, 1 stage; decode splits about one per 512 keys of
    max_model_len, fewer for big batches. The space is ordered, default first, with no cost model: the
    register pressure that decides (the layouts of a 512-wide dot) is the probe's to measure.
    The space ends with the least a program can hold (16 x 16, BLOCK_K 32, BLOCK_V R/4, 4 warps).
A 576-wide head (R 512 + Dr 64, DeepSeek V3) is the stress case; kernel selection rejects configs whose
binaries exceed LDS or spill (logged with the sizes) and moves to the next. Measured on the binaries
(16 heads, BLOCK_K 64, BLOCK_V 512, 16x16 on 8 warps, 1 stage), Triton 3.9: gfx1201 138-139 VGPRs,
gfx1151 201-202, gfx942 94-96, gfx950 96 (16 KiB LDS each), sm90 100 (decode) / 126 (prefill)
registers; Triton 3.6 (the GPU machine's): gfx1201 133-134, sm90 107 / 128. 16x32 on 2 stages fits
everywhere too (gfx1151 at 249-250 VGPRs is the tightest); 64x32 spills on gfx1151, gfx942 and gfx950.
The score chunks must be a loop, and its bound a runtime int (`mla_attention._mla_kernel`): unrolled
(all of R's chunks in flight at once) the same tile spilled 67 registers on gfx1201 and 288 on
gfx1151, and Triton 3.6's LLVM unrolled a constexpr-bounded loop by itself (75-212 spilled on gfx1201
for every tile in the space).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.launch import Launcher, next_power_of_2
from rdnac.kernels.rope import rope_lanes

AOT_DIVISIBLE = {"_mla_cache_write_kernel": ("stride_lt", "stride_kt", "stride_cb", "stride_cs")}


@triton.jit
def _mla_cache_write_kernel(latent_ptr, k_pe_ptr, positions_ptr, slot_mapping_ptr, inv_freq_ptr, cache_ptr,
                            stride_lt, stride_kt, stride_cb, stride_cs, attention_scaling,
                            RANK: tl.constexpr, ROPE_DIM: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr, IS_NEOX: tl.constexpr,
                            PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # a padding token
        return
    entry = cache_ptr + (slot // KV_BLOCK_SIZE) * stride_cb + (slot % KV_BLOCK_SIZE) * stride_cs
    r = tl.arange(0, BLOCK_R)
    latent = tl.load(latent_ptr + token * stride_lt + r, mask=r < RANK, other=0.0)
    tl.store(entry + r, latent.to(cache_ptr.dtype.element_ty), mask=r < RANK)
    act = k_pe_ptr.dtype.element_ty
    d = tl.arange(0, BLOCK_DR)
    partner, sign, is_rotated, cos, sin = rope_lanes(positions_ptr, inv_freq_ptr, token, attention_scaling, d, act,
                                                     ROPE_DIM, IS_NEOX)
    d_ok = d < ROPE_DIM
    x = tl.load(k_pe_ptr + token * stride_kt + d, mask=d_ok, other=0.0).to(tl.float32)
    x_partner = tl.load(k_pe_ptr + token * stride_kt + partner, mask=d_ok, other=0.0).to(tl.float32)
    k_rot = ((x * cos).to(act).to(tl.float32) + sign * (x_partner * sin).to(act).to(tl.float32)).to(act)
    tl.store(entry + RANK + d, k_rot.to(cache_ptr.dtype.element_ty), mask=d_ok)


def mla_cache_write(latent: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                    latent_cache: torch.Tensor, *, kv_lora_rank: int, qk_rope_head_dim: int, style: str = "gptj",
                    inv_freq: torch.Tensor, attention_scaling: float, config: dict, launcher: Launcher,
                    **rope_attrs) -> None:
    """latent [T, R] and k_pe [T, Dr] (rows may be strided views of kv_a_proj's output) into latent_cache
    [NB, BS, R + Dr] at slot_mapping; theta/scaling arrive as `inv_freq` / `attention_scaling`."""
    rank, dr = kv_lora_rank, qk_rope_head_dim
    assert latent.stride(1) == 1 and k_pe.stride(1) == 1 and latent_cache.stride(2) == 1
    assert latent_cache.shape[2] == rank + dr, (latent_cache.shape, rank, dr)
    num_tokens = latent.shape[0]
    if num_tokens == 0:
        return
    launcher.launch(_mla_cache_write_kernel, (num_tokens,),
                    (latent, k_pe, positions, slot_mapping, inv_freq, latent_cache, latent.stride(0), k_pe.stride(0),
                     latent_cache.stride(0), latent_cache.stride(1), float(attention_scaling)),
                    constexprs={"RANK": rank, "ROPE_DIM": dr, "KV_BLOCK_SIZE": latent_cache.shape[1],
                                "BLOCK_R": next_power_of_2(rank), "BLOCK_DR": next_power_of_2(dr),
                                "IS_NEOX": style == "neox"},
                    num_warps=config["num_warps"], num_stages=config["num_stages"])


# ---------------------------------------------------------------- configs


def _config(num_warps: int, num_stages: int, **constexprs: int) -> dict:
    return {"constexprs": constexprs, "num_warps": num_warps, "num_stages": num_stages}


def config_space(problem: dict) -> list[dict]:
    """The default first, then tiles in decreasing size of what a program holds: a narrower output slice
    (BLOCK_V), 4 warps, then wider key tiles and 2 stages; see the module docstring."""
    if problem["op"] == "mla_cache_write":
        return [_config(w, 1) for w in (1, 2, 4)]
    width = max(16, next_power_of_2(problem["kv_lora_rank"]))
    slices = sorted({max(16, width // d) for d in (1, 2, 4)}, reverse=True)
    decode = problem["phase"] == "decode"
    splits = sorted({decode_splits(problem), 1, 2, 4, 8, 16}, key=lambda s: s != decode_splits(problem)) \
        if decode else [None]
    space = [_config(w, st, BLOCK_M=m, BLOCK_N=n, BLOCK_K=min(64, width), BLOCK_V=v,
                     **({"NUM_SPLITS": sp} if decode else {}))
             for sp in splits for st in (1, 2) for n in (16, 32) for m in (16, 32) + (() if decode else (64,))
             for v in slices for w in (8, 4)]
    # last, the least a program can hold: the narrowest output slice, 32-wide score chunks, 4 warps
    space += [_config(4, 1, BLOCK_M=16, BLOCK_N=16, BLOCK_K=min(32, width), BLOCK_V=slices[-1],
                      **({"NUM_SPLITS": sp} if decode else {})) for sp in splits]
    default = default_config(problem)
    return [default] + [c for i, c in enumerate(space) if c != default and c not in space[:i]]


def default_config(problem: dict) -> dict:
    """Fits every target without spills at a 576-wide head (R 512 + Dr 64; tests/test_kernels_mla.py)."""
    if problem["op"] == "mla_cache_write":
        return _config(2 if problem["kv_lora_rank"] + problem["qk_rope_head_dim"] > 256 else 1, 1)
    width = max(16, next_power_of_2(problem["kv_lora_rank"]))
    tile = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=min(64, width), BLOCK_V=width)
    if problem["phase"] == "decode":
        return _config(8, 1, **tile, NUM_SPLITS=decode_splits(problem))
    return _config(8, 1, **tile)


def decode_splits(problem: dict) -> int:
    """About one split per 512 keys of max_model_len (at most 16), fewer while the batch fills the GPU."""
    splits = min(16, max(1, next_power_of_2(problem.get("max_model_len", 4096) // 512)))
    busy = problem.get("num_seqs", 1) * -(-problem["num_heads"] // 16)
    while splits > 1 and busy * splits > 1024:
        splits //= 2
    return splits


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.ir.rope_math import rope_inv_freq  # noqa: E402
from rdnac.kernels import mla_attention  # noqa: E402
from rdnac.kernels.registry import KernelFamily, OpKernel, dtype_name  # noqa: E402


def rope_tables(attrs: dict, device) -> dict:
    """inv_freq [Dr/2] float32 and attention_scaling of the node's RoPE, once per node at plan load."""
    inv_freq, scaling = rope_inv_freq(attrs["qk_rope_head_dim"], attrs["theta"], attrs.get("scaling"))
    return {"inv_freq": inv_freq.to(device), "attention_scaling": scaling}


def _problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:
    p = {"phase": phase, "kv_lora_rank": a["kv_lora_rank"], "qk_rope_head_dim": a["qk_rope_head_dim"],
         "dtype": dtype_name(ins[0]), "num_tokens": ins[0].shape[0]}
    if "num_heads" not in a:
        return {"op": "mla_cache_write", **p}
    return {"op": "mla_attention", **p, "num_heads": a["num_heads"], "qk_nope_head_dim": a["qk_nope_head_dim"],
            "v_head_dim": a["v_head_dim"], "block_size": runtime["kv_block_size"],
            "max_model_len": runtime["max_model_len"], "num_seqs": ins[3].shape[0]}


FAMILY = KernelFamily(
    "mla", config_space=config_space, default_config=default_config,
    tuning_key=("op", "phase", "num_heads", "kv_lora_rank", "qk_rope_head_dim", "block_size", "dtype"),
    size=lambda p: p.get("num_seqs", 1) if p["phase"] == "decode" else p["num_tokens"],
    ops={"mla_cache_write": OpKernel(mla_cache_write, _problem, node_kwargs=rope_tables),
         "mla_attention": OpKernel(mla_attention.mla_attention_prefill, _problem,
                                   decode=mla_attention.mla_attention_decode, node_kwargs=rope_tables,
                                   takes_max_query_len=True)})
