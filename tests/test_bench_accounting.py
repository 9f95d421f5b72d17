"""The byte and FLOP accounting behind BENCHMARKS.md's bandwidth and TFLOP/s figures (rdnac.bench)."""

from __future__ import annotations

import json

import pytest
import torch

import rdnac
from rdnac.bench import harness, profile
from rdnac.bench.decode import decode_bytes
from rdnac.bench.prefill import prefill_flops
from rdnac.errors import RdnacError
from rdnac.ir.state import bytes_per_token
from rdnac.testing.fp8 import SHAPES
from tests.support.checkpoints import make_checkpoint

# make_checkpoint's llama: hidden 72, intermediate 136, 2 layers, 6 heads, 2 KV heads, head_dim 16, vocab 300
LINEAR_PARAMS = 2 * ((6 + 2 * 2) * 16 * 72 + 72 * 6 * 16 + 2 * 136 * 72 + 72 * 136)  # qkv, o, gate_up, down
HEAD_PARAMS = 300 * 72
NORM_PARAMS = 2 * 2 * 72 + 72  # two per layer and the final one


@pytest.fixture(scope="module")
def llama_plan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama")
    make_checkpoint("llama", tmp / "ckpt")
    return rdnac.compile(tmp / "ckpt", "cpu", tmp / "p.msgpack", quiet=True)


@pytest.mark.parametrize("tied", [False, True])
def test_decode_bytes_count_what_a_step_reads(tied, tmp_path):
    make_checkpoint("llama", tmp_path / "ckpt", tie_word_embeddings=tied)
    engine = rdnac.load(rdnac.compile(tmp_path / "ckpt", "cpu", tmp_path / "p.msgpack", quiet=True))
    w = engine.weights
    embed = next(n.inputs[1] for n in engine.graph.nodes if n.op == "embedding")
    every = sum(t.numel() * t.element_size() for t in w.values())
    row = w[embed].shape[1] * w[embed].element_size()
    a = engine.graph.attrs
    kv_per_token = 2 * a["num_layers"] * a["num_kv_heads"] * a["head_dim"] * getattr(torch, a["dtype"]).itemsize
    got = decode_bytes(engine, batch=4, context=100)
    table = 0 if tied else w[embed].numel() * w[embed].element_size()  # tied: the logits read the table
    assert got == every - table + (0 if tied else 4 * row) + 4 * 100 * kv_per_token


def test_prefill_flops_are_two_per_weight_per_token_plus_causal_attention(tmp_path):
    make_checkpoint("llama", tmp_path / "ckpt")
    engine = rdnac.load(rdnac.compile(tmp_path / "ckpt", "cpu", tmp_path / "p.msgpack", quiet=True))
    gemms = [n for n in engine.graph.nodes if n.op in ("linear", "linear_gated_act")]
    assert {n.op for n in gemms} == {"linear", "linear_gated_act"}  # gate_up carries its activation
    linear = sum(engine.weights[n.inputs[1]].numel() for n in gemms)
    head = next(engine.weights[n.inputs[2]].numel() for n in engine.graph.nodes if n.op == "logits")
    a = engine.graph.attrs
    t = 64
    attention = 4 * a["num_layers"] * a["num_heads"] * a["head_dim"] * t * (t + 1) / 2
    assert prefill_flops(engine, t, t) == pytest.approx(2 * linear * t + 2 * head + attention)


def test_ab_table_compiles_with_its_entries_winning(tmp_path, monkeypatch):
    """`--ab-table`: the compile subprocess sees the given table as the user table (which wins over the shipped
    one), and the rest of the real rdnac cache through links, so kernels stay warm."""
    from rdnac.compiler import tuning

    cache = tmp_path / "cache"
    (cache / "rdnac" / "kernels").mkdir(parents=True)
    (cache / "rdnac" / "tuned").mkdir()
    (cache / "rdnac" / "tuned" / "sm90.json").write_text('{"entries": []}')  # the user's own: not seen
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    table = tmp_path / "attn.json"
    table.write_text('{"entries": [], "device": "NVIDIA H200"}')
    with harness.alternative_table(table, "sm90") as env:
        monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
        user = tuning.table_paths("sm90")[1]
        assert user.read_text() == table.read_text()
        assert (user.parents[1] / "kernels").resolve() == (cache / "rdnac" / "kernels").resolve()
    assert not user.exists()  # the temporary cache is gone
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(RdnacError, match="bad.json is not valid JSON"):
        with harness.alternative_table(bad, "sm90"):
            pass


def test_random_checkpoints_are_reused_only_when_written_the_same_way(tmp_path):
    spec = dict(SHAPES["tiny"])
    ckpt, write_s = harness.random_checkpoint(tmp_path, "tiny", "fp8-block", spec)
    assert write_s is not None and (ckpt / "config.json").is_file()
    weights = sorted(ckpt.glob("*.safetensors"))
    assert weights
    written = {p: p.stat().st_mtime_ns for p in weights}
    again, write_s = harness.random_checkpoint(tmp_path, "tiny", "fp8-block", spec)
    assert again == ckpt and write_s is None  # same spec, seed and generator: the files stand
    assert {p: p.stat().st_mtime_ns for p in weights} == written
    other = dict(spec, layers=spec["layers"] + 1)
    _, write_s = harness.random_checkpoint(tmp_path, "tiny", "fp8-block", other)  # another spec: rewritten
    assert write_s is not None
    assert json.loads((ckpt / "config.json").read_text())["num_hidden_layers"] == other["layers"]
    (tmp_path / "tiny-fp8-block.stamp.json").unlink()  # a write cut short leaves no stamp: rewritten
    _, write_s = harness.random_checkpoint(tmp_path, "tiny", "fp8-block", other)
    assert write_s is not None


def test_timeline_advances_sum_to_the_span_however_kernels_overlap():
    """rdnac.bench.profile.timeline_rows: a kernel started early under PDL (before the previous one ended)
    shows it in early_us, and each kernel's advance is what it added to the step's end."""
    from rdnac.ir.graph import Node

    a, b, c = (Node(name, op, [], [name]) for name, op in (("n", "rms_norm"), ("q", "linear"), ("o", "linear")))
    # n runs 0-2; q starts early at 1, waits, ends at 12; o starts early at 11 and ends (11.5) inside q
    kernels = [(a, "_norm", 0.0, 2.0), (b, "_gemm", 1.0, 12.0), (c, "_gemm", 11.0, 11.5)]
    rows, by_op = profile.timeline_rows(kernels)
    assert [r["early_us"] for r in rows] == [0.0, 1.0, 1.0]
    assert [r["advance_us"] for r in rows] == [2.0, 10.0, 0.0]  # o added nothing to the step's end
    assert [r["dur_us"] for r in rows] == [2.0, 11.0, 0.5]
    assert sum(r["advance_us"] for r in rows) == pytest.approx(12.0)  # the span: 0 to the last end
    assert by_op == {"rms_norm": {"advance_us": 2.0, "dur_us": 2.0, "launches": 1},
                     "linear": {"advance_us": 10.0, "dur_us": 11.5, "launches": 2}}


def test_decode_bytes_by_hand(llama_plan):
    """An untied fp32 llama at batch 4, context 100: the weights but the embedding table, 4 embedding rows,
    and the declared state (K and V of 2 layers x 2 KV heads x 16 dims, fp32) of 400 tokens."""
    llm = rdnac.load(llama_plan)
    assert llm.graph.attrs["dtype"] == "float32"
    assert bytes_per_token(llm.graph.state) == 2 * 2 * 2 * 16 * 4 == 512
    weights = 4 * (LINEAR_PARAMS + HEAD_PARAMS + NORM_PARAMS) + 4 * 72 * 4
    assert decode_bytes(llm, batch=4, context=100) == weights + 4 * 100 * 512 == 676_256


def test_prefill_flops_by_hand(llama_plan):
    """64 tokens: 2 FLOPs per linear weight per token, the logits of the last token, and causal QK^T + PV
    (4 x layers x heads x head_dim x the 64 x 65 / 2 scores)."""
    llm = rdnac.load(llama_plan)
    assert LINEAR_PARAMS == 95_616
    attention = 4 * 2 * 6 * 16 * 64 * 65 // 2
    assert prefill_flops(llm, 64, 64) == 2 * LINEAR_PARAMS * 64 + 2 * HEAD_PARAMS + attention == 13_879_488


def test_kernel_breakdown_node_bytes_by_hand(llama_plan):
    """The per-node bytes of the GPU kernel breakdown: a linear reads its weights; an attention node reads its
    layer's declared K and V state (2 KV heads x 16 dims, fp32) for `context` tokens."""
    llm = rdnac.load(llama_plan)
    attention = next(n for n in llm.graph.nodes if n.op == "attention")
    assert profile._node_bytes(llm, attention, 100) == 100 * 2 * 2 * 16 * 4 == 25_600
    linear = next(n for n in llm.graph.nodes if n.op == "linear")
    assert profile._node_bytes(llm, linear, 100) == sum(
        llm.weights[w].numel() * 4 for w in linear.inputs if w in llm.weights)
