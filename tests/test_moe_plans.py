"""MoE plans for sm90 generate the reference interpreter's greedy tokens on decisive random weights.

The plan's own kernels (the fused MoE family, routing, attention with sinks and windows) against the
reference interpreter on the same plan graph and weights: under the Triton interpreter on cpu here, and
on the GPU with captured decode graphs (`gpu` marker, run on the GPU machine; BENCHMARKS.md). The
checkpoints are rdnac.testing.moe's Hub layouts: Qwen3-MoE in bf16 and GPT-OSS with MXFP4 experts kept
4-bit. Flat random weights cannot give a stable token comparison; decisive ones can.
"""

from __future__ import annotations

import pytest
import torch

import rdnac
from rdnac import SamplingParams
from rdnac.runtime.llm import LLM
from rdnac.runtime.model_runner import ModelRunner
from rdnac.testing.moe import write_random_moe_checkpoint

PROMPTS = [[(37 * i) % 500 + 5 for i in range(12)], [300, 12, 13, 14, 15, 16]]
CASES = [("qwen3-moe-tiny", "bf16"), ("gpt-oss-tiny", "mxfp4")]


def _plan(tmp_path, shape, scheme, layers=2, **compile_options):
    ckpt = write_random_moe_checkpoint(tmp_path / "ckpt", shape, scheme, layers=layers, decisive=True)
    return rdnac.compile(ckpt, "sm90", tmp_path / "p.msgpack", quiet=True, max_model_len=256, **compile_options)


def _reference(llm) -> LLM:
    """The reference interpreter on the same plan graph and weights, on cpu."""
    return LLM(ModelRunner(llm.plan, {k: v.cpu() for k, v in llm.weights.items()}, "cpu"))


def _check_decisive(reference: LLM) -> None:
    logits = reference.logits(PROMPTS[0]).float()
    top2 = logits.topk(2, dim=-1).values
    assert ((top2[:, 0] - top2[:, 1]) / logits.std(dim=-1)).min() > 1, "decisive: wide top-1 margins"


@pytest.mark.parametrize("shape,scheme", CASES)
def test_sm90_moe_plan_under_the_interpreter_gives_the_reference_tokens(shape, scheme, tmp_path):
    plan = _plan(tmp_path, shape, scheme)
    engine = rdnac.load(plan, interpret=True)
    ops = {n.op for n in engine.plan.graph().nodes}
    assert ("moe_experts_mxfp4" if scheme == "mxfp4" else "moe_experts") in ops
    reference = _reference(engine)
    ours = [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_tokens=8))]
    ref = [c.token_ids for c in reference.generate(PROMPTS, SamplingParams(max_tokens=8))]
    assert ours == ref
    assert len({t for seq in ref for t in seq}) >= 10, "the continuation moves through the vocabulary"
    _check_decisive(reference)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,scheme", CASES)
def test_sm90_moe_plan_with_graphs_gives_the_reference_tokens(shape, scheme, tmp_path):
    """Issue 24's GPU acceptance: 32 greedy tokens with captured decode graphs, alone and batched."""
    plan = _plan(tmp_path, shape, scheme, layers=4)
    engine = rdnac.load(plan, device="cuda")
    assert engine.runner.graphs is not None, "decode graphs captured"
    reference = _reference(engine)
    ref = [c.token_ids for c in reference.generate(PROMPTS, SamplingParams(max_tokens=32))]
    alone = [engine.generate([p], SamplingParams(max_tokens=32))[0].token_ids for p in PROMPTS]
    batched = [c.token_ids for c in engine.generate(PROMPTS * 9, SamplingParams(max_tokens=32))]
    assert alone == ref and batched == ref * 9
    _check_decisive(reference)
    torch.cuda.synchronize()
