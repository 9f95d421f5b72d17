"""The byte and FLOP accounting behind BENCHMARKS.md's bandwidth and TFLOP/s figures (bench/harness.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import rdnac
from tests.support.checkpoints import make_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import harness  # noqa: E402


@pytest.mark.parametrize("tied", [False, True])
def test_decode_bytes_count_what_a_step_reads(tied, tmp_path):
    make_checkpoint("llama", tmp_path / "ckpt", tie_word_embeddings=tied)
    engine = rdnac.load(rdnac.compile(tmp_path / "ckpt", "cpu", tmp_path / "p.msgpack", quiet=True))
    w = engine.weights
    embed = next(n.inputs[1] for n in engine.graph.nodes if n.op == "embedding")
    every = sum(t.numel() * t.element_size() for t in w.values())
    row = w[embed].shape[1] * w[embed].element_size()
    a = engine.graph.attrs
    kv_per_token = 2 * a["num_layers"] * a["num_kv_heads"] * a["head_dim"] * engine._dtype.itemsize
    got = harness.decode_bytes(engine, batch=4, context=100)
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
    assert harness.matmul_flops(engine, t, t) == pytest.approx(2 * linear * t + 2 * head + attention)
