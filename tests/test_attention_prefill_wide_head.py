"""Prefill attention at head_dim 256 (Qwen3.5's full-attention layers, Gemma 3): configs that fit every target.

On RDNA3 (gfx1151) WMMA operands are replicated across the two half-waves, and every whole-head prefill tile
spilled there (16x16 on 4 warps at 1 stage: 256 VGPRs + 136 spilled), so no Qwen3.5 plan compiled for
gfx1151. From head_dim 256 the config space adds tiles whose Q . K^T runs in head-dim chunks (`BLOCK_DK`,
`attention._chunked_scores`): they compute the reference's attention (interpreter), and kernel selection's
order (`select_kernels._candidates`) with the compiled binaries' resource check reaches one that fits on
each target.
"""

from __future__ import annotations

import pytest
import torch

from rdnac.kernels import attention as attn
from rdnac.kernels.launch import InterpretLauncher
from tests.support.selection import first_fitting
from tests.test_kernels_attention import DECODE_ARGS, attrs_for, check, make_batch, problem

QWEN35 = (16, 2, 256)  # query heads, kv heads, head_dim of a Qwen3.5 full-attention layer (GQA 8)
CHUNKED = [attn._config(4, 1, BLOCK_M=16, BLOCK_N=16, BLOCK_DK=attn.HEAD_CHUNK),
           attn._config(8, 2, BLOCK_M=64, BLOCK_N=32, BLOCK_DK=attn.HEAD_CHUNK)]


def test_head_dim_256_space_adds_chunked_tiles_only_there():
    wide = attn.config_space(problem("prefill", *QWEN35))
    assert all(c in wide for c in CHUNKED)
    for head_dim in (64, 80, 128):
        assert not any("BLOCK_DK" in c["constexprs"] for c in attn.config_space(problem("prefill", 8, 2, head_dim)))


@pytest.mark.parametrize("config", CHUNKED, ids=lambda c: "x".join(str(v) for v in c["constexprs"].values()))
@pytest.mark.parametrize("options,use_sinks", [(dict(), False), (dict(sliding_window=20, softcap=3.0), True),
                                               (dict(sliding_window=9), False), (dict(softcap=2.0), True)])
def test_chunked_prefill_matches_reference(config, options, use_sinks):
    """GQA 4:1 at head_dim 256 (and 200: padded to 256, masked chunks), sequences with a cached prefix
    (chunked prefill) and without, a window, a soft-cap, sinks."""
    seqs = [(1, 1), (40, 33), (37, 37), (70, 18)]  # (seq_len, query_len): prefixes of 0-52 keys
    for head_dim in (256, 200):
        batch, max_q = make_batch(seqs, 8, 2, head_dim, torch.float32, seed=5)
        check("prefill", batch, max_q, attrs_for(8, 2, head_dim, **options), config, InterpretLauncher(),
              use_sinks=use_sinks)


def test_chunked_prefill_reads_fp8_caches():
    """FP8 KV caches (gfx1201 / CDNA / sm90 take them at head_dim 256): each K chunk widened to Q's dtype,
    k_scale in the score scale, v_scale on the output."""
    from rdnac.ir import ops
    from tests.test_fp8_kv import _fp8_batch
    from tests.test_kernels_small import assert_close

    k_scale, v_scale = 0.05, 2.0
    batch, max_q = _fp8_batch([(40, 33), (17, 7)], 4, 1, 256, torch.float8_e4m3fn, k_scale, v_scale)
    attrs = attrs_for(4, 1, 256, k_scale=k_scale, v_scale=v_scale)
    args = [batch[k] for k in DECODE_ARGS]
    out = attn.attention_prefill(*args, **attrs, max_query_len=max_q, config=CHUNKED[1], launcher=InterpretLauncher())
    assert torch.isfinite(out).all()
    assert_close("chunked prefill fp8", out, ops.attention(*args, **attrs), 2e-2, 2e-2)


def _first_fitting(target: str, max_tries: int = 6):
    """Walk kernel selection's candidate order for one prefill node as select_kernels does: compile each
    candidate, reject those whose binaries spill or overflow LDS. Returns (chosen, rejected)."""
    heads, kv_heads, head_dim = QWEN35
    batch, _ = make_batch([(2048, 2048)], heads, kv_heads, head_dim, torch.bfloat16, device="meta")
    prob = {**problem("prefill", heads, kv_heads, head_dim), "num_seqs": 1, "num_tokens": 2048}

    def launch(config, rec):
        attn.attention_prefill(*[batch[k] for k in DECODE_ARGS], **attrs_for(heads, kv_heads, head_dim),
                               max_query_len=2048, config=config, launcher=rec)

    return first_fitting("attention", prob, target, launch, max_tries)


@pytest.mark.parametrize("target", ["gfx1151", "gfx1201", "gfx942", "gfx950", "sm90"])
def test_qwen35_prefill_attention_gets_a_config_that_does_not_spill(target):
    chosen, rejected = _first_fitting(target)
    print(f"{target}: {chosen}; rejected {rejected}")
    if target == "gfx1151":  # no whole-head tile fits there: the chunked one is what compiles
        assert chosen["constexprs"].get("BLOCK_DK") == attn.HEAD_CHUNK, chosen


def test_tiny_qwen3_5_with_256_wide_heads_compiles_for_gfx1151(tmp_path):
    """A whole hybrid plan for gfx1151 whose full-attention layer has Qwen3.5's 16 / 2 heads of 256: before
    the chunked tiles its prefill attention node had no config that fit ("no candidate config fits")."""
    import rdnac
    from rdnac.compiler.build import check_resources
    from rdnac.plans.binaries import KernelBinary
    from rdnac.plans import read_plan
    from tests.support.checkpoints import make_checkpoint
    from tests.test_qwen3_5 import CONFIG

    ckpt = tmp_path / "ckpt"
    make_checkpoint("qwen3_5_text", ckpt, **dict(CONFIG, num_attention_heads=16, num_key_value_heads=2, head_dim=256))
    plan = read_plan(rdnac.compile(ckpt, target="gfx1151", output=tmp_path / "q35.msgpack", quiet=True))
    for b in (KernelBinary.from_dict(k) for k in plan.body["kernels"]):
        assert check_resources(b, "gfx1151") == [], b.key
    attn_node = plan.body["program"]["layers.1.attn"]
    prefill = [choice["config"] for key, choice in attn_node.items() if key.startswith("prefill:")]
    assert prefill and all(c["constexprs"].get("BLOCK_DK") == attn.HEAD_CHUNK for c in prefill), prefill



WHOLE_HEAD = [attn._config(4, 1, BLOCK_M=64, BLOCK_N=16), attn._config(4, 1, BLOCK_M=64, BLOCK_N=32),
              attn._config(8, 2, BLOCK_M=64, BLOCK_N=16)]  # the whole-head tiles selection reaches (sm90 and RDNA4)


def _check_and_time(device, launcher, configs, seqs, timed_tokens):
    """Each config against the reference on `seqs` (plain, and a window with soft-cap and sinks), then, when
    timed_tokens, a prefill of that many tokens timed on the device (printed)."""
    heads, kv_heads, head_dim = QWEN35
    batch, max_q = make_batch(seqs, heads, kv_heads, head_dim, torch.bfloat16, device=device, seed=7)
    for config in configs:
        for options, use_sinks in [(dict(), False), (dict(sliding_window=100, softcap=30.0), True)]:
            check("prefill", batch, max_q, attrs_for(heads, kv_heads, head_dim, **options), config, launcher,
                  use_sinks=use_sinks)
    if not timed_tokens:
        return
    batch, max_q = make_batch([(timed_tokens, timed_tokens)], heads, kv_heads, head_dim, torch.bfloat16,
                              device=device, seed=8)
    args, attrs = [batch[k] for k in DECODE_ARGS], attrs_for(heads, kv_heads, head_dim)
    for config in configs:
        def run():
            attn.attention_prefill(*args, **attrs, max_query_len=max_q, config=config, launcher=launcher)
        run()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            run()
        end.record()
        torch.cuda.synchronize()
        print(f"head_dim 256 prefill {timed_tokens} tokens {config}: {start.elapsed_time(end) / 20 * 1e3:.1f} us")


def test_device_check_runs_on_cpu_at_tiny_sizes():
    """The GPU test's own code under the interpreter (one whole-head and one chunked tile, no timing)."""
    _check_and_time("cpu", InterpretLauncher(), [WHOLE_HEAD[0], CHUNKED[0]], [(1, 1), (40, 33)], 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/HIP GPU")
def test_gpu_head_dim_256_tiles_against_reference_and_timed():
    """On the device, Qwen3.5's heads: every chunked tile in the space and the whole-head tiles selection reaches,
    against the reference (GQA 8, a window with soft-cap and sinks, a chunk after a prefix), then a 2048-token
    prefill of each timed (printed: what the chunks cost where whole-head tiles fit, e.g. on an H100)."""
    from rdnac.kernels.launch import JitLauncher

    chunked = [c for c in attn.config_space(problem("prefill", *QWEN35)) if "BLOCK_DK" in c["constexprs"]]
    _check_and_time("cuda", JitLauncher(), WHOLE_HEAD + chunked, [(1, 1), (40, 33), (300, 300), (700, 180)], 2048)
