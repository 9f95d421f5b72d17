"""Config space of the fused MoE family (`rdnac.kernels.moe`): tiles per phase and their LDS estimate.

A `moe_experts(_mxfp4)` config is one tile for both grouped GEMMs ({"BLOCK_M", "BLOCK_N", "BLOCK_K"},
warps, stages); BLOCK_M is also the alignment of each expert's sorted rows. Regimes by the step's
token count M (problem "M"; the node sees T tokens, T * k routed rows):
  decode  M <= 64  : BLOCK_M 16 (tl.dot's smallest; at batch 1 an expert gets one row), narrow deep tiles
  middle  M <= 256 : BLOCK_M 32 / 64
  prefill M > 256  : BLOCK_M 64 / 128, wider tiles and 3 stages; the widest need more LDS than the
                     64 KiB parts have (and than gfx950's 160 KiB), which the cost model's LDS
                     estimate and the compiled binary's `shared` reject, with the size, per target.
Register spills are left to the compiled binaries (kernel selection moves to the next candidate and
logs why); each regime ends with a 32-deep tile that spills on no target.
BLOCK_K >= 32 and a multiple of 32 (MXFP4: a tile's K spans whole scale blocks; its half tiles are
tl.dot's minimum of 16 deep). Candidates are target-agnostic; `rdnac.compiler.cost_model` ranks them.
MXFP4 adds two paths (`moe_gemv.py`): at decode, GEMV tiles (BLOCK_M 1-8 rows, no matrix instruction,
BLOCK_K 128-256 elements = 64-128 contiguous bytes per row per step, one stage: its loads feed no
tl.dot, so nothing is pipelined); above decode, DEQUANT tiles (each dense tile with the experts
decoded once into a scratch of x's dtype). The W4A16 tiles stay candidates in every regime.
FP8 block experts (`moe_fp8.py`) take the dense tiles: BLOCK_K 32-128 divides the 128-wide scale block.
`moe_route` configs are only a warp count (`moe_route.route_config_space`).
"""

from __future__ import annotations

from rdnac.kernels.launch import next_power_of_2
from rdnac.kernels.moe_route import route_config_space

DECODE_MAX_M = 64
MIDDLE_MAX_M = 256
ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


# MXFP4 decode GEMV tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps): on sm90 (Triton 3.9, GPT-OSS-20B shapes) the
# gate/up programs use 80 (1 row), 128 (2 rows) and 254 (4 and 8 rows at 128 deep) registers, none spills.
# gfx1151's are 62-135; 512 deep is 256 contiguous bytes per row per step.
# Session 17's rework (a scale per 32-element group, a cheaper decode) adds deeper and narrower tiles: fewer
# registers per element leave room for 512-byte rows. Listed fastest first as session 17 measured them on an
# H100 at GPT-OSS-20B's T=1 (52.3, 53.1, 56.2, 59.2, 61.1, 61.2, 61.7, 83.9, 103.1, 810.3 us): the cost model
# gives the 1-row tiles whose programs spread evenly over the SMs (1x4x512, 1x8x1024, 1x8x512) the same
# estimate, and a tie keeps this order. 1x8x1024 on 4 warps is out: 154.1 us, its sm90 loop converts the
# tile's layout through shared memory every step (50 barriers per step in the PTX, Triton 3.9).
GEMV_TILES = ((1, 4, 512, 4), (1, 8, 1024, 8), (1, 8, 512, 4), (1, 16, 1024, 8), (1, 16, 512, 4), (1, 16, 256, 4),
              (1, 32, 256, 8), (2, 16, 256, 4), (4, 16, 128, 4), (8, 16, 128, 4))


def _config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int, **flags: bool) -> dict:
    return {"constexprs": {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, **flags},
            "num_warps": num_warps, "num_stages": num_stages}


def _block_k(want: int, K: int) -> int:
    return max(32, min(want, next_power_of_2(K)))


def experts_config_space(problem: dict) -> list[dict]:
    """Candidates for {"M", "E", "H", "I", "top_k", "dtype", "weight_format", "has_bias", "act"}."""
    M, K = problem["M"], min(problem["H"], problem["I"])
    # The last tiles of each regime step 32 deep: MXFP4's decode temporaries spill the wave32 RDNA targets'
    # registers at 64 deep and 4 warps (gfx1151: every 64-deep prefill tile spills, Triton 3.9).
    if M <= DECODE_MAX_M:
        tiles = [(16, 32, 128, 4, 2), (16, 64, 64, 4, 2), (16, 64, 128, 4, 2), (16, 128, 64, 4, 2),
                 (16, 64, 128, 4, 3), (16, 64, 32, 4, 2)]
    elif M <= MIDDLE_MAX_M:
        tiles = [(32, 64, 64, 4, 2), (64, 64, 64, 4, 2), (64, 128, 64, 8, 2), (32, 128, 64, 4, 2),
                 (32, 64, 32, 4, 2), (64, 64, 32, 8, 2)]
    else:
        tiles = [(64, 64, 64, 4, 2), (64, 128, 64, 8, 2), (128, 64, 64, 8, 2), (128, 128, 64, 8, 2),
                 (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 64, 32, 8, 2)]
    out = [_config(bm, bn, _block_k(bk, K), w, s) for bm, bn, bk, w, s in tiles]
    if problem["weight_format"] == "mxfp4":
        if M <= DECODE_MAX_M:
            out = [_config(bm, bn, _block_k(bk, K), w, 1, GEMV=True) for bm, bn, bk, w in GEMV_TILES] + out
        else:
            out = [_config(bm, bn, _block_k(bk, K), w, s, DEQUANT=True) for bm, bn, bk, w, s in tiles] + out
    return [c for i, c in enumerate(out) if c not in out[:i]]


def experts_default_config(problem: dict) -> dict:
    """A pick that fits and does not spill on every target, dense or MXFP4 (Triton 3.9 cross-compiles at
    GPT-OSS-20B's shapes); the compiler ranks the space with the cost model instead."""
    M, K = problem["M"], min(problem["H"], problem["I"])
    if problem["weight_format"] == "mxfp4":  # the paths of moe_gemv.py: GEMV at decode, DEQUANT above
        if M <= DECODE_MAX_M:
            return _config(1, 16, _block_k(256, K), 4, 1, GEMV=True)
        dense = experts_default_config({**problem, "weight_format": "dense"})
        return {**dense, "constexprs": {**dense["constexprs"], "DEQUANT": True}}
    if M <= DECODE_MAX_M:
        return _config(16, 64, _block_k(64, K), 4, 2)
    if M <= MIDDLE_MAX_M:
        return _config(32, 64, _block_k(32, K), 4, 2)
    return _config(64, 64, _block_k(32, K), 8, 2)


def lds_bytes(config: dict, problem: dict, target_name: str) -> int:
    """LDS / shared memory of one program of the gate/up GEMM (the larger of the two), as Triton 3.9
    builds it: pipelined operand tiles in num_stages buffers on NVIDIA and gfx950, num_stages - 1 on the
    other AMD targets (whose pipeliner holds one stage in registers). Dense: the A tile and both weight
    tiles. MXFP4: the A tile and one decoded 16-bit weight tile (the packed bytes are not staged); this
    matches gfx950's builds and bounds gfx942's, which stage less."""
    c = config["constexprs"]
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    elt = ELEMENT_BYTES[problem["dtype"]]
    all_stages = not target_name.startswith("gfx") or target_name == "gfx950"
    buffers = config["num_stages"] if all_stages else max(1, config["num_stages"] - 1)
    if c.get("GEMV"):  # no operand tile is staged; the epilogue's reduction scratch
        return 32 * bm * bn
    if problem["weight_format"] == "fp8_block":  # FP8 weight tiles; A in FP8 too unless a16w8
        a_elt = elt if problem.get("act_scheme") == "none" else 1
        return buffers * (bm * bk * a_elt + 2 * bk * bn)
    weight_tiles = 1 if problem["weight_format"] == "mxfp4" and not c.get("DEQUANT") else 2
    return buffers * (bm * bk + weight_tiles * bk * bn) * elt


def config_space(problem: dict) -> list[dict]:
    return route_config_space(problem) if problem["op"] == "moe_route" else experts_config_space(problem)


def default_config(problem: dict) -> dict:
    return config_space(problem)[0] if problem["op"] == "moe_route" else experts_default_config(problem)
