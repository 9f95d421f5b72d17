"""Config space of the FP8 GEMM family (`rdnac.kernels.gemm_fp8`, which re-exports `config_space`
and `default_config`): see that module's docstring for the regimes and BLOCK_K rules."""

from __future__ import annotations

import triton

from rdnac.kernels.launch import cdiv, next_power_of_2

from rdnac.kernels.gemm import DECODE_MAX_M, m_bucket
from rdnac.kernels.gemm import _config  # one tile-config shape for both GEMM families

SPLIT_K_MIN_NK = 1 << 20  # as in gemm: split K only when the weight read beats a second launch


def _split_k_options(N: int, K: int, block_k: int, max_split: int) -> list[int]:
    """1, plus powers of two when the weight is large, each split keeping >= 2 BLOCK_K steps, none empty."""
    options = [1]
    if N * K < SPLIT_K_MIN_NK:
        return options
    for split in (2, 4, 8):
        k_per_split = cdiv(cdiv(K, split), block_k) * block_k  # as linear_fp8 computes it
        if split <= max_split and k_per_split >= 2 * block_k and cdiv(K, k_per_split) == split:
            options.append(split)
    return options


def _shape(problem: dict) -> tuple[int, int, int, bool, int | None, int | None]:
    """(M bucket, N, K, is_a16, scale block N, scale block K); the scale blocks are None off the block path."""
    M, N, K = m_bucket(problem["M"]), problem["N"], problem["K"]
    is_a16 = problem["act_scheme"] == "none"
    if problem["weight_scheme"] == "block":
        scale_bn, scale_bk = problem["block_size"]
        assert scale_bn % 16 == 0, f"linear_fp8: block_size N {scale_bn} must be a multiple of 16 (a tile divides it)"
    elif problem["act_scheme"] == "dynamic_group":
        scale_bn, scale_bk = None, problem["block_size"][1]
    elif problem["act_scheme"] == "prequantized" and problem.get("group"):
        scale_bn, scale_bk = None, problem["group"]
    else:
        scale_bn = scale_bk = None
    return M, N, K, is_a16, scale_bn, scale_bk


def _block_k(want: int, K: int, scale_bk: int | None) -> int:
    """BLOCK_K near `want`: >= 32 (the smallest FP8 dot K), not far past K, dividing the scale block's K."""
    block_k = max(32, min(want, next_power_of_2(K)))
    if scale_bk is not None:
        while scale_bk % block_k:
            block_k //= 2
        assert block_k >= 32, f"linear_fp8: block_size K {scale_bk} needs a power-of-two factor >= 32"
    return block_k


def _block_ns(options: tuple[int, ...], scale_bn: int | None) -> tuple[int, ...]:
    # On the block path, tiles that divide (or equal) the scale block read one scale per tile.
    return tuple(n for n in options if scale_bn is None or scale_bn % n == 0) or (16,)


def config_space(problem: dict) -> list[dict]:
    """Candidates for {"M", "N", "K", "dtype", "has_bias", "weight_scheme", "act_scheme", "fp8_format",
    "block_size"} (see the module docstring). dtype, has_bias and fp8_format do not change them."""
    M, N, K, is_a16, scale_bn, scale_bk = _shape(problem)
    # a16w8 A tiles are bf16, twice an fp8 tile, and the wave32 targets (gfx1151) hold them in VGPRs
    deep = 64 if is_a16 else 128
    out: list[dict] = []
    if M <= DECODE_MAX_M:
        for block_n, want_k in ((32, 256), (64, 128), (64, 256), (128, 128)):
            block_k = _block_k(want_k, K, scale_bk)
            if block_n in _block_ns((block_n,), scale_bn):
                for split_k in _split_k_options(N, K, block_k, max_split=8):
                    out.append(_config(16, block_n, block_k, 1, split_k, 4, 2))
        out.append(_config(16, 64, _block_k(128, K, scale_bk), 1, 1, 4, 3))
    elif M <= 64:
        for block_n in _block_ns((64, 128), scale_bn):
            block_k = _block_k(deep, K, scale_bk)
            for split_k in _split_k_options(N, K, block_k, max_split=4):
                for num_warps in (4, 8):
                    out.append(_config(M, block_n, block_k, 1, split_k, num_warps, 2))
    elif M <= 256:
        for block_n in _block_ns((64, 128), scale_bn):
            for num_stages in (2, 3):
                for num_warps in (4, 8):
                    out.append(_config(64, block_n, _block_k(deep, K, scale_bk), 8, 1, num_warps, num_stages))
    else:
        for block_n in _block_ns((64, 128, 256), scale_bn):
            for want_k in (64, 128):
                for num_stages in (2, 3):
                    out.append(_config(128, block_n, _block_k(want_k, K, scale_bk), 8, 1, 8, num_stages))
    # Last resort, correct for every M: a 16 x 32 x 64 tile holds few registers, so when unaligned N or
    # K (no vectorized loads) makes every wider tile spill (seen for a vocab of 1000: gfx942 at M=64,
    # gfx1151's a16w8 at M=1), the node still compiles, slower, with the rejections logged.
    out.append(_config(16, _block_ns((32,), scale_bn)[0], _block_k(64, K, scale_bk), 1, 1, 4, 2))
    return [c for i, c in enumerate(out) if c not in out[:i]]


def default_config(problem: dict) -> dict:
    """A safe pick from config_space without a target: within 64 KiB of LDS and spill-free on every
    target (the a16w8 picks are sized for gfx1151's wave32 VGPRs); the compiler normally ranks the
    space instead. Decode splits K until roughly 64 programs exist."""
    M, N, K, is_a16, scale_bn, scale_bk = _shape(problem)
    block_n = _block_ns((64,), scale_bn)[0]
    if M <= 64:
        block_m = 16 if M <= DECODE_MAX_M else M
        block_k = _block_k(128 if M <= DECODE_MAX_M or not is_a16 else 64, K, scale_bk)
        options = _split_k_options(N, K, block_k, max_split=8 if M <= DECODE_MAX_M else 4)
        split_k = next((s for s in options if cdiv(N, block_n) * s >= 64), options[-1])
        return _config(block_m, block_n, block_k, 1, split_k, 8 if is_a16 and M == 64 else 4, 2)
    if M <= 256:
        return _config(64, block_n, _block_k(64 if is_a16 else 128, K, scale_bk), 8, 1, 8 if is_a16 else 4, 2)
    block_n = block_n if is_a16 else _block_ns((128,), scale_bn)[0]
    return _config(128, block_n, _block_k(64, K, scale_bk), 8, 1, 8, 2)
