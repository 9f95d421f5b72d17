"""merge_linears: q/k/v and gate/up linears reading one input become one GEMM (plus a `split` of views).

Merged and unmerged plans must agree: exactly on cpu (float32 reference interpreter, FP8 bits
unchanged), and within bf16 rounding for an sm90 plan run under the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch

import rdnac
from rdnac.compiler.frontend import build_graph, read_checkpoint
from rdnac.compiler.passes import CompileState, merge_linears
from rdnac.ir import interpreter
from rdnac.ir.verify import verify
from rdnac.testing.fp8 import write_fp8_checkpoint
from tests.support.checkpoints import make_checkpoint

IDS = [1, 2, 3, 4, 5, 6, 7, 9, 11]
OFF = ("merge_linears",)


def _per_layer_linears(graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if n.op in ("linear", "linear_fp8", "linear_gated_act"):  # gate_up with its activation fused
            leaf = n.name.rsplit(".", 1)[1]
            counts[leaf] = counts.get(leaf, 0) + 1
    return counts


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    for family in ("llama", "qwen2", "qwen3"):
        make_checkpoint(family, root / family, with_tokenizer=True)
    return root


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_merged_plan_matches_unmerged(family, checkpoints, tmp_path):
    ckpt = checkpoints / family
    merged = rdnac.load(rdnac.compile(ckpt, output=tmp_path / "m.msgpack"))
    plain = rdnac.load(rdnac.compile(ckpt, output=tmp_path / "p.msgpack", disable_passes=OFF))
    layers = merged.graph.attrs["num_layers"]
    assert _per_layer_linears(merged.graph) == {"qkv_proj": layers, "o_proj": layers, "gate_up_proj": layers,
                                                "down_proj": layers}
    assert merged.graph.op_counts()["split"] == layers  # qkv only: gate_up feeds gated_act directly
    assert "split" not in plain.graph.op_counts() and plain.graph.op_counts()["linear"] == 7 * layers
    # the merged gate_up GEMM and its gated_act then fuse (fuse_gated_linear); unmerged, they cannot
    assert "gated_act" not in merged.graph.op_counts() and plain.graph.op_counts()["gated_act"] == layers
    fused = [n for n in merged.graph.nodes if n.op == "linear_gated_act"]
    assert len(fused) == layers and all(n.inputs[1].endswith("gate_up_proj.weight") for n in fused)
    weights = merged.graph.weights
    qkv = weights["model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv.shape == ((6 + 2 * 2) * 16, 72)
    assert "q_proj" in qkv.source and "k_proj" in qkv.source and "v_proj" in qkv.source
    assert weights["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 136, 72)
    assert not any(k.endswith(("q_proj.weight", "k_proj.weight", "gate_proj.weight")) for k in weights)
    assert ("model.layers.0.self_attn.qkv_proj.bias" in weights) == (family == "qwen2")
    decisions = [d for d in merged.plan.body["decisions"] if d["pass"] == "merge_linears"]
    assert len(decisions) == 2 * layers and all(d["action"].startswith("merged") for d in decisions)
    assert (merged.logits(IDS) - plain.logits(IDS)).abs().max() <= 1e-5


def test_pass_output_verifies_and_matches_interpreter(checkpoints):
    graph, weights, _ = build_graph(read_checkpoint(checkpoints / "qwen3"), "float32")
    before = {k: v.clone() for k, v in weights.items()}
    import copy

    original = copy.deepcopy(graph)
    state = CompileState(graph, weights, "cpu")
    merge_linears.run(state)
    merged = state.graph
    verify(merged)
    assert set(weights) == set(merged.weights)
    inputs = _inputs(merged, len(IDS))
    ref_inputs = _inputs(original, len(IDS))
    ours = interpreter.run(merged, weights, inputs)["logits"]
    ref = interpreter.run(original, before, ref_inputs)["logits"]
    assert (ours - ref).abs().max() <= 1e-5


def _inputs(graph, num_tokens: int) -> dict[str, torch.Tensor]:
    block = 16
    blocks = -(-num_tokens // block)
    out = {"token_ids": torch.tensor(IDS[:num_tokens]), "positions": torch.arange(num_tokens),
           "slot_mapping": torch.arange(num_tokens), "block_tables": torch.arange(blocks, dtype=torch.int32)[None],
           "seq_lens": torch.tensor([num_tokens], dtype=torch.int32),
           "cu_seqlens_q": torch.tensor([0, num_tokens], dtype=torch.int32),
           "logits_indices": torch.arange(num_tokens)}
    for name, spec in graph.inputs.items():
        if name.startswith(("k_cache", "v_cache")):
            out[name] = torch.zeros(blocks, block, *spec.shape[2:], dtype=getattr(torch, spec.dtype))
    return out


def test_split_verify_rejects_bad_sizes():
    from rdnac.errors import GraphError
    from rdnac.ir.graph import Graph, Node, TensorSpec

    g = Graph({"x": TensorSpec("float32", ("T", 10))}, {}, [Node("s", "split", ["x"], ["a", "b"], {"sizes": [4, 5]})],
              ["a"])
    with pytest.raises(GraphError, match="must sum"):
        verify(g)
    g.nodes[0].attrs["sizes"] = [4, 6]
    verify(g)


def test_fp8_per_tensor_merges_into_per_channel(checkpoints, tmp_path):
    write_fp8_checkpoint(checkpoints / "llama", tmp_path / "fp8", "fp8-tensor", seed=1)
    merged = rdnac.load(rdnac.compile(tmp_path / "fp8", output=tmp_path / "m.msgpack"))
    plain = rdnac.load(rdnac.compile(tmp_path / "fp8", output=tmp_path / "p.msgpack", disable_passes=OFF))
    fp8 = [n for n in merged.graph.nodes if n.op == "linear_fp8"]
    merged_nodes = [n for n in fp8 if n.name.endswith(("qkv_proj", "gate_up_proj"))]
    assert len(merged_nodes) == 4 and len(fp8) == 8
    assert all(n.attrs["weight_scheme"] == "channel" for n in merged_nodes)
    scale = merged.weights["model.layers.0.self_attn.qkv_proj.weight_scale"]
    assert scale.shape == ((6 + 2 * 2) * 16,) and scale.unique().numel() == 3  # one value per part
    assert (merged.logits(IDS) - plain.logits(IDS)).abs().max() <= 1e-5


def test_fp8_static_input_scales_must_agree(checkpoints, tmp_path):
    p = "model.layers.{}.{}.weight"
    scales = {}
    for i in range(2):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            scales[p.format(i, m)] = 0.05
    scales[p.format(0, "self_attn.k_proj")] = 0.07  # layer 0's q/k/v disagree: kept separate
    write_fp8_checkpoint(checkpoints / "llama", tmp_path / "fp8", "fp8-tensor", seed=2, input_scales=scales)
    merged = rdnac.load(rdnac.compile(tmp_path / "fp8", output=tmp_path / "m.msgpack"))
    plain = rdnac.load(rdnac.compile(tmp_path / "fp8", output=tmp_path / "p.msgpack", disable_passes=OFF))
    counts = _per_layer_linears(merged.graph)
    assert counts["qkv_proj"] == 1 and counts["q_proj"] == 1 and counts["gate_up_proj"] == 2
    assert all(n.attrs["act_scheme"] == "static" for n in merged.graph.nodes if n.op == "linear_fp8")
    skipped = [d for d in merged.plan.body["decisions"]
               if d["pass"] == "merge_linears" and d["action"] == "kept separate"]
    assert len(skipped) == 1 and "static input scales differ" in skipped[0]["reason"]
    assert (merged.logits(IDS) - plain.logits(IDS)).abs().max() <= 1e-5


def test_sm90_merged_plan_runs_under_interpreter(checkpoints, tmp_path):
    opts = dict(quiet=True, max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16)
    merged = rdnac.load(rdnac.compile(checkpoints / "llama", "sm90", tmp_path / "m.msgpack", **opts),
                        interpret=True)
    plain = rdnac.load(rdnac.compile(checkpoints / "llama", "sm90", tmp_path / "p.msgpack", disable_passes=OFF,
                                     **opts), interpret=True)
    assert merged.graph.op_counts()["split"] == 2 and "split" not in merged.plan.body["program"]
    assert not any(n in merged.plan.body["program"] for n in (x.name for x in merged.graph.nodes if x.op == "split"))
    ours, ref = merged.logits(IDS).float(), plain.logits(IDS).float()
    cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min().item()
    assert cosine > 0.999, cosine
