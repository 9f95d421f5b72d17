"""compile -> run -> inspect round trip through the CLI."""

from __future__ import annotations

import json

from click.testing import CliRunner

import rdnac
from rdnac import SamplingParams
from rdnac.cli.main import cli
from tests.support.checkpoints import make_checkpoint


def test_compile_run_inspect_round_trip(tmp_path):
    make_checkpoint("qwen3", tmp_path / "ckpt")
    plan = tmp_path / "q.msgpack"
    runner = CliRunner()
    result = runner.invoke(cli, ["compile", str(tmp_path / "ckpt"), "--target", "cpu", "-o", str(plan)])
    assert result.exit_code == 0, result.output
    assert plan.exists() and (tmp_path / "q.weights.safetensors").exists()

    result = runner.invoke(cli, ["inspect", str(plan), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["header"]["target"] == "cpu"
    assert summary["model"]["architecture"] == "Qwen3ForCausalLM"
    assert summary["graph"]["ops"]["attention"] == 2
    assert summary["graph"]["ops"]["rms_norm"] == 5  # 2 per layer + final, adds fused in
    assert "add" not in summary["graph"]["ops"]
    assert summary["weights"]["bytes"] > 0
    state = summary["state"]  # the K and V of each of the 2 layers, as declared, and its budget
    assert [(e["name"], e["kind"]) for e in state["entries"]] == \
        [(f"{kv}_cache.{i}", "paged_kv") for i in range(2) for kv in "kv"]
    assert state["bytes_per_token"] == sum(e["bytes"] for e in state["entries"]) > 0

    result = runner.invoke(cli, ["inspect", str(plan), "--decisions"])
    assert result.exit_code == 0 and "fuse_add_rms_norm" in result.output

    engine = rdnac.load(plan)
    expected = engine.generate("Hello there", SamplingParams(max_tokens=8), chat=True)[0].text
    result = runner.invoke(cli, ["run", str(plan), "--chat", "Hello there", "--max-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == expected


def test_seeded_sampling_is_reproducible(tmp_path):
    make_checkpoint("llama", tmp_path / "ckpt")
    engine = rdnac.load(rdnac.compile(tmp_path / "ckpt", output=tmp_path / "l.msgpack"))
    a = engine.generate(["abc"], SamplingParams(max_tokens=12, temperature=1.0, seed=7))[0].token_ids
    b = engine.generate(["abc"], SamplingParams(max_tokens=12, temperature=1.0, seed=7))[0].token_ids
    c = engine.generate(["abc"], SamplingParams(max_tokens=12, temperature=1.0, seed=8))[0].token_ids
    assert a == b and a != c


def test_fuse_pass_on_and_off_agree(tmp_path):
    make_checkpoint("llama", tmp_path / "ckpt")
    fused = rdnac.load(rdnac.compile(tmp_path / "ckpt", output=tmp_path / "a.msgpack"))
    plain = rdnac.load(rdnac.compile(tmp_path / "ckpt", output=tmp_path / "b.msgpack",
                                     disable_passes=("fuse_add_rms_norm",)))
    assert "add" in plain.graph.op_counts() and "add" not in fused.graph.op_counts()
    ids = [1, 2, 3, 4, 5, 6]
    assert (fused.logits(ids) - plain.logits(ids)).abs().max() <= 1e-5


def test_interactive_multi_turn_chat(tmp_path):
    """`rdnac run PLAN --chat` alone: each turn re-renders the whole conversation."""
    make_checkpoint("llama", tmp_path / "ckpt")
    plan = rdnac.compile(tmp_path / "ckpt", output=tmp_path / "l.msgpack")
    engine = rdnac.load(plan)
    first = engine.generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_tokens=4))[0].text
    second = engine.generate([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
                               {"role": "user", "content": "more"}]], SamplingParams(max_tokens=4))[0].text
    result = CliRunner().invoke(cli, ["run", str(plan), "--chat", "--max-tokens", "4"], input="hi\nmore\n\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:2] == [first, second]


def test_bench_reports_levels_as_json(tmp_path):
    make_checkpoint("llama", tmp_path / "ckpt")
    plan = rdnac.compile(tmp_path / "ckpt", output=tmp_path / "l.msgpack")
    walls = {1: [], 4: []}
    for _ in range(3):  # each level takes ~0.1 s here: one stall of the shared CI machine can flip a single run
        result = CliRunner().invoke(cli, ["bench", str(plan), "-c", "1", "-c", "4", "--input-len", "8",
                                          "--output-len", "6", "--num-prompts", "6", "--json"])
        assert result.exit_code == 0, result.output
        levels = json.loads(result.stdout)
        assert [r["concurrency"] for r in levels] == [1, 4]
        for r in levels:
            assert r["num_prompts"] == 6 and r["output_tokens_per_s"] > 0
            assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p99"] and r["tpot_s"]["p50"] > 0
            walls[r["concurrency"]].append(r["wall_s"])
    # four requests in flight finish the same work in less wall time than one at a time (best of three)
    assert min(walls[4]) < min(walls[1]), walls


def test_targets_lists_every_target_with_probed_capabilities():
    result = CliRunner().invoke(cli, ["targets"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in ("gfx1201", "gfx1151", "gfx942", "gfx950", "sm90", "cpu"):
        assert name in result.output
    assert "v_wmma_f32_16x16x16_bf16" in result.output and "e4m3fnuz" in result.output
