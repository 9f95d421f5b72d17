"""`--fp8-lm-head`: the logits projection as an FP8 GEMM, against the bf16/fp32 lm_head."""

from __future__ import annotations

import pytest
import torch

import rdnac
from rdnac.runtime.llm import LLM
from rdnac.runtime.model_runner import ModelRunner
from tests.support.checkpoints import make_checkpoint

PROMPT = [(37 * i) % 250 + 3 for i in range(24)]


def _checkpoint(directory, tied: bool):
    make_checkpoint("llama", directory / "ckpt", tie_word_embeddings=tied, perturb_std=1.0)
    return directory / "ckpt"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_cpu_plan_fp8_lm_head(tied, tmp_path):
    path = _checkpoint(tmp_path, tied)
    base = rdnac.load(rdnac.compile(path, "cpu", tmp_path / "a.msgpack", quiet=True)).logits(PROMPT)
    plan = rdnac.compile(path, "cpu", tmp_path / "b.msgpack", quiet=True, fp8_lm_head=True)
    engine = rdnac.load(plan)
    ours = engine.logits(PROMPT)
    assert ours.dtype == torch.float32 and ours.shape == base.shape
    head = next(n for n in engine.graph.nodes if "logits" in n.outputs)
    assert head.op == "linear_fp8" and head.attrs["out_dtype"] == "float32"
    assert engine.graph.weights[head.inputs[1]].dtype == "float8_e4m3fn"
    decision = next(d for d in engine.plan.body["decisions"] if "lm_head" in d["action"])
    assert "weight relative error" in decision["reason"] and (("FP8 copy" in decision["reason"]) == tied)
    cosine = torch.nn.functional.cosine_similarity(ours, base, dim=-1).min().item()
    agree = (ours.argmax(-1) == base.argmax(-1)).float().mean().item()
    print(f"\n{'tied' if tied else 'untied'}: min cosine {cosine:.5f}, top-1 agreement {agree:.0%}")
    assert cosine > 0.995 and agree >= 0.9


def test_sm90_plan_fp8_lm_head_kernels_match_reference(tmp_path):
    path = _checkpoint(tmp_path, tied=False)
    plan = rdnac.compile(path, "sm90", tmp_path / "p.msgpack", quiet=True, fp8_lm_head=True, max_model_len=256)
    engine = rdnac.load(plan, interpret=True)
    ours = engine.logits(PROMPT).float()
    reference = LLM(ModelRunner(engine.plan, engine.weights, "cpu")).logits(PROMPT).float()
    cosine = torch.nn.functional.cosine_similarity(ours, reference, dim=-1).min().item()
    print(f"\nsm90 kernels vs reference: min cosine {cosine:.5f}")
    assert ours.dtype == torch.float32 and cosine > 0.99


@pytest.mark.parametrize("target,fmt,act", [("gfx942", "e4m3fnuz", "dynamic_token"), ("gfx1151", "e4m3fn", "none")])
def test_fp8_lm_head_per_target_layout(target, fmt, act, tmp_path):
    """gfx942 holds the lm_head in FNUZ (scale doubled), gfx1151 runs it a16w8; both match the reference."""
    path = _checkpoint(tmp_path, tied=False)
    plan = rdnac.compile(path, target, tmp_path / "p.msgpack", quiet=True, fp8_lm_head=True, max_model_len=256)
    engine = rdnac.load(plan, interpret=True)
    head = next(n for n in engine.graph.nodes if "logits" in n.outputs)
    assert (head.attrs["fp8_format"], head.attrs["act_scheme"]) == (fmt, act)
    assert engine.graph.weights[head.inputs[1]].dtype == f"float8_{fmt}"
    ours = engine.logits(PROMPT).float()
    reference = LLM(ModelRunner(engine.plan, engine.weights, "cpu")).logits(PROMPT).float()
    cosine = torch.nn.functional.cosine_similarity(ours, reference, dim=-1).min().item()
    print(f"\n{target} kernels vs reference: min cosine {cosine:.5f}")
    assert ours.dtype == torch.float32 and cosine > 0.99
