"""The MoE, hybrid and MLA shapes of `rdnac bench` (rdnac.bench.families) on the cpu: the checkpoint writer
against transformers' save_pretrained, the byte accounting of GDN state, sliding windows and MLA's decode
form, the full-depth scaling, and every family shape's whole harness run (`--tiny`: checkpoint, compile,
decode, prefill, transformers beside it) so the GPU run does not fail on a slip."""

from __future__ import annotations

import dataclasses
import glob
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import rdnac
from rdnac.bench.decode import decode_bytes, decode_bytes_by_layer
from rdnac.bench.families import FAMILIES, layer_factors, plan_sizes
from rdnac.bench.harness import BenchConfig, run_harness
from rdnac.cli.main import cli
from rdnac.testing.families import SHAPES, hf_config, tensor_specs, write_random_family_checkpoint

TINY = [name for name in SHAPES if name.endswith("-tiny")]


@pytest.mark.parametrize("shape", TINY)
def test_tensor_specs_are_what_save_pretrained_writes(shape, tmp_path):
    """Names and shapes from the meta-device model, fused experts split, equal save_pretrained's output."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(shape)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path)
    saved = {}
    for path in glob.glob(str(tmp_path / "*.safetensors")):
        with safe_open(path, "pt") as f:
            saved.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    assert {name: s for name, _, s in tensor_specs(cfg)} == saved


def test_real_shapes_have_the_published_widths():
    cfg = hf_config("qwen3.5-27b", layers=4)
    assert cfg.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.linear_num_value_heads, cfg.vocab_size) == (5120, 17408, 48,
                                                                                                     248320)
    v3 = hf_config("deepseek-v3", layers=2)
    assert (v3.first_k_dense_replace, v3.n_routed_experts, v3.hidden_size, v3.q_lora_rank) == (1, 256, 7168, 1536)
    assert hf_config("deepseek-v2-lite").first_k_dense_replace == 1


def test_layer_factors_stand_each_layer_for_the_models_layers_of_its_kind():
    assert layer_factors(FAMILIES["deepseek-v3"], 2) == [3, 58]
    assert layer_factors(FAMILIES["deepseek-v2-lite"], 4) == [1, 26 / 3, 26 / 3, 26 / 3]
    assert layer_factors(FAMILIES["qwen3.5-27b"], 4) == [16] * 4
    assert layer_factors(FAMILIES["gpt-oss-20b"], 4) == [6] * 4
    for name, family in FAMILIES.items():
        assert sum(layer_factors(family, family.layers)) == pytest.approx(family.full_layers), name


def test_family_sizes_are_the_issues_and_tiny_ones_are_smaller():
    cfg = BenchConfig(shapes=("deepseek-v2-lite",))
    assert plan_sizes(cfg, FAMILIES["deepseek-v2-lite"], False) == ((1, 16, 64), (256, 8192), (2048,))
    assert plan_sizes(cfg, FAMILIES["qwen3.5-27b"], False) == ((1, 8, 32), (256,), (2048, 16384))
    assert plan_sizes(cfg, FAMILIES["qwen3-30b-a3b"], False) == ((1, 16, 64), (256,), (2048,))
    assert plan_sizes(cfg, FAMILIES["qwen3.5-27b"], True) == ((1, 8, 32), (8,), (32, 256))
    given = BenchConfig(shapes=("deepseek-v2-lite",), batch=(2,), context=100, prefill=(64,),
                        given=("batch", "context", "prefill"))
    assert plan_sizes(given, FAMILIES["deepseek-v2-lite"], False) == ((2,), (100,), (64,))
    assert plan_sizes(dataclasses.replace(given, given=("context",)), FAMILIES["deepseek-v2-lite"], False) == (
        (1, 16, 64), (100,), (2048,))


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hybrid")
    write_random_family_checkpoint(tmp / "ckpt", "qwen3.5-tiny", device="cpu")
    return rdnac.load(rdnac.compile(tmp / "ckpt", "cpu", tmp / "p.msgpack", quiet=True, max_model_len=512))


def test_gdn_state_is_read_and_written_once_per_sequence(hybrid):
    """Layers 0-2 are GDN (recurrent + conv state per sequence), layer 3 attention (KV per token)."""
    per_seq = {s.layer: 0 for s in hybrid.graph.state}
    per_token = dict(per_seq)
    for s in hybrid.graph.state:
        (per_token if s.is_paged else per_seq)[s.layer] += s.nbytes
    one, other = decode_bytes_by_layer(hybrid, 3, 10), decode_bytes_by_layer(hybrid, 3, 50)
    for layer in range(4):
        assert other[layer] - one[layer] == 3 * 40 * per_token[layer]  # context grows KV only
    weights = decode_bytes_by_layer(hybrid, 3, 0)
    assert per_seq[0] > 0 and per_token[0] == 0 and per_seq[3] == 0 and per_token[3] > 0
    assert decode_bytes_by_layer(hybrid, 5, 0)[0] - weights[0] == 2 * 2 * per_seq[0]  # two more sequences


def test_mla_decode_reads_the_absorbed_form_and_the_latent_cache(tmp_path):
    write_random_family_checkpoint(tmp_path / "ckpt", "deepseek-v2-tiny", device="cpu")
    llm = rdnac.load(rdnac.compile(tmp_path / "ckpt", "cpu", tmp_path / "p.msgpack", quiet=True, max_model_len=512))
    node = next(n for n in llm.graph.nodes if n.op == "mla_attention")
    assert node.attrs["decode_form"] == "absorbed"
    kv_b = llm.weights[node.inputs[6]]
    every = sum(t.numel() * t.element_size() for t in llm.weights.values())
    # batch 4096 reads every expert: all weights but the embedding table (4096 rows of it) and kv_b_proj
    embed = llm.weights["model.embed_tokens.weight"]
    at_large = decode_bytes(llm, 4096, 0)
    size = embed.element_size()
    assert at_large == every - embed.numel() * size + 4096 * embed.shape[1] * size - 2 * kv_b.numel() * size
    latent = sum(s.nbytes for s in llm.graph.state if s.kind == "paged_latent")
    assert latent == 2 * (32 + 8) * size  # 2 layers of kv_lora_rank + rope dims
    assert decode_bytes(llm, 2, 30) - decode_bytes(llm, 2, 0) == 2 * 30 * latent


def test_sliding_layers_read_their_window_only(tmp_path):
    from rdnac.testing.moe import write_random_moe_checkpoint

    write_random_moe_checkpoint(tmp_path / "ckpt", "gpt-oss-tiny", "bf16", layers=2)
    llm = rdnac.load(rdnac.compile(tmp_path / "ckpt", "cpu", tmp_path / "p.msgpack", quiet=True, max_model_len=512))
    kv = {s.layer: 0 for s in llm.graph.state}
    for s in llm.graph.state:
        kv[s.layer] += s.nbytes
    by_layer = {c: decode_bytes_by_layer(llm, 1, c) for c in (100, 128, 300)}
    assert by_layer[300][0] - by_layer[100][0] == 28 * kv[0]  # layer 0 slides over 128 tokens
    assert by_layer[300][1] - by_layer[100][1] == 200 * kv[1]  # layer 1 attends to all


@pytest.mark.parametrize("shape", list(FAMILIES))
def test_harness_runs_every_family_shape_tiny_on_cpu(shape, tmp_path):
    """The GPU run's code path at tiny widths: one JSON line per measurement, rdnac and transformers (batch 2:
    more than one sequence, and their state slots; GPT-OSS at batch 1, for its MXFP4/bf16 ratio)."""
    family = FAMILIES[shape]
    batch = 1 if shape == "gpt-oss-20b" else 2
    run_harness(BenchConfig(out=tmp_path, shapes=(shape,), tiny=True, peers=True, batch=(batch,), given=("batch",)))
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert not [r for r in records if "error" in r]
    _, contexts, prefill = plan_sizes(BenchConfig(batch=(batch,), given=("batch",)), family, True)
    for scheme in family.schemes:
        mine = [r for r in records if r.get("engine") == "rdnac" and r["scheme"] == scheme]
        decode = [r for r in mine if "tpot_ms" in r]
        assert [(r["batch"], r["context"]) for r in decode] == [(batch, c) for c in contexts]
        assert all(r["layers"] == family.tiny_layers and r["full_layers"] == family.full_layers for r in mine)
        assert all(r["full_depth_bytes_GB"] >= r["bytes_read_GB"] and r["tpot_ms"] > 0 for r in decode)
        assert [r["prefill_tokens"] for r in mine if "prefill_ms" in r] == list(prefill)
        peers = [r for r in records if r.get("engine") == "transformers eager" and r["scheme"] == scheme]
        if family.peers:
            steps = [r for r in peers if "tpot_ms" in r]
            assert [(r["batch"], r["context"]) for r in steps] == [(batch, c) for c in contexts]
            assert [r["prefill_tokens"] for r in peers if "prefill_ms" in r] == list(prefill)
            assert [r["bytes_read_GB"] for r in steps] == [d["bytes_read_GB"] for d in decode]  # the same count
        else:
            assert [r["skipped"] for r in peers]
    if shape == "gpt-oss-20b":
        [ratio] = [r for r in records if "mxfp4_over_bf16_tpot_batch1" in r]
        assert ratio["mxfp4_over_bf16_tpot_batch1"] > 0 and ratio["mxfp4_over_bf16_tpot_batch1_full_depth_est"] > 0
        assert any("MXFP4 experts dequantized to bf16 on load" in r.get("note", "") for r in records)
    if shape.startswith("qwen3.5"):
        assert any("GDN: transformers' torch fallback" in r.get("note", "") for r in records)


@pytest.mark.parametrize("args,message", [
    (["--shape", "qwen3-8b", "--tiny"], "--tiny requires family shapes"),
    (["--shape", "qwen3-8b", "--scheme", "mxfp4"], "--scheme mxfp4 requires a MoE shape"),
    (["--shape", "deepseek-v3", "--scheme", "bf16"], "--shape deepseek-v3 requires --scheme fp8-block"),
    (["--shape", "qwen3.6-27b"], "requires one of"),
])
def test_family_options_are_checked_before_anything_runs(args, message, tmp_path):
    result = CliRunner().invoke(cli, ["bench", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_kernel_breakdown_bytes_of_gdn_moe_and_mla_nodes(hybrid, tmp_path):
    """The GPU breakdown's per-node bytes: a GDN node's per-sequence state read and written, the routed
    experts a step's tokens read, MLA's latent cache of `context` tokens plus kv_b_proj's decode form."""
    from rdnac.bench import profile

    gdn = next(n for n in hybrid.graph.nodes if n.op == "gated_delta_rule")
    state = next(s for s in hybrid.graph.state if s.kind == "recurrent" and s.name in gdn.inputs)
    assert profile._node_bytes(hybrid, gdn, 100, sequences=3) == 2 * 3 * state.nbytes

    write_random_family_checkpoint(tmp_path / "ckpt", "deepseek-v2-tiny", device="cpu")
    llm = rdnac.load(rdnac.compile(tmp_path / "ckpt", "cpu", tmp_path / "p.msgpack", quiet=True, max_model_len=512))
    w = llm.weights
    experts = next(n for n in llm.graph.nodes if n.op == "moe_experts")
    every = sum(w[n].numel() * w[n].element_size() for n in experts.inputs[3:] if n in w)
    assert profile._node_bytes(llm, experts, 100) == every * 2 // 8  # top-2 of 8 at one token
    assert profile._node_bytes(llm, experts, 100, tokens=4096) == every
    mla = next(n for n in llm.graph.nodes if n.op == "mla_attention")
    latent = next(s for s in llm.graph.state if s.name in mla.inputs)
    w_uk, w_uv = (w[n] for n in mla.inputs[7:9])
    form = (w_uk.numel() + w_uv.numel()) * w_uk.element_size()
    assert profile._node_bytes(llm, mla, 100) == 100 * latent.nbytes + form
