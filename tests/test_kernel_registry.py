"""The kernel registry is complete and consistent (rdnac/kernels/registry.py).

Every IR op has exactly one kernel family record or is listed as running
without a kernel; every wrapper name a plan's program may hold resolves, and
nothing else does; the runtime reaches the registry without importing the
compiler.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from rdnac.compiler import cost_model
from rdnac.errors import PlanError
from rdnac.ir.ops import OPS
from rdnac.kernels import registry
from rdnac.kernels.launch import resolve_kernel


def test_every_op_has_one_family_or_is_listed_without_kernel():
    claims: dict[str, list[str]] = {}
    for fam in registry.families().values():
        for op in fam.ops:
            claims.setdefault(op, []).append(fam.name)
    assert {op: fams for op, fams in claims.items() if len(fams) != 1} == {}, "an op with several families"
    without = set(registry.VIEW_OPS) | set(registry.REFERENCE_ONLY_OPS)
    assert not set(registry.VIEW_OPS) & set(registry.REFERENCE_ONLY_OPS)
    assert not set(claims) & without, f"listed without kernel but claimed: {set(claims) & without}"
    assert set(claims) - set(OPS) == set(), "a family claims an op the IR does not define"
    assert set(OPS) - set(claims) - without == set(), "an IR op with neither a family nor a reason"
    assert all(registry.has_kernel(op) == (op in claims) for op in OPS)


def test_every_wrapper_name_resolves_to_its_wrapper():
    names = set()
    for op in (op for op in OPS if registry.has_kernel(op)):
        fam, entry = registry.for_op(op)
        assert op in fam.ops and registry.family(fam.name) is fam
        for phase in registry.PHASES:
            name = registry.wrapper_for(op, phase)
            module, _, function = name.partition(".")
            assert module and function and "." not in function, name  # "module.function", as plans store it
            fn = registry.wrapper(name)
            assert fn is entry.for_phase(phase) and fn.__name__ == function
            assert fn.__module__ == f"rdnac.kernels.{module}"
            params = inspect.signature(fn).parameters  # every wrapper launches through the executor's launcher
            assert params["config"].kind is params["launcher"].kind is inspect.Parameter.KEYWORD_ONLY, name
            names.add(name)
    # the names plans compiled before the registry hold (the executor's former WRAPPERS table)
    assert names == {
        "embedding.embedding", "rms_norm.rms_norm", "rms_norm.head_rms_norm", "gemm.linear", "gemm_fp8.linear_fp8",
        "rope.rope", "kv_cache.kv_cache_write", "qk_norm_rope_cache.qk_norm_rope_cache", "attention.attention_prefill",
        "attention_decode.attention_decode", "attention.attention_quant_prefill",
        "attention_decode.attention_quant_decode", "activation.gated_act", "gemm_gated.linear_gated_act",
        "elementwise.add", "gemm.logits", "rms_norm_quant.rms_norm_quant", "activation_quant.gated_act_quant",
        "gemm_fp8.gated_act_linear_fp8",  # issue 29: the down projection computing its own FP8 activations
        "moe_route.moe_route", "moe.moe_experts", "moe.moe_experts_mxfp4", "moe.moe_experts_fp8_block",
        "mla.mla_cache_write",
        "mla_attention.mla_attention_prefill", "mla_attention.mla_attention_decode",
        # linear attention (issue 25)
        "conv1d.causal_conv1d_prefill", "conv1d.causal_conv1d_decode", "gated_delta.gated_delta_rule_prefill",
        "gated_delta.gated_delta_rule_decode", "gated_rms_norm.gated_rms_norm", "sigmoid_gate.sigmoid_gate",
        # tensor parallelism (issue 28): torch.distributed calls, not Triton kernels
        "collective.all_reduce", "collective.all_gather", "collective.shard_ids",
        # the all-to-all expert-parallel form (--ep-dispatch all-to-all)
        "collective.reduce_scatter", "collective.shard_rows", "collective.all_gather_rows", "collective.all_to_all",
        "collective.ep_dispatch", "collective.ep_combine",
        # INT8 W8A8 (issue 25)
        "gemm_int8.linear_int8", "gated_rms_norm_quant.gated_rms_norm_quant", "sigmoid_gate_quant.sigmoid_gate_quant"}


@pytest.mark.parametrize("name", ["os.system", "gemm._gemm_kernel", "launch.JitLauncher", "registry.wrapper",
                                  "gemm.config_space", "gemm", ""])
def test_a_name_outside_the_registry_is_refused(name):
    with pytest.raises(PlanError, match="does not register"):
        registry.wrapper(name)


@pytest.mark.parametrize("name", ["os:system", "rdnac.compiler.build:compile_calls", "rdnac.kernels:x",
                                  "rdnac.kernels.nonexistent:k", "rdnac.kernelsx.gemm:_gemm_kernel"])
def test_kernel_names_resolve_only_inside_the_library(name):
    with pytest.raises(PlanError, match="kernel library"):
        resolve_kernel(name)
    assert resolve_kernel("rdnac.kernels.gemm:_gemm_kernel").fn.__name__ == "_gemm_kernel"


def test_family_records_name_what_the_compiler_resolves():
    for fam in registry.families().values():
        assert callable(fam.config_space) and callable(fam.default_config), fam.name
        assert fam.cost_model is None or fam.cost_model in cost_model.ESTIMATORS, fam.name
        assert all(isinstance(f, str) for f in fam.tuning_key), fam.name
        for op, entry in fam.ops.items():
            assert callable(entry.problem) and (entry.node_kwargs is None or callable(entry.node_kwargs)), op


def test_runtime_reaches_the_registry_without_the_compiler():
    code = ("import sys\n"
            "import rdnac.runtime.executor, rdnac.runtime.aot\n"
            "from rdnac.kernels import registry\n"
            "registry.wrapper('gemm.linear'); registry.families()\n"
            "bad = sorted(m for m in sys.modules if m.startswith('rdnac.compiler'))\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_executor_refuses_a_gpu_graph_op_without_kernel():
    from rdnac.ir.graph import Graph, Node, TensorSpec
    from rdnac.runtime.executor import Executor

    graph = Graph(inputs={"logits": TensorSpec("float32", ("R", 8))}, weights={},
                  nodes=[Node("pick", "argmax", ["logits"], ["token"])], outputs=["token"])
    with pytest.raises(PlanError, match="node 'pick'.*op 'argmax'"):
        Executor(graph, {"pick": {}}, launcher=None, device="cpu")
