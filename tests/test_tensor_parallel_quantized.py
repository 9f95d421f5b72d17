"""Tensor parallelism of 8-bit linears on cpu with gloo: FP8 (per-tensor, per-channel, block 128x128) and INT8
(per-channel) plans at tp=2 against the same plan at tp=1.

- Block-scaled FP8 (`--quantize fp8-block`): every split falls on the 128x128 scale blocks and the activations'
  128-column groups, so each rank quantizes exactly the columns one rank does: logits within 1e-5 (the
  all-reduce's order of addition; relative to the logits' size for the decisive checkpoint's, which reach a
  few hundred), the same greedy tokens.
- Per-token activation scales (`--quantize fp8`: per-channel weights; `--quantize int8`; an fp8-tensor
  checkpoint's dynamic activations): a row-parallel rank (o_proj, down_proj) quantizes its slice of the row
  with the slice's amax, which one rank takes over the whole row. The tolerance: tp=2's distance to the
  unquantized plan is at most twice tp=1's (the sharded plan quantizes as finely as one rank, its rounding
  falls elsewhere; a wrong scale slice would be off by far more); greedy tokens identical on decisive
  weights (`rdnac.testing.fp8.write_random_checkpoint(decisive=True)`), whose margins that rounding cannot
  flip. Qwen3.5 (GDN and gated attention) the same way, through gated_rms_norm_quant and
  sigmoid_gate_quant.
- A block-scaled weight whose split would cut a scale block is refused with one line; a sharded FP8 block
  plan cross-compiles for gfx942.
"""

from __future__ import annotations

import pytest
import torch

import rdnac
from rdnac import SamplingParams
from rdnac.errors import UnsupportedModelError
from rdnac.plans import read_plan
from rdnac.testing.fp8 import write_random_checkpoint
from tests.support.checkpoints import make_checkpoint

PROMPT = [3, 141, 59, 26, 53, 58, 97, 93, 238, 46, 26, 43, 38, 32, 79, 50, 28, 8, 84, 19]
PROMPTS = [PROMPT, PROMPT[:5], [7, 299, 12]]
MAX_TOKENS = [8, 6, 5]
# 4 query heads and 2 KV heads of 128: a rank's q, k and v rows are whole 128-row blocks; I = 256: 128 each
DENSE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=128, intermediate_size=256,
             vocab_size=302, num_hidden_layers=2, tie_word_embeddings=True)


def _run(plan) -> tuple[torch.Tensor, list[list[int]]]:
    llm = rdnac.load(plan)
    try:
        outs = llm.generate(PROMPTS, [SamplingParams(max_tokens=n) for n in MAX_TOKENS])
        return llm.logits(PROMPT), [o.token_ids for o in outs]
    finally:
        if read_plan(plan).num_ranks > 1:
            llm.close()


def _within_quantization_error(one, two, unquantized) -> None:
    err_one, err_two = ((x - unquantized).abs().max().item() for x in (one, two))
    assert not torch.equal(one, unquantized) and err_two <= 2 * err_one, \
        f"tp=2 vs unquantized {err_two:.3g}; tp=1 vs unquantized {err_one:.3g}"


def _plans(root, ckpt, **options):
    return {tp: rdnac.compile(ckpt, target="cpu", output=root / f"tp{tp}.msgpack", quiet=True, tp=tp, **options)
            for tp in (1, 2)}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_q8")
    make_checkpoint("qwen3", root / "ckpt", **DENSE)
    unquantized = _run(rdnac.compile(root / "ckpt", target="cpu", output=root / "float.msgpack", quiet=True))
    return root, unquantized


def test_fp8_block_matches_one_rank(dense, tmp_path):
    root, _ = dense
    plans = _plans(tmp_path, root / "ckpt", quantize="fp8-block")
    (one, tokens), (two, tokens2) = _run(plans[1]), _run(plans[2])
    err = (two - one).abs().max().item()
    assert err <= 1e-5, f"max logits error {err:.3g}"
    assert tokens2 == tokens
    plan = read_plan(plans[2])
    graph, w0, w1 = plan.graph(), plan.load_weights(rank=0), plan.load_weights(rank=1)
    full = read_plan(plans[1]).load_weights()
    qkv, o, gate_up, down = (f"model.layers.0.{m}.weight_scale" for m in
                             ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"))
    # qkv: blocks [q0 q1 q2 q3 | k0 k1 | v0 v1]; rank 1 keeps q2 q3, k1, v1
    assert torch.equal(w1[qkv], full[qkv][[2, 3, 5, 7]]) and torch.equal(w0[qkv], full[qkv][[0, 1, 4, 6]])
    assert torch.equal(w1[o], full[o][:, 2:]) and w1[o].shape == (1, 2)  # K blocks of the rank's heads
    assert torch.equal(w1[gate_up], full[gate_up][[1, 3]]) and torch.equal(w1[down], full[down][:, 1:])
    assert {n.attrs["group"] for n in graph.nodes if n.op == "attention_quant"} == {128}
    assert graph.op_counts()["all_reduce"] == 1 + 2 * DENSE["num_hidden_layers"]


@pytest.mark.parametrize("quantize", ["fp8", "int8"])
def test_per_token_scales_within_quantization_error(dense, tmp_path, quantize):
    root, (unquantized, _) = dense
    plans = _plans(tmp_path, root / "ckpt", quantize=quantize)
    (one, _), (two, _) = _run(plans[1]), _run(plans[2])
    _within_quantization_error(one, two, unquantized)
    plan, full = read_plan(plans[2]), read_plan(plans[1]).load_weights()
    w1, qkv = plan.load_weights(rank=1), "model.layers.0.self_attn.qkv_proj.weight_scale"
    rows = [*range(256, 512), *range(640, 768), *range(896, 1024)]  # per-channel: the rank's q, k, v rows
    assert torch.equal(w1[qkv], full[qkv][rows])
    o = "model.layers.0.self_attn.o_proj.weight_scale"
    assert torch.equal(w1[o], full[o])  # row-parallel: every output channel on every rank
    said = {d["node"] for d in plan.body["decisions"] if d["action"].startswith("per-token activation scales")}
    assert said == {f"layers.{i}.{m}" for i in range(2) for m in ("o_proj", "down_proj")}


@pytest.mark.parametrize("scheme, quantize", [("fp8-tensor", None), ("fp8-block", None), (None, "int8")],
                         ids=["fp8-tensor", "fp8-block", "int8"])
def test_decisive_greedy_tokens_match_one_rank(tmp_path, scheme, quantize):
    write_random_checkpoint(tmp_path / "ckpt", hidden=256, layers=2, heads=4, kv_heads=2, head_dim=128,
                            intermediate=256, vocab=302, scheme=scheme, decisive=True)
    plans = _plans(tmp_path, tmp_path / "ckpt", **({"quantize": quantize} if quantize else {}))
    (one, tokens), (two, tokens2) = _run(plans[1]), _run(plans[2])
    assert tokens2 == tokens
    if scheme == "fp8-tensor":  # o_proj, down_proj keep per-tensor scales: the same [1] on every rank (the
        # merged qkv / gate_up hold their parts' per-tensor scales as per-channel ones, sliced with the rows)
        plan, full = read_plan(plans[2]), read_plan(plans[1]).load_weights()
        w1, nodes = plan.load_weights(rank=1), [n for n in plan.graph().nodes if n.op == "linear_fp8"]
        tensor = [n.inputs[2] for n in nodes if n.attrs["weight_scheme"] == "tensor"]
        assert len(tensor) == 4 and all(w1[k].shape == (1,) and torch.equal(w1[k], full[k]) for k in tensor)
        gate_up = "model.layers.0.mlp.gate_up_proj.weight_scale"
        assert torch.equal(w1[gate_up], full[gate_up][[*range(128, 256), *range(384, 512)]])
    if scheme == "fp8-block":  # decisive logits reach a few hundred: 1e-5 of their size (float32 sum order)
        err, size = (two - one).abs().max().item(), one.abs().max().item()
        assert err <= 1e-5 * max(1.0, size), f"max logits error {err:.3g} (logits up to {size:.3g})"


def test_block_split_off_the_scale_blocks_is_refused(tmp_path):
    """KV heads of 64 rows: a rank's k rows are half a 128-row scale block."""
    make_checkpoint("qwen3", tmp_path / "ckpt", **{**DENSE, "head_dim": 64})
    with pytest.raises(UnsupportedModelError, match=r"whole 128-row blocks.*choose a --tp") as e:
        rdnac.compile(tmp_path / "ckpt", target="cpu", output=tmp_path / "x.msgpack", quiet=True, tp=2,
                      quantize="fp8-block")
    assert "\n" not in str(e.value)


def test_fp8_block_plan_cross_compiles_for_gfx942(tmp_path):
    """The gfx942 plan fuses down_proj with its activation (gated_act_linear_fp8, group-128 FP8 of the
    rank's I/2 columns): the ranks' partial sums of its reference add up to the tp=1 node's (in float32, within
    1e-5 of its size: the same quantized products, summed in another order)."""
    from rdnac.ir.ops import OPS

    write_random_checkpoint(tmp_path / "ckpt", hidden=256, layers=1, heads=4, kv_heads=2, head_dim=128,
                            intermediate=256, vocab=302, scheme="fp8-block", decisive=True)
    plans = [read_plan(rdnac.compile(tmp_path / "ckpt", target="gfx942", output=tmp_path / f"tp{tp}.msgpack",
                                     quiet=True, tp=tp, max_num_seqs=4, max_num_batched_tokens=32,
                                     max_model_len=128)) for tp in (1, 2)]
    plan = plans[1]
    graph, program = plan.graph(), plan.body["program"]
    assert plan.num_ranks == 2 and plan.header["target"] == "gfx942"
    assert {"linear_fp8", "gated_act_linear_fp8", "attention_quant", "all_reduce"} <= set(graph.op_counts())
    for node in graph.nodes:
        if node.op != "split":
            keys = program[node.name]
            assert keys and all(c["kernel"] for c in keys.values()), node.name
    down, = (n for n in plans[0].graph().nodes if n.op == "gated_act_linear_fp8")
    full, ranks = plans[0].load_weights(), [plan.load_weights(rank=r) for r in range(2)]
    gate_up = torch.randn(3, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ref, attrs = OPS[down.op].reference, {**down.attrs, "out_dtype": "float32"}  # the sums before bf16 rounding
    whole = ref(gate_up, *(full[w] for w in down.inputs[1:]), **attrs)
    halves = [ref(gate_up[:, [*range(r * 128, (r + 1) * 128), *range(256 + r * 128, 256 + (r + 1) * 128)]],
                  *(ranks[r][w] for w in down.inputs[1:]), **attrs) for r in range(2)]
    torch.testing.assert_close(halves[0] + halves[1], whole, atol=1e-5 * whole.abs().max().item(), rtol=0)


@pytest.mark.parametrize("quantize", ["fp8", "int8"])
def test_qwen3_5_fused_quant_producers(tmp_path, quantize):
    """GDN heads (gated_rms_norm_quant feeding out_proj) and gated attention (sigmoid_gate_quant feeding
    o_proj) split by head: each quantizes its rank's heads per token, within the quantization error."""
    make_checkpoint("qwen3_5_text", tmp_path / "ckpt", hidden_size=44, intermediate_size=68, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300,
                    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=12,
                    linear_value_head_dim=10, layer_types=["linear_attention", "full_attention", "linear_attention"])
    unquantized = rdnac.load(rdnac.compile(tmp_path / "ckpt", target="cpu", output=tmp_path / "float.msgpack",
                                           quiet=True)).logits(PROMPT)
    plans = _plans(tmp_path, tmp_path / "ckpt", quantize=quantize)
    (one, _), (two, _) = _run(plans[1]), _run(plans[2])
    _within_quantization_error(one, two, unquantized)
    nodes = read_plan(plans[2]).graph().nodes
    fused = {n.op: n for n in nodes if n.op in ("gated_rms_norm_quant", "sigmoid_gate_quant")}
    assert set(fused) == {"gated_rms_norm_quant", "sigmoid_gate_quant"}
    assert fused["gated_rms_norm_quant"].attrs["num_heads"] == 2  # 4 GDN value heads over 2 ranks
