"""Decode attention at head_dim 256 (Qwen3.5's full-attention layers, Gemma): configs that fit every target.

The default decode tile spills gfx1151's VGPRs at head_dim 256 (and gfx1201's; FP8 caches: gfx1201's and
gfx950's). `attention_decode.config_space` puts register-lean tiles right after it; kernel selection's
order (`select_kernels._candidates`: default, then the space) with the compiled binaries' resource check
reaches a tile that fits on each target. The lean tiles compute the reference's attention (interpreter).
"""

from __future__ import annotations

import pytest
import torch

from rdnac.ir import ops
from rdnac.ir.fp8 import to_kv_cache
from rdnac.kernels import attention_decode as attn_decode
from rdnac.kernels.launch import InterpretLauncher
from tests.support.selection import first_fitting
from tests.test_kernels_attention import DECODE_CONTEXTS, DECODE_ARGS, attrs_for, check, make_batch, problem

QWEN35 = (16, 2, 256)  # query heads, kv heads, head_dim of a Qwen3.5 / Qwen3-Next full-attention layer (GQA 8)


def _first_fitting(target: str, kv_dtype: torch.dtype, max_tries: int = 4, quant: bool = False):
    """Walk kernel selection's candidate order for one decode node as select_kernels does: compile each
    candidate's launches, reject those whose binaries spill or overflow LDS. Returns (chosen, rejected).
    quant: the attention_quant op's wrapper (FP8 output for o_proj), which shares the family's configs."""
    from rdnac.targets import get_target

    heads, kv_heads, head_dim = QWEN35
    batch, _ = make_batch([(1000, 1)], heads, kv_heads, head_dim, torch.bfloat16, device="meta")
    batch["k_cache"], batch["v_cache"] = (batch[k].to(kv_dtype) for k in ("k_cache", "v_cache"))
    prob = {**problem("decode", heads, kv_heads, head_dim), "kv_dtype": str(kv_dtype).removeprefix("torch."),
            "num_seqs": 1, "num_tokens": 1}
    args, attrs = [batch[k] for k in DECODE_ARGS], attrs_for(heads, kv_heads, head_dim)

    def launch(config, rec):
        if quant:
            attn_decode.attention_quant_decode(*args, **attrs, fp8_format=get_target(target).fp8_format,
                                               group=head_dim, config=config, launcher=rec)
        else:
            attn_decode.attention_decode(*args, **attrs, config=config, launcher=rec)

    return first_fitting("attention", prob, target, launch, max_tries)


@pytest.mark.parametrize("target", ["gfx1151", "gfx1201", "gfx942", "gfx950", "sm90"])
def test_qwen35_decode_attention_gets_a_config_that_does_not_spill(target):
    chosen, rejected = _first_fitting(target, torch.bfloat16)
    default = attn_decode.FAMILY.default_config(problem("decode", *QWEN35))
    if target in ("gfx1151", "gfx1201"):  # the default spills there; the rejection says so
        assert rejected[0][0] == default and any("spills" in p for p in rejected[0][1]), rejected
        n, w, st = chosen["constexprs"]["BLOCK_N"], chosen["num_warps"], chosen["num_stages"]
        assert (n, w, st) in attn_decode.WIDE_HEAD_TILES, chosen
        assert chosen["constexprs"]["NUM_SPLITS"] == default["constexprs"]["NUM_SPLITS"]
    else:  # where the default fits it is kept
        assert chosen == default and not rejected


@pytest.mark.parametrize("target", ["gfx1201", "gfx950"])
def test_qwen35_quant_decode_attention_gets_a_config_that_does_not_spill(target):
    """attention_quant (FP8 output for an FP8 o_proj): its epilogue adds registers, the same order fits."""
    chosen, rejected = _first_fitting(target, torch.bfloat16, quant=True)
    if target == "gfx1201":
        assert rejected and any("spills" in p for p in rejected[0][1]), rejected
    assert chosen is not None


@pytest.mark.parametrize("target,kv_dtype", [("gfx1201", torch.float8_e4m3fn), ("gfx950", torch.float8_e4m3fn),
                                             ("gfx942", torch.float8_e4m3fnuz), ("sm90", torch.float8_e4m3fn)])
def test_qwen35_fp8_kv_decode_attention_gets_a_config_that_does_not_spill(target, kv_dtype):
    """gfx1151 refuses FP8 KV caches (kv_cache_dtype pass); the other targets get a fitting FP8 decode tile."""
    chosen, rejected = _first_fitting(target, kv_dtype)
    assert chosen is not None
    if target in ("gfx1201", "gfx950"):  # the FP8 default (64 keys, 3 stages) spills there
        assert rejected and any("spills" in p for p in rejected[0][1]), rejected


@pytest.mark.parametrize("block_n,num_warps,num_stages", attn_decode.WIDE_HEAD_TILES)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_wide_head_tiles_match_the_reference(block_n, num_warps, num_stages, num_splits):
    heads, kv_heads = 4, 1  # GQA 4 at head_dim 256: the same tile shapes as Qwen3.5's 8, fewer interpreted heads
    batch, _ = make_batch([(c, 1) for c in DECODE_CONTEXTS], heads, kv_heads, 256, torch.float32, num_padded=1)
    config = {"constexprs": {"NUM_SPLITS": num_splits, "BLOCK_N": block_n}, "num_warps": num_warps,
              "num_stages": num_stages}
    check("decode", batch, 1, attrs_for(heads, kv_heads, 256), config, InterpretLauncher(), use_sinks=num_splits == 4)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
def test_wide_head_tile_reads_fp8_caches(cache_dtype):
    k_scale, v_scale = 0.05, 2.0
    batch, _ = make_batch([(40, 1), (100, 1), (1, 1)], 4, 1, 256, torch.bfloat16)
    batch["k_cache"] = to_kv_cache(batch["k_cache"].float() * 3, cache_dtype, k_scale)
    batch["v_cache"] = to_kv_cache(batch["v_cache"].float() * 3, cache_dtype, v_scale)
    attrs = attrs_for(4, 1, 256, k_scale=k_scale, v_scale=v_scale)
    args = [batch[k] for k in DECODE_ARGS]
    expected = ops.attention(*args, **attrs)
    n, w, st = attn_decode.WIDE_HEAD_TILES[0]
    config = {"constexprs": {"NUM_SPLITS": 4, "BLOCK_N": n}, "num_warps": w, "num_stages": st}
    out = attn_decode.attention_decode(*args, **attrs, config=config, launcher=InterpretLauncher())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
