"""Tiny random HF checkpoints of every supported family against transformers (fp32 on CPU)."""

from __future__ import annotations

import pytest
import torch

import rdnac
from rdnac import SamplingParams
from tests.support.checkpoints import make_checkpoint, reference_greedy, reference_logits

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
def compiled(request, tmp_path_factory):
    family, overrides, shard = CASES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    model = make_checkpoint(family, directory / "ckpt", shard_size=shard, **overrides)
    if shard:
        assert (directory / "ckpt" / "model.safetensors.index.json").exists()
    plan = rdnac.compile(directory / "ckpt", target="cpu", output=directory / "model.msgpack")
    return model, rdnac.load(plan)


def test_logits_match_transformers(compiled):
    model, engine = compiled
    ours = engine.logits(PROMPT)
    ref = reference_logits(model, PROMPT)
    assert ours.shape == ref.shape == (len(PROMPT), model.config.vocab_size)
    assert ours.dtype == torch.float32
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4, f"max abs logit error {err:.3g}"


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
