"""o_proj's FP8 activation quantization fused into attention (`fuse_attention_quant`).

Tiny FP8 block-128 checkpoints at head_dim 128 (one quantization group per head, as Qwen3-8B and
Llama-3-8B) and at head_dim 64 (groups span heads: left unfused). cpu plans run the reference
interpreter; sm90 plans run their own kernels under the Triton interpreter, prefill and decode steps.
"""

from __future__ import annotations

import pytest
import torch

import rdnac
from rdnac.runtime.model_runner import StepEntry
from rdnac.testing.fp8 import write_random_checkpoint

PASS = "fuse_attention_quant"
PROMPTS = [[(37 * i) % 990 + 5 for i in range(9)], [900, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention_quant")
    for head_dim in (128, 64):
        write_random_checkpoint(root / f"d{head_dim}", hidden=256, layers=2, heads=256 // head_dim * 2,
                                kv_heads=256 // head_dim, head_dim=head_dim, intermediate=512, vocab=1000,
                                scheme="fp8-block", decisive=True)
    return root


def _compile(checkpoints, head_dim, target, disabled=()):
    out = checkpoints / f"d{head_dim}.{target}.{len(disabled)}.msgpack"
    return rdnac.compile(checkpoints / f"d{head_dim}", target, out, quiet=True, max_model_len=256, max_num_seqs=2,
                         max_num_batched_tokens=16, disable_passes=disabled)


def _steps(engine) -> list[torch.Tensor]:
    """Logits of a 2-sequence prefill step, then two batch-2 decode steps and one batch-1 step."""
    seqs = [(list(p), engine.engine.block_manager.take_blocks(2)) for p in PROMPTS]
    out = [engine.runner.execute([StepEntry(ids, blocks, 0, len(ids)) for ids, blocks in seqs]).logits]
    for step in range(3):
        live = seqs if step < 2 else seqs[:1]
        for (ids, _), row in zip(live, out[-1]):
            ids.append(int(row.argmax()))
        out.append(engine.runner.execute([StepEntry(ids, blocks, len(ids) - 1, len(ids)) for ids, blocks in live]).logits)
    return out


@pytest.mark.parametrize("target", ["cpu", "sm90"])
def test_fused_attention_quant_gives_the_unfused_bits(checkpoints, target):
    on = rdnac.load(_compile(checkpoints, 128, target), interpret=target != "cpu")
    off = rdnac.load(_compile(checkpoints, 128, target, (PASS,)), interpret=target != "cpu")
    ops_on, ops_off = on.graph.op_counts(), off.graph.op_counts()
    assert ops_on["attention_quant"] == 2 and "attention" not in ops_on and ops_off["attention"] == 2
    o_proj = next(n for n in on.graph.nodes if n.name == "layers.0.o_proj")
    assert o_proj.attrs["act_scheme"] == "prequantized" and o_proj.attrs["group"] == 128
    attn = next(n for n in on.graph.nodes if n.name == "layers.0.attn")
    assert o_proj.inputs[0] == attn.outputs[0] and o_proj.inputs[3] == attn.outputs[1]
    assert attn.outputs[0].endswith(".fp8") and attn.outputs[1].endswith(".fp8_scale")
    decisions = [d for d in on.plan.body["decisions"] if d["pass"] == PASS]
    assert [d["node"] for d in decisions] == ["layers.0.attn", "layers.1.attn"]
    assert all(d["action"].startswith("fused e4m3fn group-128 quantization of layers.") for d in decisions)
    for step, (a, b) in enumerate(zip(_steps(on), _steps(off))):
        assert torch.equal(a, b), f"{target} step {step}: fused vs unfused differ by {(a - b).abs().max():.3g}"
    if target == "sm90":
        kernels = {k["kernel"].rpartition(":")[2] for k in on.plan.body["kernels"]}
        assert "_quant_fp8_kernel" in kernels  # prefill keeps the quant launch; decode does not need it
        decode_calls = {k["call"]["constexprs"].get("QUANT") for k in on.plan.body["kernels"]
                        if k["kernel"].endswith(":_decode_kernel")}
        assert decode_calls == {True}


def test_groups_spanning_heads_stay_with_the_linear(checkpoints):
    plan = rdnac.load(_compile(checkpoints, 64, "cpu"))
    assert "attention_quant" not in plan.graph.op_counts()
    kept = [d for d in plan.plan.body["decisions"] if d["pass"] == PASS]
    assert len(kept) == 2 and all(d["action"] == "kept unfused" for d in kept)
    assert "is not one head of 64" in kept[0]["reason"]
