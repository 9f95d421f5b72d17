"""Sharded plans of the families x schemes that test_tensor_parallel*.py check on cpu but no other test builds for
an AMD target: each cross-compiles (--tp 2) as single-rank plans do, for one AMD target each, so that every AMD
target builds some sharded plan (issue 28: "Every sharded plan cross-compiles for the AMD targets as
single-rank plans do").

Already built elsewhere: dense bf16 GQA (gfx942), DeepSeek-V3 MLA + MoE (gfx950), Qwen3.5 GDN (gfx942), MXFP4
experts --tp (gfx950) and --ep (gfx942), Qwen3-MoE --ep (gfx1201) in test_tensor_parallel_gpu.py; dense
fp8-block (gfx942) in test_tensor_parallel_quantized.py; DeepSeek-V3 FP8 block experts --tp and --ep (gfx942,
gfx1201) in test_tensor_parallel_fp8_experts.py. Here, grouped per target (one test each, a few plans of one or
two layers):

- gfx942: --quantize int8 (linear_int8, per-token activations over a row-parallel rank's slice) and GPT-OSS
  (sinks by query head, biases, bf16 experts sliced);
- gfx1201: --quantize fp8 (per-channel weights, per-token activations), an fp8-tensor checkpoint, Qwen3.5 with
  --quantize fp8 (gated_rms_norm_quant / sigmoid_gate_quant per rank's heads), Qwen3-MoE --tp (bf16 experts
  sliced; --ep is built above);
- gfx950: Qwen3-Next --ep (fused GDN projections regrouped, gated shared expert) and DeepSeek-V2 (no q LoRA:
  q_proj merged with kv_a_proj_with_mqa, its kv_a rows whole on each rank; softmax group routing);
- gfx1151 (no FP8 dot: a16w8 kernels): a dense fp8-block checkpoint.

Each plan: every node has a kernel per step key (collectives the `collective` family's), every binary within the
target's LDS and registers without spills (`build.check_resources`), mixers at the rank's half of the heads.
Cost on 2 cores from a cold kernel cache (checkpoints and compiles): gfx942 57 s (2 plans), gfx1201 97 s (4),
gfx950 60 s (2), gfx1151 33 s (1); 4 min 9 s in all, seconds warm.
"""

from __future__ import annotations

import pytest

import rdnac
from rdnac.plans import read_plan
from rdnac.testing.fp8 import write_random_checkpoint
from tests.support.checkpoints import make_checkpoint

LIMITS = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128)
QWEN3_5 = dict(hidden_size=44, intermediate_size=68, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=300, linear_num_key_heads=2, linear_num_value_heads=4,
               linear_key_head_dim=12, linear_value_head_dim=10, layer_types=["linear_attention", "full_attention"])


def _dense(directory, scheme=None):
    write_random_checkpoint(directory, hidden=128, layers=1, heads=4, kv_heads=2, head_dim=128, intermediate=256,
                            vocab=302, scheme=scheme, decisive=True)


def _gpt_oss(directory):
    from tests.support.gpt_oss import make_gpt_oss

    make_gpt_oss(directory, with_tokenizer=False, num_hidden_layers=2, num_attention_heads=4)  # sliding, full


def _qwen3_5(directory):
    make_checkpoint("qwen3_5_text", directory, **QWEN3_5)


def _qwen3_moe(directory):
    from tests.test_qwen3_moe import make_qwen3_moe

    make_qwen3_moe(directory, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=22, norm_topk_prob=True,
                   num_hidden_layers=1)


def _qwen3_next(directory):
    make_checkpoint("qwen3_next", directory, **{**QWEN3_5, "num_experts": 4, "num_experts_per_tok": 2,
                                                "moe_intermediate_size": 20, "shared_expert_intermediate_size": 24,
                                                "norm_topk_prob": False})


def _deepseek_v2(directory):
    from tests.test_deepseek import make_deepseek

    make_deepseek(directory, "deepseek_v2", q_lora_rank=None, topk_method="group_limited_greedy", n_group=4,
                  topk_group=2, routed_scaling_factor=1.5, hidden_size=48, num_attention_heads=4, num_key_value_heads=4,
                  moe_intermediate_size=14, num_hidden_layers=2)


# target -> [(case id, checkpoint writer, compile options)]
CASES = {
    "gfx942": [("dense-int8", _dense, dict(quantize="int8")), ("gpt-oss", _gpt_oss, {})],
    "gfx1201": [("dense-fp8-channel", _dense, dict(quantize="fp8")),
                ("dense-fp8-tensor", lambda d: _dense(d, "fp8-tensor"), {}),
                ("qwen3_5-fp8", _qwen3_5, dict(quantize="fp8")), ("qwen3-moe-tp", _qwen3_moe, {})],
    "gfx950": [("qwen3-next-ep", _qwen3_next, dict(ep=True)), ("deepseek-v2", _deepseek_v2, {})],
    "gfx1151": [("dense-fp8-block", lambda d: _dense(d, "fp8-block"), {})],
}


@pytest.mark.parametrize("target", list(CASES))
def test_sharded_plans_cross_compile(tmp_path, target):
    from rdnac.compiler.build import check_resources
    from rdnac.plans.binaries import KernelBinary

    for case, write, options in CASES[target]:
        write(tmp_path / case)
        plan = read_plan(rdnac.compile(tmp_path / case, target=target, output=tmp_path / f"{case}.msgpack",
                                       quiet=True, tp=2, **LIMITS, **options))
        graph, program = plan.graph(), plan.body["program"]
        assert plan.num_ranks == 2 and plan.header["target"] == target, case
        assert plan.header["mesh"]["ep"] is options.get("ep", False), case
        binaries = [KernelBinary.from_dict(k) for k in plan.body["kernels"]]
        assert binaries and all(check_resources(b, target) == [] for b in binaries), case
        ops = graph.op_counts()
        assert ops["all_reduce"] >= 2 and ops["all_gather"] == 1, (case, ops)
        for node in graph.nodes:
            if node.op == "split":
                continue
            keys = program[node.name]
            assert keys and all(c["kernel"] for c in keys.values()), (case, node.name)
            if node.op in ("all_reduce", "all_gather", "shard_ids"):
                assert {c["kernel"] for c in keys.values()} == {f"collective.{node.op}"}, (case, node.name)
        heads = [n.attrs.get("num_heads") or n.attrs.get("num_v_heads") for n in graph.nodes
                 if n.op in ("attention", "mla_attention", "gated_delta_rule")]
        assert heads and all(h == 2 for h in heads), (case, heads)  # every mixer: the rank's half of 4 heads
