"""MLA kernels (rdnac.kernels.mla, mla_attention) and DeepSeek routing (moe_route) against the op references.

Under the Triton interpreter at tiny, odd sizes (3 heads of nope 10 + rope 6, value 14, kv_lora_rank 18:
every width padded and masked): the latent cache write with padding slots, prefill over chunks after
cached context and decode split over the KV length, several sequences of different lengths whose block
tables have holes (slots no sequence owns hold NaN: reading one shows). A tiny DeepSeek-V3 plan
cross-compiles for all five GPU targets, a V3-wide head (512 + 64) fits each target with its rejections
logged, and a GPU test (marked gpu) runs the tiny plan on cuda with graphs against the interpreter.
"""

from __future__ import annotations

import re

import pytest
import torch

import rdnac
from rdnac.errors import RdnacError
from rdnac.ir import mla as ref
from rdnac.ir.moe import moe_route as moe_route_ref
from rdnac.ir.rope_math import rope_inv_freq
from rdnac.kernels import mla, mla_attention
from rdnac.kernels.launch import InterpretLauncher
from rdnac.kernels.moe_route import moe_route

BLOCK_SIZE = 16
DIMS = dict(num_heads=3, qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=14, kv_lora_rank=18)
YARN = {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.8,
        "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}
# (context length incl. new tokens, new tokens): full prefills, chunks after cached context, block edges
PREFILL_SEQS = [(17, 7), (40, 33), (5, 5), (16, 16)]
DECODE_CONTEXTS = [1, 15, 17, 40, 100]


def rope_attrs(style: str, scaling: dict | None) -> dict:
    return {"theta": 10000.0, "scaling": scaling, "style": style}


def tables(dr: int, attrs: dict) -> dict:
    inv_freq, scaling = rope_inv_freq(dr, attrs["theta"], attrs["scaling"])
    return {"inv_freq": inv_freq, "attention_scaling": scaling}


def make_batch(seqs, dims, *, seed=0):
    """A paged latent cache with shuffled block tables (holes: blocks in between belong to no one, and
    every unowned slot is NaN) and the queries of each sequence's last `new` tokens."""
    gen = torch.Generator().manual_seed(seed)
    heads, dn, dr, rank = dims["num_heads"], dims["qk_nope_head_dim"], dims["qk_rope_head_dim"], dims["kv_lora_rank"]
    blocks_per_seq = [-(-c // BLOCK_SIZE) for c, _ in seqs]
    num_blocks = 1 + 2 * sum(blocks_per_seq) + 2
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_tables = torch.zeros(len(seqs), max(blocks_per_seq) + 2, dtype=torch.int32)
    cache = torch.randn(num_blocks, BLOCK_SIZE, rank + dr, generator=gen)
    owned = torch.zeros(num_blocks, BLOCK_SIZE, dtype=torch.bool)
    owned[0] = True
    for b, (ctx, _) in enumerate(seqs):
        for i in range(blocks_per_seq[b]):
            block_tables[b, i] = ids.pop()
            ids.pop()  # a hole: the next block id is skipped
            owned[block_tables[b, i], : min(BLOCK_SIZE, ctx - i * BLOCK_SIZE)] = True
    cache[~owned] = float("nan")
    q_lens = [n for _, n in seqs]
    positions = torch.cat([torch.arange(c - n, c) for c, n in seqs])
    kv_b = torch.randn(heads * (dn + dims["v_head_dim"]), rank, generator=gen) * rank ** -0.5
    w_uk, w_uv = ref.absorbed_weights(kv_b, heads, dn, dims["v_head_dim"])
    return dict(q=torch.randn(sum(q_lens), heads * (dn + dr), generator=gen), latent_cache=cache,
                block_tables=block_tables, seq_lens=torch.tensor([c for c, _ in seqs], dtype=torch.int32),
                cu_seqlens_q=torch.tensor([0] + q_lens).cumsum(0).to(torch.int32), positions=positions,
                kv_b=kv_b, w_uk=w_uk, w_uv=w_uv), max(q_lens)


def check_close(out, expected, atol, rtol):
    assert out.shape == expected.shape and out.dtype == expected.dtype
    err = (out.float() - expected.float()).abs().max().item()
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol, msg=f"max abs error {err}")


@pytest.mark.parametrize("style,scaling", [("gptj", YARN), ("neox", None)])
def test_cache_write_matches_reference(style, scaling):
    gen = torch.Generator().manual_seed(1)
    rank, dr, num_tokens = 18, 6, 9
    kv = torch.randn(num_tokens, rank + dr + 3, generator=gen)  # latent and k_pe are strided column views
    latent, k_pe = kv[:, :rank], kv[:, rank:rank + dr]
    positions = torch.tensor([0, 1, 2, 30, 31, 7, 0, 0, 99])
    slot_mapping = torch.tensor([5, 6, 7, 40, 41, -1, 17, -1, 63])  # -1: padding, skipped
    attrs = {"kv_lora_rank": rank, "qk_rope_head_dim": dr, **rope_attrs(style, scaling)}
    expected = torch.full((4, BLOCK_SIZE, rank + dr), float("nan"))
    ours = expected.clone()
    ref.mla_cache_write(latent, k_pe, positions, slot_mapping, expected, **attrs)
    mla.mla_cache_write(latent, k_pe, positions, slot_mapping, ours, **attrs, **tables(dr, attrs),
                        config=mla.default_config({"op": "mla_cache_write", "kv_lora_rank": rank,
                                                   "qk_rope_head_dim": dr}), launcher=InterpretLauncher())
    written = ~expected.isnan()
    assert torch.equal(written, ~ours.isnan()), "the same slots are written, padding skipped"
    check_close(ours[written], expected[written], 1e-6, 1e-6)


def attention_args(batch, dims, attrs):
    args = [batch[k] for k in ("q", "latent_cache", "block_tables", "seq_lens", "cu_seqlens_q", "positions", "kv_b",
                               "w_uk", "w_uv")]
    return args, {**dims, "scale": 0.3, **attrs, "prefill_form": "absorbed", "decode_form": "absorbed"}


@pytest.mark.parametrize("style,scaling", [("gptj", YARN), ("neox", None)])
@pytest.mark.parametrize("block_m,block_n,block_v", [(16, 16, 32), (32, 32, 16)])
def test_prefill_matches_reference(style, scaling, block_m, block_n, block_v):
    batch, max_query_len = make_batch(PREFILL_SEQS, DIMS)
    args, attrs = attention_args(batch, DIMS, rope_attrs(style, scaling))
    expected = ref.mla_attention(*args, **attrs)
    config = {"constexprs": {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 16, "BLOCK_V": block_v},
              "num_warps": 4, "num_stages": 1}
    out = mla_attention.mla_attention_prefill(*args, **attrs, **tables(DIMS["qk_rope_head_dim"], attrs),
                                              max_query_len=max_query_len, config=config,
                                              launcher=InterpretLauncher())
    check_close(out, expected, 2e-5, 2e-5)


@pytest.mark.parametrize("num_splits,block_k,block_v", [(1, 32, 32), (2, 16, 32), (4, 32, 16), (2, 16, 16)])
def test_decode_split_over_kv_matches_reference(num_splits, block_k, block_v):
    """Splits over the KV length, scores in BLOCK_K chunks of R, the output in BLOCK_V slices of R."""
    batch, _ = make_batch([(c, 1) for c in DECODE_CONTEXTS], DIMS, seed=2)
    args, attrs = attention_args(batch, DIMS, rope_attrs("gptj", YARN))
    expected = ref.mla_attention(*args, **attrs)
    config = {"constexprs": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": block_k, "BLOCK_V": block_v,
                             "NUM_SPLITS": num_splits}, "num_warps": 4, "num_stages": 1}
    out = mla_attention.mla_attention_decode(*args, **attrs, **tables(DIMS["qk_rope_head_dim"], attrs),
                                             config=config, launcher=InterpretLauncher())
    check_close(out, expected, 2e-5, 2e-5)


def test_decode_heads_over_several_tiles():
    """20 heads in tiles of 16: the second tile is part padding; odd widths again."""
    dims = dict(num_heads=20, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, kv_lora_rank=12)
    batch, _ = make_batch([(33, 1), (3, 1)], dims, seed=3)
    args, attrs = attention_args(batch, dims, rope_attrs("neox", None))
    expected = ref.mla_attention(*args, **attrs)
    config = {"constexprs": {"BLOCK_M": 16, "BLOCK_N": 16, "NUM_SPLITS": 2}, "num_warps": 4, "num_stages": 1}
    out = mla_attention.mla_attention_decode(*args, **attrs, **tables(4, attrs), config=config,
                                             launcher=InterpretLauncher())
    check_close(out, expected, 2e-5, 2e-5)


@pytest.mark.parametrize("scoring,bias,renormalize,scale", [("sigmoid_group_topk", True, True, 2.5),
                                                             ("sigmoid_group_topk", False, False, 1.0),
                                                             ("softmax_group_topk", False, False, 1.5),
                                                             ("softmax_topk", False, True, 16.0)])
def test_moe_route_deepseek_scorings_match_reference(scoring, bias, renormalize, scale):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(11, 24, generator=gen)  # 6 groups of 4
    correction = torch.randn(24, generator=gen) * 0.1 if bias else None
    attrs = dict(top_k=5, scoring=scoring, renormalize=renormalize, routed_scaling_factor=scale)
    if scoring != "softmax_topk":
        attrs.update(n_group=6, topk_group=3)
    ref_w, ref_ids = moe_route_ref(logits, correction, **attrs)
    w, ids = moe_route(logits, correction, **attrs, config={"constexprs": {}, "num_warps": 1, "num_stages": 1},
                       launcher=InterpretLauncher())
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and w.shape == ref_w.shape
    order, ref_order = ids.long().sort(-1), ref_ids.long().sort(-1)
    assert torch.equal(order.values, ref_order.values)
    check_close(w.gather(1, order.indices), ref_w.gather(1, ref_order.indices), 1e-6, 1e-6)


# ---------------------------------------------------------------- whole plans

TARGETS = ("gfx1201", "gfx1151", "gfx942", "gfx950", "sm90")
# A tiny DeepSeek-V3 with V3's attention widths (the 576-wide latent head: kv_lora_rank 512 + rope 64,
# nope 128, value 128), q LoRA, YaRN, interleaved RoPE, a dense first layer then an MoE layer with
# sigmoid group-limited routing (n_group 4, topk_group 2) and a correction bias; decisive weights.
V3_WIDE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=300, max_position_embeddings=2048, rms_norm_eps=1e-6,
               initializer_range=0.1, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               q_lora_rank=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
               first_k_dense_replace=1, n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True,
               routed_scaling_factor=2.5, tie_word_embeddings=False,
               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                                "mscale_all_dim": 0.8, "original_max_position_embeddings": 64, "beta_fast": 32,
                                "beta_slow": 1})
# max_model_len 2048: decode splits the KV length in 4 (one split per 512 keys), so the reduce kernel runs
COMPILE = dict(quiet=True, max_model_len=2048, max_num_seqs=4, max_num_batched_tokens=64)
PROMPTS = [[3, 141, 59, 26, 53, 58, 97, 93, 238, 46, 26, 43], [200, 12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def v3_plans(tmp_path_factory):
    """The checkpoint, and its plan per target, compiled once on first use."""
    from tests.test_deepseek import make_deepseek

    root = tmp_path_factory.mktemp("v3wide")
    make_deepseek(root / "ckpt", "deepseek_v3", decisive=True, **V3_WIDE)
    plans = {}

    def get(target: str):
        if target not in plans:
            plans[target] = rdnac.compile(root / "ckpt", target, root / f"{target}.msgpack", **COMPILE)
        return plans[target]
    get.checkpoint = root / "ckpt"
    return get


@pytest.mark.parametrize("target", TARGETS)
def test_tiny_v3_compiles_for_target_within_lds_without_spills(target, v3_plans):
    from rdnac.cli.inspect import summarize
    from rdnac.compiler.build import check_resources
    from rdnac.plans import read_plan
    from rdnac.plans.binaries import KernelBinary

    path = v3_plans(target)
    plan = read_plan(path)
    binaries = [KernelBinary.from_dict(k) for k in plan.body["kernels"]]
    for b in binaries:
        assert check_resources(b, target) == [], b.key
    kernels = {b.kernel.split(":")[1] for b in binaries}
    assert {"_mla_cache_write_kernel", "_mla_kernel", "_mla_reduce_kernel", "_head_gemm_kernel",
            "_moe_group_route_kernel"} <= kernels
    nodes = {n["name"] for n in plan.body["graph"]["nodes"] if n["op"] != "split"}
    assert set(plan.body["program"]) == nodes
    attn = plan.body["program"]["layers.0.attn"]
    assert attn["decode:1"]["kernel"] == "mla_attention.mla_attention_decode"
    assert attn["decode:1"]["config"]["constexprs"]["NUM_SPLITS"] == 4
    assert attn["prefill:64"]["kernel"] == "mla_attention.mla_attention_prefill"
    s = summarize(path)
    for m in s["mla"]:  # inspect: the absorbed form in both phases, the decode tile and its binary
        assert (m["prefill_form"], m["decode_form"], m["latent_bytes_per_token"]) == ("absorbed", "absorbed", 2 * 576)
        b = m["decode"]["binary"]
        assert b is not None and b["spills"] == 0 and 0 < b["shared_bytes"] <= 64 * 1024, m
        print(f"\n{target} {m['node']}: decode {m['decode']['config']}, {b['shared_bytes']} B LDS, "
              f"{b['registers']} registers")
    decisions = [d for d in s["decisions"] if d["node"] == "layers.0.attn"]
    assert any(d["pass"] == "mla_forms" and "prefill: absorbed" in d["action"] for d in decisions)
    rejected = [d for d in s["decisions"] if d["action"].startswith("rejected mla")]
    print("\n".join(f"{d['node']}: {d['action']}: {d['reason']}" for d in rejected) or "no MLA config rejected")


def test_a_tile_that_does_not_fit_is_rejected_and_logged_with_its_size(v3_plans, tmp_path, monkeypatch):
    """A measured decode tile too big for gfx942 (a tuning table from a bigger GPU, say: 64 keys of 576 on
    3 stages): kernel selection rejects its binary, logs what it needs (LDS bytes against the target's,
    or the registers it spills), and takes the next config."""
    import json

    from rdnac.cli.inspect import summarize
    from rdnac.compiler import tuning

    big = {"constexprs": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_V": 512, "NUM_SPLITS": 4},
           "num_warps": 8, "num_stages": 3}
    problem = {"op": "mla_attention", "phase": "decode", "num_heads": 4, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
               "block_size": 16, "dtype": "bfloat16"}
    table = tmp_path / "gfx942.json"
    table.write_text(json.dumps({"device": "test", "entries": [
        {"key": tuning.problem_key("mla", problem), "M": 1, "config": big, "us": 1.0, "candidates": 1}]}))
    monkeypatch.setattr(tuning, "table_paths", lambda target: [table])
    tuning.load.cache_clear()
    try:
        path = rdnac.compile(v3_plans.checkpoint, "gfx942", tmp_path / "big.msgpack", **COMPILE)
    finally:
        tuning.load.cache_clear()
    s = summarize(path)
    rejected = [d for d in s["decisions"] if d["node"] == "layers.0.attn" and d["action"].startswith("rejected")]
    assert rejected and "BLOCK_N=64" in rejected[0]["action"] and "decode T<=1" in rejected[0]["action"], rejected
    reason = rejected[0]["reason"]
    assert "bytes of LDS/shared memory; gfx942 allows 65536" in reason or re.search(r"spills \d+ registers \(\d+ in use\)",
                                                                                     reason), reason
    print(f"\n{rejected[0]['action']}: {rejected[0]['reason'][-120:]}")
    chosen = s["mla"][0]["decode"]
    assert chosen["config"] != big and chosen["binary"]["shared_bytes"] <= 65536 and chosen["binary"]["spills"] == 0


def test_a_helper_kernel_that_fails_every_config_is_named(v3_plans, tmp_path, monkeypatch):
    """The per-head GEMM (`_head_gemm_kernel`) keeps its own tiles whatever config the attention node takes:
    were it to spill on a target, selection runs out of candidates and names that kernel (its binary failed
    under every config), not the last config's other problems. A spill is injected into the real check."""
    from rdnac.compiler.passes import select_kernels

    real = select_kernels.check_resources

    def check(binary, target):
        if "_head_gemm_kernel" in binary.key:
            return [f"{binary.key}: spills 7 registers (255 in use)"]
        return real(binary, target)

    real_candidates = select_kernels._candidates
    monkeypatch.setattr(select_kernels, "check_resources", check)
    # three MLA configs (each round compiles them all again): enough to tell a kernel from a config
    monkeypatch.setattr(select_kernels, "_candidates", lambda family, problem, target: real_candidates(
        family, problem, target)[:3 if family == "mla" else None])
    with pytest.raises(RdnacError, match=r"node 'layers\.0\.attn': kernel \S*_head_gemm_kernel\S* does not fit "
                                         r"target gfx942 at \S+ under any of the node's \d+ candidate configs "
                                         r"\(its binary is the same whatever the config\).*spills 7 registers"):
        rdnac.compile(v3_plans.checkpoint, "gfx942", tmp_path / "x.msgpack", **COMPILE)


def test_sm90_plan_under_the_interpreter_gives_the_reference_tokens(v3_plans):
    """The sm90 plan's own kernel specializations under the Triton interpreter against the reference
    interpreter on the same plan graph and weights (the CPU form of the GPU test below)."""
    from rdnac import SamplingParams
    from rdnac.runtime.llm import LLM
    from rdnac.runtime.model_runner import ModelRunner

    engine = rdnac.load(v3_plans("sm90"), interpret=True)
    reference = LLM(ModelRunner(engine.plan, engine.weights, "cpu"))
    ours = [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_tokens=6))]
    ref_tokens = [c.token_ids for c in reference.generate(PROMPTS, SamplingParams(max_tokens=6))]
    assert ours == ref_tokens


@pytest.mark.gpu
def test_gpu_plan_with_graphs_gives_the_interpreters_tokens(v3_plans):
    """sm90 plan on cuda, decode replayed through CUDA graphs, against the reference interpreter on the
    same plan graph on the GPU: the same 32 greedy tokens (decisive weights)."""
    from rdnac import SamplingParams
    from rdnac.runtime.llm import LLM
    from rdnac.runtime.model_runner import ModelRunner

    engine = rdnac.load(v3_plans("sm90"), device="cuda")
    reference = LLM(ModelRunner(engine.plan, engine.weights, "cuda"))
    params = SamplingParams(max_tokens=32)
    ours = [c.token_ids for c in engine.generate(PROMPTS, params)]
    ref_tokens = [c.token_ids for c in reference.generate(PROMPTS, params)]
    assert ours == ref_tokens
    assert len({t for seq in ref_tokens for t in seq}) >= 8, "the continuation moves through the vocabulary"
