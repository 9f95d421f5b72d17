"""The MoE hybrids on the cpu target against transformers fp32 (its GDN torch fallback): Qwen3-Next (GDN
projections fused per key head, a dense layer per mlp_only_layers) and Qwen3.5-MoE, both with routed
experts and a gated shared expert: logits, greedy tokens, a prefill in three chunks against one, and
concurrent requests against each alone."""

from __future__ import annotations

import pytest
import torch

import rdnac
from rdnac import SamplingParams
from rdnac.runtime.llm_engine import LLMEngine
from tests.support.checkpoints import check_logits_match, make_checkpoint, perturb_norms, reference_greedy

COMMON = dict(hidden_size=44, intermediate_size=68, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1,
              head_dim=16, vocab_size=300, max_position_embeddings=512, linear_num_key_heads=2,
              linear_num_value_heads=4, linear_key_head_dim=12, linear_value_head_dim=10,
              layer_types=["linear_attention", "full_attention", "linear_attention"], num_experts=5,
              num_experts_per_tok=2, moe_intermediate_size=20, shared_expert_intermediate_size=24)
CASES = {
    "qwen3_next": ("qwen3_next", dict(mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3_5_moe": ("qwen3_5_moe_text", {}),
}
# no token 0: reference_greedy's generate takes 0 as the pad id and would mask it out
PROMPT = torch.randint(1, 256, (100,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.fixture(scope="module", params=sorted(CASES))
def compiled(request, tmp_path_factory):
    model_type, overrides = CASES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    model = make_checkpoint(model_type, directory / "ckpt", **COMMON, **overrides)
    plan = rdnac.compile(directory / "ckpt", target="cpu", output=directory / "plan.msgpack", quiet=True)
    return request.param, model, rdnac.load(plan)


def test_logits_and_greedy_match_transformers(compiled):
    name, model, llm = compiled
    check_logits_match(llm.engine, model, PROMPT, atol=1e-4)
    ours = llm.generate([PROMPT], SamplingParams(max_tokens=24, ignore_eos=True))[0].token_ids
    assert ours == reference_greedy(model, PROMPT, 24)
    ops = llm.graph.op_counts()
    assert ops["gated_delta_rule"] == 2 and ops["moe_experts"] == (2 if name == "qwen3_next" else 3)
    assert ops["sigmoid_gate"] == 1 + ops["moe_experts"]  # the attention's output gate, each shared expert's
    if name == "qwen3_next":
        decisions = [d["action"] for d in llm.plan.body["decisions"]]
        assert any(a.startswith("split into in_proj_qkv and in_proj_z") for a in decisions)


def test_chunked_prefill_and_concurrency(compiled):
    _, _, llm = compiled
    params = SamplingParams(max_tokens=5, ignore_eos=True, logprobs=True)
    whole = LLMEngine(llm.runner).generate([PROMPT], params)[0]
    chunked = LLMEngine(llm.runner, max_num_batched_tokens=40).generate([PROMPT], params)[0]  # 40, 40, 20
    assert chunked.token_ids == whole.token_ids
    assert max(abs(a - b) for a, b in zip(chunked.logprobs, whole.logprobs)) <= 1e-5

    prompts = [PROMPT[: 7 + 23 * i] for i in range(5)]
    greedy = SamplingParams(max_tokens=5, ignore_eos=True)
    alone = [LLMEngine(llm.runner).generate([p], greedy)[0].token_ids for p in prompts]
    together = LLMEngine(llm.runner, max_num_seqs=3, max_num_batched_tokens=48).generate(prompts, greedy)
    assert [o.token_ids for o in together] == alone


def test_qwen3_5_moe_vision_language_wrapper(tmp_path):
    """Qwen3_5MoeForConditionalGeneration compiles its text model; the vision tower is ignored with its reason."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    from tests.support.checkpoints import write_byte_tokenizer

    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=44, patch_size=4,
                  num_position_embeddings=16)
    config = Qwen3_5MoeConfig(text_config=COMMON, vision_config=vision, image_token_id=290, video_token_id=291,
                              vision_start_token_id=292, vision_end_token_id=293)
    torch.manual_seed(4)
    model = Qwen3_5MoeForConditionalGeneration(config).eval()
    perturb_norms(model)
    model.save_pretrained(tmp_path / "vlm")
    write_byte_tokenizer(tmp_path / "vlm", 300)
    llm = rdnac.load(rdnac.compile(tmp_path / "vlm", target="cpu", output=tmp_path / "vlm.msgpack", quiet=True))
    check_logits_match(llm.engine, model, PROMPT[:70], atol=1e-4)
    ignored = {d["node"]: d["reason"] for d in llm.plan.body["decisions"] if d["action"] == "ignored tensor"}
    assert "vision tower" in ignored["model.visual.patch_embed.proj.weight"]
