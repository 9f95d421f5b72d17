"""Tiny random HF checkpoints of every supported family against transformers (fp32 on CPU)."""

from __future__ import annotations

import pytest
import torch

import rdnac
from rdnac import SamplingParams
from tests.support.checkpoints import check_logits_match, make_checkpoint, reference_greedy

PROMPT = [3, 141, 59, 26, 53, 58, 97, 93, 238, 46, 26, 43, 38, 32, 79, 50, 28, 8, 84, 19]

# Awkward sizes: hidden not a power of two, GQA 1/3/4, sharded and single-file, tied and untied.
CASES = {
    "llama-gqa3-untied-sharded": ("llama", dict(hidden_size=72, num_attention_heads=6, num_key_value_heads=2,
                                                head_dim=12), "20KB"),
    "llama-llama3-rope": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=18,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 16}), None),
    "mistral-gqa1-window-tied": ("mistral", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=18,
                                                 sliding_window=8, tie_word_embeddings=True), None),
    "qwen2-gqa4-bias-tied": ("qwen2", dict(hidden_size=96, num_attention_heads=8, num_key_value_heads=2,
                                           head_dim=12, tie_word_embeddings=True), None),
    "qwen2-yarn": ("qwen2", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 32}), None),
    "qwen3-gqa3-qknorm-sharded": ("qwen3", dict(hidden_size=72, num_attention_heads=6, num_key_value_heads=2,
                                                head_dim=16), "30KB"),
    "qwen3-linear-rope-tied": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                             tie_word_embeddings=True,
                                             rope_scaling={"rope_type": "linear", "factor": 2.0}), None),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    family, overrides, shard = CASES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    model = make_checkpoint(family, directory / "ckpt", shard_size=shard, **overrides)
    if shard:
        assert (directory / "ckpt" / "model.safetensors.index.json").exists()
    return request.param, directory, model


@pytest.fixture(scope="module")
def compiled(checkpoint):
    _, directory, model = checkpoint
    plan = rdnac.compile(directory / "ckpt", target="cpu", output=directory / "model.msgpack")
    return model, rdnac.load(plan)


def test_logits_match_transformers(compiled):
    model, engine = compiled
    check_logits_match(engine, model, PROMPT, atol=1e-4)


def test_greedy_continuation_matches_transformers(compiled):
    model, engine = compiled
    ours = engine.generate([PROMPT], SamplingParams(max_tokens=24))[0].token_ids
    assert ours == reference_greedy(model, PROMPT, 24)


def test_batched_generation_matches_single(compiled):
    model, engine = compiled
    prompts = [PROMPT[:5], PROMPT, PROMPT[3:12]]
    batched = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=10))]
    for prompt, out in zip(prompts, batched):
        assert out == reference_greedy(model, prompt, 10)


def test_frontend_graph_is_the_llama_block(checkpoint):
    """The ModelSpec builder gives each family the graph the Llama builder gave (a before/after
    `rdnac inspect --diff` of every case's plan showed no change): per layer the same ops in the same order
    under the same names, biases where the family has them, one RoPE and scale for every layer, a paged K
    and V cache per layer, and no Gemma attribute."""
    from rdnac.compiler.frontend import build_graph, read_checkpoint

    case, directory, model = checkpoint
    c = model.config
    graph, _, _ = build_graph(read_checkpoint(directory / "ckpt"), "float32")
    num_layers, head_dim = c.num_hidden_layers, c.head_dim
    has_qk_norm, is_qwen2 = case.startswith("qwen3"), case.startswith("qwen2")
    layer = ["input_norm", "q_proj", "k_proj", "v_proj", *(["q_norm", "k_norm"] if has_qk_norm else []), "rope",
             "kv_write", "attn", "o_proj", "attn_residual", "post_norm", "gate_proj", "up_proj", "act", "down_proj",
             "mlp_residual"]
    expected = ["embed", *(f"layers.{i}.{leaf}" for i in range(num_layers) for leaf in layer), "final_norm", "logits"]
    assert [n.name for n in graph.nodes] == expected
    nodes = {n.name: n for n in graph.nodes}
    for i in range(num_layers):
        biased = {leaf: len(nodes[f"layers.{i}.{leaf}"].inputs) == 3
                  for leaf in ("q_proj", "k_proj", "v_proj", "o_proj")}
        assert biased == {"q_proj": is_qwen2, "k_proj": is_qwen2, "v_proj": is_qwen2, "o_proj": False}
        attn = nodes[f"layers.{i}.attn"].attrs
        assert (attn["scale"], attn["softcap"]) == (head_dim ** -0.5, 0.0)
        assert attn["sliding_window"] == (c.sliding_window or 0 if case.startswith("mistral") else 0)
        assert nodes[f"layers.{i}.rope"].attrs == nodes["layers.0.rope"].attrs
        assert nodes[f"layers.{i}.act"].attrs == {"act": "silu"}
    assert all("unit_offset" not in n.attrs for n in graph.nodes if "norm" in n.op)
    assert nodes["embed"].attrs == {} and nodes["logits"].attrs == {}
    tied = nodes["logits"].inputs[2] == "model.embed_tokens.weight"
    assert tied == c.tie_word_embeddings == ("lm_head.weight" not in graph.weights)
    assert [(s.name, s.kind, s.layer, s.shape) for s in graph.state] == \
        [(f"{kv}_cache.{i}", "paged_kv", i, (c.num_key_value_heads, head_dim))
         for i in range(num_layers) for kv in "kv"]
