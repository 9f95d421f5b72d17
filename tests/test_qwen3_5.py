"""Qwen3.5 (dense, hybrid Gated DeltaNet + gated full attention) on the cpu target against transformers fp32
(its GDN torch fallback): logits and greedy tokens, chunked prefill split mid-GDN-chunk, the per-sequence
state slots under the LLMEngine (concurrency, cancellation, over-subscription), the vision-language
wrapper's text model with multi-token-prediction weights ignored, and bad checkpoints refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import rdnac
from rdnac import SamplingParams
from rdnac.errors import CheckpointError, UnsupportedModelError
from rdnac.runtime.llm_engine import LLMEngine
from rdnac.runtime.model_runner import StepEntry
from tests.support.checkpoints import (check_logits_match, make_checkpoint, perturb_norms, reference_greedy,
                                      write_byte_tokenizer)

# Odd sizes: hidden 44, GQA 3:1 with head_dim 16 (partial RoPE over 4 dims), GDN with 2 key heads of 12 serving
# 4 value heads of 10; linear and full layers interleaved.
CONFIG = dict(hidden_size=44, intermediate_size=68, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1,
              head_dim=16, vocab_size=300, max_position_embeddings=512, linear_num_key_heads=2,
              linear_num_value_heads=4, linear_key_head_dim=12, linear_value_head_dim=10,
              layer_types=["linear_attention", "full_attention", "linear_attention"])
# longer than one GDN chunk (64 in transformers' fallback and in the plan); no token 0: reference_greedy's
# generate takes 0 as the pad id and would mask it out
PROMPT = torch.randint(1, 256, (130,), generator=torch.Generator().manual_seed(1)).tolist()
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3_5")
    model = make_checkpoint("qwen3_5_text", directory / "ckpt", **CONFIG)
    return directory, model


@pytest.fixture(scope="module")
def plan(checkpoint):
    directory, _ = checkpoint
    return rdnac.compile(directory / "ckpt", target="cpu", output=directory / "qwen3_5.msgpack", quiet=True)


@pytest.fixture(scope="module")
def llm(plan):
    return rdnac.load(plan)


def test_plan_declares_per_layer_state(llm):
    state = {s.name: s for s in llm.graph.state}
    assert {n for n, s in state.items() if s.kind == "conv"} == {"conv_state.0", "conv_state.2"}
    assert {n for n, s in state.items() if s.kind == "recurrent"} == {"recurrent_state.0", "recurrent_state.2"}
    assert {n for n, s in state.items() if s.kind == "paged_kv"} == {"k_cache.1", "v_cache.1"}
    assert state["conv_state.0"].shape == (2 * 2 * 12 + 4 * 10, 3) and state["conv_state.0"].dtype == "float32"
    assert state["recurrent_state.2"].shape == (4, 12, 10) and state["recurrent_state.2"].dtype == "float32"
    assert "state_slots" in llm.graph.inputs
    assert llm.engine.block_manager.num_slots == llm.engine.max_num_seqs
    decisions = [d for d in llm.plan.body["decisions"] if d.get("pass") == "frontend"]
    assert any(d["action"] == "prefix caching off" for d in decisions)


def test_logits_match_transformers(checkpoint, llm):
    _, model = checkpoint
    check_logits_match(llm.engine, model, PROMPT, atol=1e-4)


def test_greedy_matches_transformers(checkpoint, llm):
    _, model = checkpoint
    ours = llm.generate([PROMPT], GREEDY)[0].token_ids
    assert ours == reference_greedy(model, PROMPT, 24)


def test_prefill_in_three_chunks_equals_one(llm):
    """Chunks of 50, 50 and 30 tokens (the first two end mid-GDN-chunk): the state goes through the slot."""
    runner, bm = llm.runner, llm.engine.block_manager
    table, slot = bm.take_blocks(-(-len(PROMPT) // runner.block_size)), bm.take_slot()
    try:
        one = runner.execute([StepEntry(PROMPT, table, 0, len(PROMPT), slot)], logits_all=True).logits
        three = torch.cat([runner.execute([StepEntry(PROMPT, table, s, e, slot)], logits_all=True).logits
                           for s, e in ((0, 50), (50, 100), (100, len(PROMPT)))])
    finally:
        bm.free(table)
        bm.free_slot(slot)
    assert three.shape == one.shape == (len(PROMPT), 300)
    assert (three - one).abs().max() <= 1e-5, (three - one).abs().max()

    # the same through the LLMEngine's scheduler: its first token's logprob comes from the last chunk
    params = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=True)
    whole = LLMEngine(llm.runner).generate([PROMPT], params)[0]
    chunked = LLMEngine(llm.runner, max_num_batched_tokens=50).generate([PROMPT], params)[0]
    assert chunked.token_ids == whole.token_ids
    assert max(abs(a - b) for a, b in zip(chunked.logprobs, whole.logprobs)) <= 1e-5


def _prompts(count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    lengths = [3 + (i * 37) % 140 for i in range(count)]  # 3 .. 142 tokens, some past a GDN chunk
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def alone(llm):
    """Greedy tokens of each of 17 prompts run alone."""
    engine = LLMEngine(llm.runner)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    return [engine.generate([p], params)[0].token_ids for p in _prompts(17)]


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return tokens


@pytest.mark.parametrize("config", [
    {"max_num_seqs": 8, "max_num_batched_tokens": 64},  # queued behind their state slots, chunks beside decodes
    {"max_num_seqs": 8, "max_num_batched_tokens": 64, "num_blocks": 9},  # and preempted: recomputed from zeros
], ids=["slots", "preemption"])
def test_seventeen_concurrent_requests_match_each_alone(llm, alone, config):
    engine = LLMEngine(llm.runner, **config)
    tokens = _run(engine, _prompts(17), SamplingParams(max_tokens=6, ignore_eos=True))
    assert [tokens[f"r{i}"] for i in range(17)] == alone
    assert engine.block_manager.num_free_slots == 8
    assert (engine.stats()["preemptions"] > 0) == ("num_blocks" in config)


def test_over_subscribed_state_slots_queue(llm, alone):
    engine = LLMEngine(llm.runner, max_num_seqs=2)
    bm = engine.block_manager
    prompts = _prompts(5)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=6, ignore_eos=True))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(5)}
    out = engine.step()
    assert bm.num_slots == 2 and bm.num_free_slots == 0
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 3
    while True:
        for o in out:
            tokens[o.request_id] += o.new_token_ids
        if not engine.has_unfinished():
            break
        out = engine.step()
    assert [tokens[f"r{i}"] for i in range(5)] == alone[:5]
    assert bm.num_free_slots == 2


def test_cancelled_request_frees_its_state_slot(llm):
    engine = LLMEngine(llm.runner, max_num_seqs=4)
    bm = engine.block_manager
    for i, p in enumerate(_prompts(3)):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert bm.num_free_slots == 1
    engine.abort_request("r1")
    assert bm.num_free_slots == 2
    outputs = engine.step()
    assert any(o.request_id == "r1" and o.finish_reason == "abort" for o in outputs)
    for rid in ("r0", "r2"):
        engine.abort_request(rid)
    engine.step()
    assert bm.num_free_slots == 4 and not engine.has_unfinished()


def test_vision_language_wrapper_compiles_its_text_model(tmp_path):
    """Qwen3_5ForConditionalGeneration: the text model under model.language_model.*, the vision tower and
    multi-token-prediction weights ignored with their reasons."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=44, patch_size=4,
                  num_position_embeddings=16)
    config = Qwen3_5Config(text_config=CONFIG, vision_config=vision, image_token_id=290, video_token_id=291,
                           vision_start_token_id=292, vision_end_token_id=293)
    torch.manual_seed(2)
    model = Qwen3_5ForConditionalGeneration(config).eval()
    perturb_norms(model)
    ckpt = tmp_path / "vlm"
    model.save_pretrained(ckpt)
    write_byte_tokenizer(ckpt, 300)
    tensors = load_file(ckpt / "model.safetensors")  # the Hub checkpoints carry an MTP head
    tensors["mtp.fc.weight"] = torch.randn(44, 88)
    tensors["mtp.layers.0.mlp.up_proj.weight"] = torch.randn(68, 44)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["mtp_num_hidden_layers"] = 1
    (ckpt / "config.json").write_text(json.dumps(config))

    plan = rdnac.compile(ckpt, target="cpu", output=tmp_path / "vlm.msgpack", quiet=True)
    llm = rdnac.load(plan)
    check_logits_match(llm.engine, model, PROMPT[:70], atol=1e-4)
    ignored = {d["node"]: d["reason"] for d in llm.plan.body["decisions"] if d["action"] == "ignored tensor"}
    assert "multi-token-prediction" in ignored["mtp.fc.weight"]
    assert "vision tower" in ignored["model.visual.patch_embed.proj.weight"]
    assert any(d["action"] == "mtp_num_hidden_layers 1 not applied" for d in llm.plan.body["decisions"])


def _edited_checkpoint(checkpoint, tmp_path, **changes):
    directory, _ = checkpoint
    ckpt = tmp_path / "edited"
    shutil.copytree(directory / "ckpt", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def test_layer_types_that_do_not_match_the_tensors_are_refused(checkpoint, tmp_path):
    ckpt = _edited_checkpoint(checkpoint, tmp_path,
                              layer_types=["linear_attention", "linear_attention", "full_attention"])
    with pytest.raises(CheckpointError) as e:
        rdnac.compile(ckpt, target="cpu", output=tmp_path / "x.msgpack", quiet=True)
    message = str(e.value)
    assert "\n" not in message and "layer_types[1] is 'linear_attention'" in message
    assert "model.layers.1.self_attn" in message, message


@pytest.mark.parametrize("kernel", [1, 6])
def test_a_conv_kernel_the_plan_cannot_hold_is_refused(checkpoint, tmp_path, kernel):
    ckpt = _edited_checkpoint(checkpoint, tmp_path, linear_conv_kernel_dim=kernel)
    with pytest.raises(UnsupportedModelError) as e:
        rdnac.compile(ckpt, target="cpu", output=tmp_path / "x.msgpack", quiet=True)
    message = str(e.value)
    assert "\n" not in message and "linear_conv_kernel_dim requires 2..4" in message and f"got {kernel}" in message


# GPU compiles of this model (refused before the GDN kernels landed) are tested in tests/test_kernels_gdn.py:
# cross-compiled for every target, and run on cuda with graphs against the interpreter.
