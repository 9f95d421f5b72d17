"""LLMEngine on a tiny real model (cpu plan, fp32) against `LLM.generate` of each prompt alone,
and the sampler against Hugging Face's logits processors and Triton's Philox."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

import rdnac
from rdnac.errors import RequestError
from rdnac.runtime.llm_engine import LLMEngine, RequestOutput, SamplingParams
from rdnac.runtime.sampling import (SamplingBatch, apply_repetition_penalty, draw, philox_uniform, sample,
                                    seed_to_int64, truncate)
from tests.support.cases import tiny_llama_plan


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return tiny_llama_plan(tmp_path_factory.mktemp("llm_engine"))


@pytest.fixture(scope="module")
def engine(plan):
    """The LLM whose runner the LLMEngines are built on (each new LLMEngine takes over its state)."""
    return rdnac.load(plan)


@pytest.fixture(scope="module")
def workload():
    """32 prompts of 1..60 tokens, half starting with a common 40-token prefix, and their max_tokens."""
    rng = random.Random(0)
    shared = [rng.randrange(3, 256) for _ in range(40)]
    prompts = []
    for i in range(32):
        n = rng.randrange(1, 61)
        k = rng.randrange(17, 41) if i % 2 else 0
        prompts.append((shared[:k] + [rng.randrange(3, 256) for _ in range(n)])[:max(n, k + 1)])
    return prompts, [rng.randrange(1, 13) for _ in prompts]


@pytest.fixture(scope="module")
def sequential(plan, workload):
    """The reference: `LLM.generate` of each prompt alone (greedy)."""
    reference = rdnac.load(plan)
    prompts, max_tokens = workload
    return [reference.generate([p], SamplingParams(max_tokens=m))[0] for p, m in zip(prompts, max_tokens)]


def run_streaming(llm: LLMEngine, prompts, params, ids=None) -> dict[str, RequestOutput]:
    """Add the requests, step to completion, check the stream's invariants; returns the final outputs."""
    ids = ids or [f"r{i}" for i in range(len(prompts))]
    params = params if isinstance(params, list) else [params] * len(prompts)
    for request_id, prompt, p in zip(ids, prompts, params):
        llm.add_request(request_id, prompt, p)
    tokens = {i: [] for i in ids}
    texts = {i: "" for i in ids}
    final: dict[str, RequestOutput] = {}
    while llm.has_unfinished():
        outputs = llm.step()
        assert len({o.request_id for o in outputs}) == len(outputs)
        for out in outputs:
            assert out.request_id not in final, "output after the final one"
            assert len(out.new_token_ids) <= 1
            tokens[out.request_id] += out.new_token_ids
            texts[out.request_id] += out.new_text
            assert out.token_ids == tokens[out.request_id] and out.text == texts[out.request_id]
            if out.logprobs is not None:
                assert len(out.logprobs) == len(out.new_token_ids)
            if out.finished:
                final[out.request_id] = out
            else:
                assert out.finish_reason is None
    assert sorted(final) == sorted(ids)
    return final


def expected_text(engine, out: RequestOutput) -> str:
    """The text of the generated tokens; a final stop token's text is not part of it."""
    ids = out.token_ids
    if out.finish_reason == "stop" and ids and ids[-1] in engine.tokenizer.eos_token_ids:
        ids = ids[:-1]
    return engine.tokenizer.decode(ids)


@pytest.mark.parametrize("config", [
    {},
    {"num_blocks": 14, "max_num_batched_tokens": 24, "max_num_seqs": 8},  # chunked prefill, queueing, preemption
    {"num_blocks": 16, "max_num_batched_tokens": 40, "enable_prefix_caching": True},
], ids=["default", "small-pool", "prefix-caching"])
def test_concurrent_greedy_matches_sequential(engine, workload, sequential, config):
    prompts, max_tokens = workload
    llm = LLMEngine(engine.runner, **config)
    start = llm.num_free_blocks
    final = run_streaming(llm, prompts, [SamplingParams(max_tokens=m) for m in max_tokens])
    for i, ref in enumerate(sequential):
        out = final[f"r{i}"]
        assert out.token_ids == ref.token_ids, f"prompt {i}"
        assert out.finish_reason == ref.finish_reason and out.num_prompt_tokens == len(prompts[i])
        assert out.text == expected_text(engine, out)
    assert llm.num_free_blocks == start == llm.num_total_blocks
    stats = llm.stats()
    assert stats["running"] == stats["waiting"] == 0
    assert stats["generated_tokens"] == sum(len(r.token_ids) for r in sequential)
    if "num_blocks" in config and not config.get("enable_prefix_caching"):
        assert stats["preemptions"] > 0
    if config.get("enable_prefix_caching"):
        assert stats["prefix_cache_hit_tokens"] > 0


def test_generate_convenience(engine, workload, sequential):
    prompts, max_tokens = workload
    llm = LLMEngine(engine.runner)
    outs = llm.generate(prompts[:4], [SamplingParams(max_tokens=m, logprobs=True) for m in max_tokens[:4]])
    for out, ref in zip(outs, sequential):
        assert out.token_ids == out.new_token_ids == ref.token_ids and out.finished
        assert len(out.logprobs) == len(out.token_ids) and all(lp <= 0 for lp in out.logprobs)


def test_seeded_sampling_reproducible_across_batches(engine, workload):
    prompts, _ = workload
    seeded = SamplingParams(max_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=1234, ignore_eos=True)

    def tokens_of(config, others):
        llm = LLMEngine(engine.runner, **config)
        final = run_streaming(llm, [prompts[3]] + prompts[4:4 + len(others)], [seeded] + others)
        assert llm.num_free_blocks == llm.num_total_blocks
        return final["r0"].token_ids, llm.stats()["preemptions"]

    alone, _ = tokens_of({}, [])
    others = [SamplingParams(max_tokens=20, temperature=t, seed=s, repetition_penalty=1.3, min_p=0.05)
              for t, s in [(0.0, None), (1.2, 5), (0.7, None), (1.0, 1234), (0.5, 9)]]
    batched, _ = tokens_of({}, others)
    squeezed, preemptions = tokens_of({"num_blocks": 8, "max_num_batched_tokens": 16}, others)
    assert alone == batched == squeezed and preemptions > 0
    seeded.seed = 4321
    assert tokens_of({}, [])[0] != alone


def test_stop_conditions(engine, workload):
    prompt = workload[0][5]
    llm = LLMEngine(engine.runner)
    base = run_streaming(llm, [prompt], SamplingParams(max_tokens=16, ignore_eos=True))["r0"]
    assert base.finish_reason == "length" and len(base.token_ids) == 16
    tokens, text = base.token_ids, base.text

    out = run_streaming(llm, [prompt], SamplingParams(max_tokens=3))["r0"]
    assert out.token_ids == tokens[:3] and out.finish_reason == "length"

    k = tokens.index(tokens[5])
    out = run_streaming(llm, [prompt], SamplingParams(max_tokens=16, stop_token_ids=[tokens[5]]))["r0"]
    assert out.token_ids == tokens[:k + 1] and out.finish_reason == "stop"
    assert out.text == engine.tokenizer.decode(tokens[:k])  # the stop token's text is dropped

    stop = text[len(text) // 2:len(text) // 2 + 2]
    out = run_streaming(llm, [prompt], SamplingParams(max_tokens=16, stop=["\x00never", stop]))["r0"]
    assert out.finish_reason == "stop" and out.text == text[:text.find(stop)] and stop not in out.text
    assert out.token_ids == tokens[:len(out.token_ids)]

    eos_ids = llm.tokenizer.eos_token_ids
    llm.tokenizer.eos_token_ids = {tokens[4]}
    try:
        k = tokens.index(tokens[4])
        out = run_streaming(llm, [prompt], SamplingParams(max_tokens=16))["r0"]
        assert out.token_ids == tokens[:k + 1] and out.finish_reason == "stop"
        out = run_streaming(llm, [prompt], SamplingParams(max_tokens=16, ignore_eos=True))["r0"]
        assert out.token_ids == tokens and out.finish_reason == "length"
    finally:
        llm.tokenizer.eos_token_ids = eos_ids

    long_prompt = (prompt * 300)[:llm.max_model_len - 3]
    out = run_streaming(llm, [long_prompt], SamplingParams(max_tokens=10, ignore_eos=True))["r0"]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    assert llm.num_free_blocks == llm.num_total_blocks


def test_abort(engine, workload):
    prompts, _ = workload
    llm = LLMEngine(engine.runner, max_num_seqs=2)
    start = llm.num_free_blocks
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    for i in range(4):
        llm.add_request(f"r{i}", prompts[i], params)
    with pytest.raises(RequestError, match="r1"):
        llm.add_request("r1", prompts[0], params)
    llm.step()
    llm.step()
    held = llm.num_free_blocks
    llm.abort_request("r0")  # running
    assert llm.num_free_blocks > held
    llm.abort_request("r3")  # waiting
    llm.abort_request("unknown")
    outputs = {o.request_id: o for o in llm.step()}
    for request_id in ("r0", "r3"):
        assert outputs[request_id].finished and outputs[request_id].finish_reason == "abort"
        assert outputs[request_id].new_token_ids == []
    assert len(outputs["r0"].token_ids) == 2 and outputs["r3"].token_ids == []
    llm.add_request("r0", prompts[0], SamplingParams(max_tokens=2))  # the id is free again
    rest = []
    while llm.has_unfinished():
        rest += llm.step()
    assert {o.request_id for o in rest if o.finished} == {"r0", "r1", "r2"}
    assert all(o.request_id != "r3" for o in rest)
    assert llm.num_free_blocks == start


def test_request_validation(engine):
    for bad in [dict(max_tokens=0), dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(min_p=1.5),
                dict(repetition_penalty=0.0), dict(seed=1.5), dict(stop=[""]), dict(stop_token_ids=[-1]),
                dict(temperature=float("nan"))]:
        with pytest.raises(RequestError, match="requires"):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ["x"]
    llm = LLMEngine(engine.runner, num_blocks=3)
    with pytest.raises(RequestError, match="max model length"):
        llm.add_request("a", [5] * llm.max_model_len, SamplingParams())
    with pytest.raises(RequestError, match="KV blocks"):
        llm.add_request("a", [5] * 40, SamplingParams(max_tokens=10))  # 49 KV slots > 3 blocks of 16
    assert llm.add_request("a", [5] * 40, SamplingParams(max_tokens=9)) == 40  # 48 slots fit exactly
    for bad_prompt in [3.5, [], [10_000]]:
        with pytest.raises(RequestError):
            llm.add_request("b", bad_prompt, SamplingParams())
    with pytest.raises(RequestError, match="SamplingParams"):
        llm.add_request("b", "hi", {"max_tokens": 3})
    with pytest.raises(RequestError, match="max_num_seqs"):
        LLMEngine(engine.runner, max_num_seqs=engine.runner.max_num_seqs + 1)


# ------------------------------------------------------------ the sampler


def test_sampler_processors_match_hf():
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    torch.manual_seed(0)
    rows = [(0.7, 0, 1.0, 0.0, 1.3), (1.0, 5, 1.0, 0.0, 1.0), (1.3, 0, 0.8, 0.0, 0.7), (0.9, 50, 0.9, 0.1, 1.1),
            (2.0, 0, 1.0, 0.2, 1.0), (1.0, 300, 0.5, 0.0, 2.0), (0.5, 1, 1.0, 0.0, 1.0)]
    logits = torch.randn(len(rows), 300) * 3  # [B, V]
    history = [torch.randint(0, 300, (n,)).tolist() for n in (1, 7, 20, 3, 50, 12, 2)]
    ours = apply_repetition_penalty(logits, history, [r[4] for r in rows])
    ours = truncate(ours / torch.tensor([r[0] for r in rows])[:, None], [r[1] for r in rows],
                    [r[2] for r in rows], [r[3] for r in rows])
    for i, (temperature, top_k, top_p, min_p, penalty) in enumerate(rows):
        ids, ref = torch.tensor([history[i]]), logits[i:i + 1].clone()
        ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, ref)
        ref = TemperatureLogitsWarper(temperature)(ids, ref)
        if top_k:
            ref = TopKLogitsWarper(top_k)(ids, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(ids, ref)
        if min_p:
            ref = MinPLogitsWarper(min_p)(ids, ref)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref[0])), f"row {i}: masks differ"
        kept = ~torch.isinf(ref[0])
        err = (ours[i][kept] - ref[0][kept]).abs().max()
        assert err <= 1e-6, f"row {i}: max error {err}"


def test_sampler_greedy_logprobs_and_distribution():
    torch.manual_seed(0)
    logits = torch.randn(4, 300)
    batch = SamplingBatch([0.0, 1.0, 1.0, 0.5], [0, 1, 0, 0], [1.0, 1.0, 1e-6, 1.0], [0.0, 0.0, 0.0, 1.0],
                          [1.0] * 4, [[]] * 4, [11, 12, 13, 14], [0] * 4, needs_logprobs=True)
    tokens, logprobs = sample(logits, batch)
    assert tokens.shape == (4,) and tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(tokens, logits.argmax(-1))  # greedy, top-k 1, top-p ~0 and min-p 1 all pick the argmax
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0], atol=1e-6, rtol=0)

    small = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(20_000, 1)  # [N, 5]
    n = small.shape[0]
    # one seed per row, and one row drawing 20000 steps: both must follow the softmax
    for seeds, steps in ((list(range(n)), [0] * n), ([7] * n, list(range(n)))):
        tokens, _ = sample(small, SamplingBatch([1.0] * n, [0] * n, [1.0] * n, [0.0] * n, [1.0] * n, [[]] * n,
                                                seeds, steps))
        freq = torch.bincount(tokens, minlength=5).float() / n
        err = (freq - small[0].softmax(-1)).abs().max()
        assert err < 0.015, f"empirical vs softmax: max error {err}"


def test_sampler_seeded_rows_ignore_batch_composition():
    torch.manual_seed(0)
    logits = torch.randn(6, 300)

    def batch(rows, seeds, top_p=0.9):
        n = len(rows)
        return sample(logits[rows], SamplingBatch([1.0] * n, [0] * n, [top_p] * n, [0.0] * n, [1.0] * n, [[]] * n,
                                                  seeds, [3] * n))[0]

    alone = [batch([2], [7])[0].item() for _ in range(5)]
    mixed = [batch([0, 1, 2, 3], [123, 3, 7, 99])[2].item() for _ in range(5)]
    assert alone == mixed and len(set(alone)) == 1
    # a row that needs no truncation gets the same token from `draw` (the captured path) and from `sample`
    # whether or not another row of its batch asks for top-p / a penalty / logprobs
    plain = batch([0, 2], [5, 7], top_p=1.0)
    extra = SamplingBatch([1.0, 1.0], [0, 0], [1.0, 0.5], [0.0, 0.0], [1.0, 1.3], [[], [4, 5]], [5, 7], [3, 3],
                          needs_logprobs=True)
    drawn = draw(logits[[0, 2]], torch.ones(2), torch.tensor([5, 7]), torch.tensor([3, 3]))
    assert plain[0] == sample(logits[[0, 2]], extra)[0][0] == drawn[0]


_TRITON_RAND = """
import sys
import torch, triton, triton.language as tl

@triton.jit
def rand_kernel(seeds_ptr, steps_ptr, out_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    u = tl.rand(tl.load(seeds_ptr + row), (tl.load(steps_ptr + row) << 32) | cols.to(tl.int64))
    tl.store(out_ptr + row * V + cols, u, mask=cols < V)

seeds, steps = torch.load(sys.argv[1])
out = torch.empty(len(seeds), 300)
rand_kernel[(len(seeds),)](seeds, steps, out, 300, BLOCK=512)
torch.save(out, sys.argv[2])
"""


def test_sampler_draws_triton_philox_uniforms(tmp_path):
    """The counter-based rule is Triton's tl.rand(seed, (step << 32) | token), bit for bit (Triton interpreter,
    in a subprocess: tl.rand is interpreted only when TRITON_INTERPRET is set before triton is imported)."""
    seeds = torch.tensor([seed_to_int64(s) for s in (0, 1, 1234, 2**63 + 5, -7, 2**40 + 3)], dtype=torch.int64)
    steps = torch.tensor([0, 1, 5, 100, 2**31 + 3, 7], dtype=torch.int64)
    ours = philox_uniform(seeds, steps, 300)  # [6, 300]
    assert ours.shape == (6, 300) and ours.dtype == torch.float32
    assert 0 <= ours.min() and ours.max() < 1
    torch.save((seeds, steps), tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", _TRITON_RAND, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   env={**os.environ, "TRITON_INTERPRET": "1"}, check=True)
    theirs = torch.load(tmp_path / "out.pt")
    assert torch.equal(ours, theirs), f"max difference {(ours - theirs).abs().max()}"
