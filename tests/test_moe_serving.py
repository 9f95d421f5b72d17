"""MoE plans under continuous batching (issue 24's serving acceptance): requests of different lengths arriving
in two waves, finishing at different steps, through the LLMEngine's scheduler.

On the GPU (`gpu` marker): with captured decode graphs (padded to their batch buckets) against the same plan
run eagerly, the greedy tokens are identical at concurrency 1, 3, 17 and 64, for Qwen3-MoE in bf16 and
GPT-OSS with MXFP4 experts kept 4-bit (sm90 plans of rdnac.testing.moe's decisive random weights). Here, on
the cpu target, the same scheduling gives each request the tokens it gets alone.
"""

from __future__ import annotations

import pytest

import rdnac
from rdnac import SamplingParams
from rdnac.testing.moe import write_random_moe_checkpoint

CASES = [("qwen3-moe-tiny", "bf16"), ("gpt-oss-tiny", "mxfp4")]
LEVELS = (1, 3, 17, 64)


def _prompts(count: int) -> list[list[int]]:
    """`count` prompts of 3 to 60 tokens (past GPT-OSS-tiny's 128-token window with the continuation)."""
    return [[(37 * i + 11 * j) % 500 + 5 for j in range(3 + (i * 13) % 58)] for i in range(count)]


def _length(i: int) -> int:
    return 6 + (i * 7) % 15  # 6 to 20 tokens: sequences leave at different steps


def serve(llm, prompts: list[list[int]], first: int = 0) -> list[list[int]]:
    """Greedy tokens of each prompt through llm's engine: the first half added at once, the rest after three
    steps (they join running sequences mid-decode); prompt i (counted from `first`) asks for _length(i)."""
    engine = llm.engine
    tokens: dict[str, list[int]] = {}

    def add(indices):
        for i in indices:
            engine.add_request(f"r{i}", prompts[i], SamplingParams(max_tokens=_length(first + i), ignore_eos=True))
            tokens[f"r{i}"] = []

    half = (len(prompts) + 1) // 2
    add(range(half))
    steps = 0
    while engine.has_unfinished() or len(tokens) < len(prompts):
        if steps == 3:
            add(range(half, len(prompts)))
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        steps += 1
    return [tokens[f"r{i}"] for i in range(len(prompts))]


def _plan(tmp_path, shape: str, scheme: str, target: str):
    ckpt = write_random_moe_checkpoint(tmp_path / "ckpt", shape, scheme, layers=2, decisive=True)
    return rdnac.compile(ckpt, target, tmp_path / "p.msgpack", quiet=True, max_model_len=256)


@pytest.mark.parametrize("shape,scheme", CASES)
def test_continuous_batching_gives_each_request_its_tokens_alone(shape, scheme, tmp_path):
    llm = rdnac.load(_plan(tmp_path, shape, scheme, "cpu"))
    prompts = _prompts(4)
    batched = serve(llm, prompts)
    alone = [serve(llm, [p], first=i)[0] for i, p in enumerate(prompts)]
    assert [len(t) for t in batched] == [_length(i) for i in range(4)]
    assert batched == alone


@pytest.mark.gpu
@pytest.mark.parametrize("shape,scheme", CASES)
def test_graph_replay_and_eager_give_identical_tokens_under_continuous_batching(shape, scheme, tmp_path):
    plan = _plan(tmp_path, shape, scheme, "sm90")
    graphs = rdnac.load(plan, device="cuda")
    eager = rdnac.load(plan, device="cuda", enforce_eager=True)
    assert graphs.runner.use_graphs and not eager.runner.use_graphs
    prompts = _prompts(max(LEVELS))
    for concurrency in LEVELS:
        replayed = serve(graphs, prompts[:concurrency])
        reference = serve(eager, prompts[:concurrency])
        assert [len(t) for t in replayed] == [_length(i) for i in range(concurrency)]
        assert replayed == reference, f"{shape}/{scheme}: graph replay differs from eager at concurrency {concurrency}"
        assert graphs.runner.graphs is not None, "decode steps replayed captured graphs"
