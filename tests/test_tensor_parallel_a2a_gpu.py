"""GPU plans of the all-to-all expert-parallel form (`--tp 2 --ep --ep-dispatch all-to-all`), next to
test_tensor_parallel_gpu.py (the all-reduce form) and in its pattern:

- cross-compiled for gfx942 and gfx1201: every node has a kernel per step key, the token-row collectives
  (reduce_scatter, shard_rows, all_to_all, ep_dispatch, ep_combine, all_gather_rows) the `collective`
  family's wrappers, the experts the fused MoE kernels over the dispatched slots (top-1 each);
- the dry run of the GPU test on this machine: the sm90 plan's kernels under --interpret, rank 1 a process of
  its own over gloo, in float32 (logits within 1e-5 of the tp=1 plan of the same target);
- `-m gpu` (two GPUs or more, else skipped): the same sm90 plans in bf16 on cuda, the ranks over NCCL, decode
  graphs captured with the reduce-scatter, the three all-to-alls and the all-gather inside; the reference is
  the tp=1 plan: greedy tokens identical on a decisive checkpoint, logits within bf16 rounding.
"""

from __future__ import annotations

import pytest
import torch

import rdnac
from rdnac.plans import read_plan
from tests.test_tensor_parallel_gpu import EP_MODELS, LIMITS, _moe, _run

TOKEN_ROW_OPS = ("reduce_scatter", "shard_rows", "all_to_all", "ep_dispatch", "ep_combine", "all_gather_rows")


def _compile(ckpt, out, target, tp=1, **options):
    a2a = {"ep": True, "ep_dispatch": "all-to-all"} if tp > 1 else {}
    return rdnac.compile(ckpt, target=target, output=out, quiet=True, tp=tp, **LIMITS, **a2a, **options)


@pytest.mark.parametrize("target", ["gfx942", "gfx1201"])
def test_all_to_all_plans_cross_compile_for_amd_targets(tmp_path, target):
    _moe(tmp_path / "ckpt")
    plan = read_plan(_compile(tmp_path / "ckpt", tmp_path / "tp2.msgpack", target, tp=2))
    graph, program = plan.graph(), plan.body["program"]
    assert plan.num_ranks == 2 and plan.header["target"] == target and plan.body["kernels"]
    assert graph.attrs["mesh"]["ep_dispatch"] == "all-to-all"
    ops = graph.op_counts()
    assert all(ops.get(op) for op in TOKEN_ROW_OPS), ops
    for node in graph.nodes:
        if node.op == "split":
            continue
        keys = program[node.name]
        assert keys and all(c["kernel"] for c in keys.values()), node.name
        if node.op in TOKEN_ROW_OPS:
            assert {c["kernel"] for c in keys.values()} == {f"collective.{node.op}"}, node.name
        if node.op == "moe_experts":
            assert {c["kernel"].split(".")[0] for c in keys.values()} == {"moe"}, node.name


def _a2a_plans(directory, shape, scheme, **options) -> dict:
    """{1: the tp=1 plan, 2: the all-to-all --tp 2 --ep plan} of a one-layer random MoE checkpoint for sm90."""
    from rdnac.testing.moe import write_random_moe_checkpoint

    ckpt = write_random_moe_checkpoint(directory / "ckpt", shape, scheme, layers=1,
                                       decisive=options.get("dtype") != "float32")
    plans = {tp: _compile(ckpt, directory / f"tp{tp}.msgpack", "sm90", tp, **options) for tp in (1, 2)}
    ops = read_plan(plans[2]).graph().op_counts()
    assert ops["all_to_all"] == 3 and ops["reduce_scatter"] == ops["all_gather_rows"] == 1, ops
    return plans


def test_sm90_all_to_all_plan_interpreted_over_gloo(tmp_path):
    """The GPU test's dry run (one model: the kernels' interpreter is slow): the fused MoE kernels over the
    slots a rank receives, the collective wrappers over gloo; float32, so 1e-5 is rounding."""
    plans = _a2a_plans(tmp_path, "qwen3-moe-tiny", "bf16", dtype="float32")
    (ref, ref_tokens, _), (logits, tokens, _) = (_run(plans[tp], interpret=True) for tp in (1, 2))
    err = (logits - ref).abs().max().item()
    assert err <= 1e-5, f"max logits error {err:.3g}"
    assert tokens == ref_tokens and all(tokens)


@pytest.mark.gpu
@EP_MODELS
def test_sm90_all_to_all_on_two_gpus_with_graphs(tmp_path, shape, scheme):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs; {torch.cuda.device_count()} visible")
    plans = _a2a_plans(tmp_path, shape, scheme)
    (ref, ref_tokens, _), (logits, tokens, graphs) = (_run(plans[tp], device="cuda") for tp in (1, 2))
    assert tokens == ref_tokens and graphs, "tokens differ or decode graphs were not captured"
    err = (logits - ref).abs().max().item()
    assert err <= 2e-2 * ref.abs().max().item(), f"max logits error {err:.3g}"
