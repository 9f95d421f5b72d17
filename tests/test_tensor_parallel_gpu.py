"""Tensor-parallel GPU plans: cross-compiled for the AMD targets, their collectives through the plan's kernels
(torch.distributed on the plan's group), and, with two GPUs, over NCCL inside the captured decode graphs.

- Sharded plans (dense GQA, DeepSeek MLA with MoE, Qwen3.5 GDN, MXFP4 experts; MoE with --ep for gfx942 and
  gfx1201) build for the AMD targets as single-rank plans do: every node has a kernel per step key, the
  collectives the `collective` family's wrappers.
- The dry run of the GPU test on this machine: the sm90 plans under --interpret, their ranks over gloo; and
  the MLA and GDN kernels at a rank's head counts, and the fused MoE kernels over a rank's experts (--ep, Qwen3-MoE
  and GPT-OSS MXFP4), the same way, in float32 (within 1e-5 of tp=1).
- `-m gpu` (two GPUs or more, else skipped): the same sm90 plans on cuda with graphs on, ranks over NCCL.

The reference is the tp=1 plan of the same target: greedy tokens identical on a decisive checkpoint
(`rdnac.testing.fp8`'s, whose predictions have wide margins, so bf16 rounding of the partial sums cannot flip
them), logits within bf16 rounding (the row-parallel partial sums are rounded to bf16 before their sum).
"""

from __future__ import annotations

import gc

import pytest
import torch

import rdnac
from rdnac import SamplingParams
from rdnac.plans import read_plan
from rdnac.testing.fp8 import write_random_checkpoint
from tests.support.checkpoints import make_checkpoint

PROMPTS = [[3, 141, 59, 26, 53, 58, 97, 93], [7, 200, 12], [44, 45]]
MAX_TOKENS = [6, 4, 5]
LIMITS = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128)


def _compile(ckpt, out, target, tp=1, **options):
    return rdnac.compile(ckpt, target=target, output=out, quiet=True, tp=tp, **LIMITS, **options)


# ---------------------------------------------------------------- cross-compiled for the AMD targets


def _deepseek(directory):
    from tests.test_deepseek import make_deepseek

    make_deepseek(directory, "deepseek_v3", q_lora_rank=22, n_group=4, topk_group=2, norm_topk_prob=True,
                  routed_scaling_factor=2.5, hidden_size=48, num_attention_heads=4, num_key_value_heads=4,
                  moe_intermediate_size=14)


def _qwen3_5(directory):
    make_checkpoint("qwen3_5_text", directory, hidden_size=44, intermediate_size=68, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300,
                    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=12,
                    linear_value_head_dim=10, layer_types=["linear_attention", "full_attention", "linear_attention"])


def _mxfp4_moe(directory):
    from tests.test_qwen3_moe import make_qwen3_moe
    from tests.test_tensor_parallel import MXFP4_MOE

    make_qwen3_moe(directory, **MXFP4_MOE)


def _dense(directory):
    write_random_checkpoint(directory, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                            vocab=302, decisive=True)


def _moe(directory):
    from tests.test_qwen3_moe import make_qwen3_moe

    make_qwen3_moe(directory, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=22, norm_topk_prob=True,
                   mlp_only_layers=[1])


@pytest.mark.parametrize("model, target, ep", [(_dense, "gfx942", False), (_deepseek, "gfx950", False),
                                               (_qwen3_5, "gfx942", False), (_mxfp4_moe, "gfx950", False),
                                               (_mxfp4_moe, "gfx942", True), (_moe, "gfx1201", True)],
                         ids=["dense-gfx942", "deepseek-v3-gfx950", "qwen3_5-gfx942", "mxfp4-moe-gfx950",
                              "mxfp4-moe-ep-gfx942", "moe-ep-gfx1201"])
def test_sharded_plans_cross_compile_for_amd_targets(tmp_path, model, target, ep):
    """--ep too: each rank's experts whole, the fused MoE kernels over the rank's local ids (a plan builds only
    when every kernel fits the target's LDS and spills nothing: `build.check_resources`)."""
    model(tmp_path / "ckpt")
    options = {"quantize": "mxfp4"} if model is _mxfp4_moe else {}
    plan = read_plan(_compile(tmp_path / "ckpt", tmp_path / "tp2.msgpack", target, tp=2, ep=ep, **options))
    graph, program = plan.graph(), plan.body["program"]
    assert plan.num_ranks == 2 and plan.header["target"] == target and plan.body["kernels"]
    assert plan.header["mesh"]["ep"] is ep
    if ep:  # the experts' weights hold the rank's half of them; their ids come from shard_ids
        experts = [n for n in graph.nodes if n.op in ("moe_experts", "moe_experts_mxfp4")]
        producers = {out: n for n in graph.nodes for out in n.outputs}
        assert experts and all(producers[n.inputs[2]].op == "shard_ids" for n in experts)
        assert all(graph.weights[n.inputs[3]].shape[0] == (4 if model is _moe else 2) for n in experts)
        assert all({c["kernel"].split(".")[0] for c in program[n.name].values()} == {"moe"} for n in experts)
    collectives = [n for n in graph.nodes if n.op in ("all_reduce", "all_gather", "shard_ids")]
    assert {n.op for n in collectives} == {"all_reduce", "all_gather", "shard_ids"}
    for node in graph.nodes:
        if node.op == "split":
            continue
        keys = program[node.name]
        assert keys and all(c["kernel"] for c in keys.values()), node.name
        if node in collectives:
            assert {c["kernel"] for c in keys.values()} == {f"collective.{node.op}"}
    heads = [n.attrs.get("num_heads") or n.attrs.get("num_v_heads") for n in graph.nodes
             if n.op in ("attention", "mla_attention", "gated_delta_rule")]
    assert heads and all(h == 2 for h in heads), heads  # every mixer runs its rank's half of the heads


# ---------------------------------------------------------------- sm90 plans: interpreted (gloo), on GPUs (NCCL)


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_sm90")
    _dense(root / "ckpt")
    return {tp: _compile(root / "ckpt", root / f"tp{tp}.msgpack", "sm90", tp) for tp in (1, 2)}


def _run(plan, *, prompts=PROMPTS, max_tokens=MAX_TOKENS, num_blocks: int = 64,
         **load) -> tuple[torch.Tensor, list[list[int]], bool]:
    """(logits of the first prompt, the prompts' greedy tokens run together, whether decode graphs were
    captured); the LLM is gone after it (a few KV blocks: two plans share GPU 0 one after the other)."""
    llm = rdnac.load(plan, num_blocks=num_blocks, **load)
    try:
        logits = llm.logits(prompts[0]).float().cpu()
        outs = llm.generate(prompts, [SamplingParams(max_tokens=n) for n in max_tokens])
        graphs = llm.runner.graphs is not None and bool(llm.runner.graphs.buckets)
        return logits, [o.token_ids for o in outs], graphs
    finally:
        llm.close()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _check(sm90, **load) -> None:
    ref_logits, ref_tokens, _ = _run(sm90[1], **load)
    logits, tokens, graphs = _run(sm90[2], **load)
    assert tokens == ref_tokens
    err = (logits - ref_logits).abs().max().item()
    assert err <= 2e-2 * ref_logits.abs().max().item(), f"max logits error {err:.3g}"
    if load.get("device") == "cuda":
        assert graphs, "decode graphs were not captured"


def test_sm90_plan_interpreted_over_gloo(sm90):
    """The GPU test's dry run: the same plans' kernels (and collective wrappers) under the Triton interpreter,
    rank 1 a process of its own."""
    _check(sm90, interpret=True)


@pytest.mark.parametrize("model", [_deepseek, _qwen3_5], ids=["deepseek-v3", "qwen3_5"])
def test_sm90_mla_and_gdn_plans_interpreted_over_gloo(tmp_path, model):
    """The MLA (absorbed, both phases) and GDN kernels at a rank's head counts, in float32 so the comparison is
    exact: logits within 1e-5 of the tp=1 plan of the same target."""
    model(tmp_path / "ckpt")
    logits = []
    for tp in (1, 2):
        plan = rdnac.compile(tmp_path / "ckpt", target="sm90", output=tmp_path / f"tp{tp}.msgpack", quiet=True,
                             tp=tp, dtype="float32", **LIMITS)
        llm = rdnac.load(plan, interpret=True, num_blocks=16)
        try:
            logits.append(llm.logits(PROMPTS[0]))
        finally:
            llm.close()
    err = (logits[1] - logits[0]).abs().max().item()
    assert err <= 1e-5, f"max logits error {err:.3g}"


EP_MODELS = pytest.mark.parametrize("shape, scheme", [("qwen3-moe-tiny", "bf16"), ("gpt-oss-tiny", "mxfp4")],
                                    ids=["qwen3-moe", "gpt-oss-mxfp4"])


def _ep_plans(directory, shape, scheme, **options) -> dict:
    """{1: the tp=1 plan, 2: the --tp 2 --ep plan} of a one-layer random MoE checkpoint for sm90."""
    from rdnac.testing.moe import write_random_moe_checkpoint

    ckpt = write_random_moe_checkpoint(directory / "ckpt", shape, scheme, layers=1,
                                       decisive=options.get("dtype") != "float32")
    plans = {tp: _compile(ckpt, directory / f"tp{tp}.msgpack", "sm90", tp, ep=tp > 1, **options) for tp in (1, 2)}
    graph = read_plan(plans[2]).graph()
    experts = [n for n in graph.nodes if n.op in ("moe_experts", "moe_experts_mxfp4")]
    assert experts and all(graph.weights[n.inputs[3]].shape[0] == 8 for n in experts)  # 8 of the 16 experts
    return plans


@EP_MODELS
def test_sm90_expert_parallel_plans_interpreted_over_gloo(tmp_path, shape, scheme):
    """--tp 2 --ep: each rank runs the fused MoE kernels over its 8 of 16 experts (ids of the other rank's
    dropped by the device sort), then the all_reduce; in float32, logits within 1e-5 of the tp=1 plan's and
    the same greedy tokens (one layer each: the kernels' interpreter is slow; not decisive, so the logits are
    O(1) and 1e-5 is float32 rounding, not a fraction of a logit of 200)."""
    plans = _ep_plans(tmp_path, shape, scheme, dtype="float32")
    (ref, ref_tokens, _), (logits, tokens, _) = (_run(plans[tp], interpret=True) for tp in (1, 2))
    err = (logits - ref).abs().max().item()
    assert err <= 1e-5, f"max logits error {err:.3g}"
    assert tokens == ref_tokens and all(tokens)


@pytest.mark.gpu
@EP_MODELS
def test_sm90_expert_parallel_on_two_gpus_with_graphs(tmp_path, shape, scheme):
    """The --ep plans in bf16 (decisive checkpoints) on GPUs 0 and 1 over NCCL, decode graphs captured with the
    expert sort, the kernels and the all_reduce inside: the tp=1 plan's greedy tokens, logits within bf16
    rounding."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs; {torch.cuda.device_count()} visible")
    plans = _ep_plans(tmp_path, shape, scheme)
    (ref, ref_tokens, _), (logits, tokens, graphs) = (_run(plans[tp], device="cuda") for tp in (1, 2))
    assert tokens == ref_tokens and graphs, "tokens differ or decode graphs were not captured"
    err = (logits - ref).abs().max().item()
    assert err <= 2e-2 * ref.abs().max().item(), f"max logits error {err:.3g}"


@pytest.mark.gpu
def test_sm90_plan_on_two_gpus_with_graphs(sm90):
    """Ranks on GPUs 0 and 1 over NCCL, decode steps replayed from captured graphs with the all-reduces and
    the logits' all-gather inside them."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs; {torch.cuda.device_count()} visible")
    _check(sm90, device="cuda")


def test_a_gpu_plan_needs_one_gpu_per_rank(sm90):
    from rdnac.errors import RdnacError

    if torch.cuda.device_count() >= 2:
        pytest.skip("two GPUs are visible: the plan runs (test_sm90_plan_on_two_gpus_with_graphs)")
    with pytest.raises(RdnacError, match=r"^.*tp2.msgpack: a --tp 2 plan on GPUs requires 2 GPUs visible to this "
                                         r"process \(one per rank\); got [01]; check CUDA_VISIBLE_DEVICES"):
        rdnac.load(sm90[2], device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("model", [_deepseek, _qwen3_5], ids=["deepseek-v3", "qwen3_5"])
def test_sm90_mla_and_gdn_on_two_gpus(tmp_path, model):
    """MLA and GDN plans (bf16) on two GPUs over NCCL with decode graphs: logits within bf16 rounding of the
    tp=1 plan's (the float32 comparison under the interpreter is the exact one), greedy decode running."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs; {torch.cuda.device_count()} visible")
    model(tmp_path / "ckpt")
    (ref, _, _), (logits, tokens, graphs) = [_run(_compile(tmp_path / "ckpt", tmp_path / f"tp{tp}.msgpack", "sm90",
                                                           tp), device="cuda") for tp in (1, 2)]
    err = (logits - ref).abs().max().item()
    assert err <= 5e-2 * ref.abs().max().item(), f"max logits error {err:.3g}"
    assert graphs and all(tokens), "decode graphs were not captured, or a request produced nothing"
