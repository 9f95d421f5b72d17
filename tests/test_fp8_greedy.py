"""FP8 sm90 plans generate the reference interpreter's greedy tokens on decisive random weights.

This is the CPU form of issue 4's GPU acceptance (`bench/fp8_e2e.py`, in git history at 1345601, ran it on
the GPU at Qwen3-8B widths; BENCHMARKS.md has the figures): the plan's own kernels, under the Triton interpreter, against the reference
interpreter on the same plan graph and weights. Flat random weights cannot give a stable token
comparison (see `write_random_checkpoint(decisive=...)` and BENCHMARKS.md); decisive ones can.
"""

from __future__ import annotations

import pytest
import torch

import rdnac
from rdnac import SamplingParams
from rdnac.runtime.llm import LLM
from rdnac.runtime.model_runner import ModelRunner
from rdnac.testing.fp8 import write_random_checkpoint

PROMPTS = [[(37 * i) % 990 + 5 for i in range(12)], [900, 12, 13, 14, 15, 16]]
SHAPE = dict(hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, intermediate=512, vocab=1000)


@pytest.mark.parametrize("scheme", ["fp8-block", "fp8-tensor"])
def test_fp8_plan_greedy_tokens_match_the_reference(scheme, tmp_path):
    write_random_checkpoint(tmp_path / "ckpt", scheme=scheme, decisive=True, **SHAPE)
    plan = rdnac.compile(tmp_path / "ckpt", "sm90", tmp_path / "p.msgpack", quiet=True, max_model_len=256)
    engine = rdnac.load(plan, interpret=True)
    reference = LLM(ModelRunner(engine.plan, engine.weights, "cpu"))
    ours = [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_tokens=10))]
    ref = [c.token_ids for c in reference.generate(PROMPTS, SamplingParams(max_tokens=10))]
    assert ours == ref
    assert len({t for seq in ref for t in seq}) >= 15, "the continuation moves through the vocabulary"
    logits = reference.logits(PROMPTS[0]).float()
    top2 = logits.topk(2, dim=-1).values
    assert ((top2[:, 0] - top2[:, 1]) / logits.std(dim=-1)).min() > 3, "decisive: wide top-1 margins"


def test_decisive_layers_still_shape_the_logits(tmp_path):
    """The decisive generator keeps the layers relevant: removing them changes the logits a lot."""
    write_random_checkpoint(tmp_path / "ckpt", decisive=True, **SHAPE)
    plan = rdnac.compile(tmp_path / "ckpt", "cpu", tmp_path / "p.msgpack", quiet=True, max_model_len=256)
    engine = rdnac.load(plan)
    full = engine.logits(PROMPTS[0]).float()
    for name in list(engine.weights):
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            engine.weights[name].zero_()
    bare = engine.logits(PROMPTS[0]).float()
    relative = ((full - bare).norm(dim=-1) / full.norm(dim=-1)).mean().item()
    print(f"\nlayers change the logits by {relative:.1%} (relative L2)")
    assert relative > 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["fp8-block", "fp8-tensor"])
def test_gpu_fp8_plan_greedy_tokens_match_the_reference(scheme, tmp_path):
    """The GPU form of the test above: the sm90 plan compiled on the GPU machine, run on cuda with captured
    decode graphs (the fused down projection and early weight loads of issue 29 at decode sizes), against
    the reference interpreter on the same plan graph and weights on cpu."""
    write_random_checkpoint(tmp_path / "ckpt", scheme=scheme, decisive=True, **SHAPE)
    plan = rdnac.compile(tmp_path / "ckpt", "sm90", tmp_path / "p.msgpack", quiet=True, max_model_len=256,
                         max_num_seqs=4)
    engine = rdnac.load(plan, device="cuda")
    reference = LLM(ModelRunner(engine.plan, {k: t.cpu() for k, t in engine.weights.items()}, "cpu"))
    fused = [n for n in engine.graph.nodes if n.op == "gated_act_linear_fp8"]
    ours = [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_tokens=24))]
    ref = [c.token_ids for c in reference.generate(PROMPTS, SamplingParams(max_tokens=24))]
    assert ours == ref, f"{len(fused)} fused down projections"
