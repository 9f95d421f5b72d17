"""Select kernels: a wrapper and a config per node and step key, within the target's limits.

For every step key (phase x token bucket) and node: the candidates of the
node's kernel family are ordered (GEMMs, gated ones too, by the cost model, other families
default first, then the rest of their space). The whole program is recorded
over meta tensors with a RecordingLauncher, every specialization is built
for the target in parallel, and any node whose binaries exceed the LDS
budget or spill moves to its next candidate, with the rejection and its
reason logged. The result is the plan's program and its kernel binaries.
"""

from __future__ import annotations

import importlib

import torch

from rdnac.compiler import cost_model, tuning
from rdnac.compiler.build import check_resources, compile_calls
from rdnac.compiler.passes import PassContext
from rdnac.errors import RdnacError
from rdnac.ir.graph import Graph, Node
from rdnac.ir.ops import ATTENTION_OPS
from rdnac.kernels import gemm, gemm_gated
from rdnac.kernels.launch import KernelCall, with_pdl
from rdnac.runtime.executor import NO_KERNEL_OPS, StepMeta, bucket_for, wrapper_name
from rdnac.targets import Target

NAME = "select_kernels"


def step_keys(max_num_seqs: int, max_num_batched_tokens: int) -> list[tuple[str, int]]:
    keys = []
    for phase, limit in (("decode", max_num_seqs), ("prefill", max_num_batched_tokens)):
        b = 1
        while True:
            keys.append((phase, b))
            if b >= limit:
                break
            b = bucket_for(b + 1)
    return keys


def _problem(node: Node, phase: str, env: dict[str, torch.Tensor], runtime: dict) -> tuple[str, dict]:
    a, ins = node.attrs, [env[n] for n in node.inputs]
    dtype = str(ins[0].dtype).removeprefix("torch.")
    if node.op == "linear":
        return "gemm", {"M": ins[0].shape[0], "N": ins[1].shape[0], "K": ins[1].shape[1], "dtype": dtype,
                        "has_bias": len(ins) == 3}
    if node.op == "linear_gated_act":  # N: the output width I (the weight is [2I, K])
        return "gemm_gated", {"M": ins[0].shape[0], "N": ins[1].shape[0] // 2, "K": ins[1].shape[1], "dtype": dtype,
                              "act": a["act"]}
    if node.op == "linear_fp8":
        return "gemm_fp8", {"M": ins[0].shape[0], "N": ins[1].shape[0], "K": ins[1].shape[1],
                            "dtype": a.get("out_dtype") or dtype,
                            "has_bias": a.get("has_bias", False), "weight_scheme": a["weight_scheme"],
                            "act_scheme": a["act_scheme"], "fp8_format": a["fp8_format"],
                            "block_size": a.get("block_size"), "group": a.get("group", 0)}
    if node.op == "rms_norm_quant":
        return "rms_norm_quant", {"H": ins[0].shape[1], "group": a["group"], "dtype": dtype, "M": ins[0].shape[0]}
    if node.op == "gated_act_quant":
        width = ins[0].shape[1]
        return "activation_quant", {"I": width if len(ins) == 2 else width // 2, "group": a["group"], "dtype": dtype,
                                    "M": ins[0].shape[0]}
    if node.op == "logits":
        return "gemm", {"M": ins[1].shape[0], "N": ins[2].shape[0], "K": ins[2].shape[1], "dtype": dtype,
                        "has_bias": False}
    if node.op in ATTENTION_OPS:  # the quant epilogue changes no config
        return "attention", {"phase": phase, "num_heads": a["num_heads"], "num_kv_heads": a["num_kv_heads"],
                             "head_dim": a["head_dim"], "block_size": runtime["kv_block_size"],
                             "max_model_len": runtime["max_model_len"], "dtype": dtype,
                             "num_seqs": ins[4].shape[0], "num_tokens": ins[0].shape[0]}
    if node.op == "embedding":
        return "embedding", {"H": ins[1].shape[1]}
    if node.op == "rms_norm":
        return "rms_norm", {"H": ins[0].shape[1], "num_heads": 1}
    if node.op == "head_rms_norm":
        return "rms_norm", {"H": a["head_dim"], "num_heads": a["num_heads"]}
    if node.op == "rope":
        return "rope", {"head_dim": a["head_dim"], "num_heads": a["num_heads"], "num_kv_heads": a["num_kv_heads"]}
    if node.op == "kv_cache_write":
        return "kv_cache", {"num_kv_heads": a["num_kv_heads"], "head_dim": a["head_dim"]}
    if node.op == "qk_norm_rope_cache":
        return "qk_norm_rope_cache", {"head_dim": a["head_dim"], "num_heads": a["num_heads"],
                                      "num_kv_heads": a["num_kv_heads"], "qk_norm": a["qk_norm"], "M": ins[0].shape[0]}
    if node.op == "gated_act":
        width = ins[0].shape[1]
        return "activation", {"I": width if len(ins) == 2 else width // 2}
    if node.op == "add":
        return "elementwise", {"numel_per_token": ins[0].shape[1], "dtype": dtype}
    raise RdnacError(f"node {node.name!r}: no kernel family implements op {node.op!r} for GPU targets")


def _candidates(family: str, problem: dict, target: Target) -> list[tuple[dict, str]]:
    module = importlib.import_module(f"rdnac.kernels.{family}")
    space = module.config_space(problem)
    if family in ("gemm", "gemm_gated"):
        ranked = [(cfg, est.reason) for cfg, est in cost_model.rank(family, problem, space, target)]
        if family == "gemm_gated" and problem["M"] > gemm.DECODE_MAX_M:
            ranked = _unfused_first(problem, target) + ranked
    else:
        default = module.default_config(problem)
        ranked = [(default, "family default")] + [(c, "next in the config space") for c in space if c != default]
    # a measurement beats the model (it may lie outside the default space); at compute-bound sizes an
    # unmeasured shape takes its nearest measured neighbour's tile
    entry, why = tuning.lookup(target.name, family, problem), tuning.describe
    if entry is None:
        entry, why = tuning.nearest_shape(target.name, family, problem), tuning.describe_nearest
    if entry is not None:
        config = entry["config"]
        if problem.get("act_scheme") == "prequantized":  # measured as its dynamic scheme: see tune.search
            config = entry.get("prequantized_config", config)
        ranked = [(config, why(entry, problem))] + [r for r in ranked if r[0] != config]
    return ranked


def _unfused_first(problem: dict, target: Target) -> list[tuple[dict, str]]:
    """Above decode sizes, unmeasured, a gated GEMM keeps the unfused pair (the merged GEMM ranked by the
    cost model, then the activation): on an H200 the fused kernel measured slower there (Qwen3-8B
    prefill of 2048 tokens 62.3 ms fused against 60.3 ms unfused, 512 tokens 19.4 against 15.3 ms),
    and faster at decode (batch 1: 4.459 against 4.511 ms). A measurement (`rdnac tune`) overrides it."""
    merged = gemm_gated.merged_problem(problem)
    ranked = cost_model.rank("gemm", merged, gemm.config_space(merged), target)
    pairs = gemm_gated.unfused_configs([cfg for cfg, _ in ranked], problem)
    return [(pair, f"unfused pair: no measurement at this size, where the fused kernel measured slower; GEMM "
                   f"{est.reason}") for pair, (_, est) in zip(pairs, ranked)]


def meta_env(graph: Graph, phase: str, num_tokens: int, runtime: dict) -> tuple[dict, StepMeta]:
    """Meta tensors for every weight and input of a step of `num_tokens` tokens."""
    num_seqs = num_tokens if phase == "decode" else 1
    max_blocks = -(-runtime["max_model_len"] // runtime["kv_block_size"])
    sizes = {"T": num_tokens, "B": num_seqs, "B1": num_seqs + 1, "R": num_seqs, "MB": max_blocks,
             "NB": max_blocks, "BS": runtime["kv_block_size"]}
    env = {}
    for name, spec in graph.weights.items():
        env[name] = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype), device="meta")
    for name, spec in graph.inputs.items():
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)
        env[name] = torch.empty(shape, dtype=getattr(torch, spec.dtype), device="meta")
    return env, StepMeta(phase, num_tokens, num_tokens if phase == "prefill" else 1)


def _record_step(graph, program, phase, num_tokens, runtime) -> dict[str, list]:
    """Run the program for one step over meta tensors; returns {node name: [KernelCall]}."""
    from rdnac.runtime.executor import Executor

    env, meta = meta_env(graph, phase, num_tokens, runtime)
    calls: dict[str, list] = {}
    current = {"node": None}

    class PerNode:
        def launch(self, kernel, grid, args, *, constexprs, num_warps=4, num_stages=2):
            constexprs = with_pdl(kernel, constexprs, runtime.get("pdl", False), runtime.get("early_meta", False))
            call = KernelCall.from_launch(kernel, tuple(args), constexprs, num_warps, num_stages)
            calls.setdefault(current["node"], []).append(call)

    executor = Executor(graph, program, PerNode(), "meta")
    executor.run(env, meta, on_node=lambda node: current.update(node=node.name))
    return calls


def run(graph: Graph, ctx: PassContext, target: Target, runtime: dict, keys: list[tuple[str, int]]) -> tuple[dict, list]:
    """Returns (program, binaries). program: node -> step key -> {"kernel", "config"}."""
    program: dict[str, dict] = {n.name: {} for n in graph.nodes if n.op not in NO_KERNEL_OPS}
    options: dict[tuple[str, str], list] = {}  # (node, key) -> remaining ranked candidates
    for phase, bucket in keys:
        key = f"{phase}:{bucket}"
        env, _ = meta_env(graph, phase, bucket, runtime)
        for node in graph.nodes:
            if node.op in NO_KERNEL_OPS:  # computed by the executor (views), no kernel to select
                _propagate_meta(node, env)
                continue
            family, problem = _problem(node, phase, env, runtime)
            ranked = _candidates(family, problem, target)
            options[(node.name, key)] = ranked
            program[node.name][key] = {"kernel": wrapper_name(node.op, phase), "config": ranked[0][0],
                                       "reason": ranked[0][1]}
            _propagate_meta(node, env)
    rejections: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    while True:
        step_calls = {}
        for phase, bucket in keys:
            step_calls[f"{phase}:{bucket}"] = _record_step(graph, program, phase, bucket, runtime)
        flat = [(key, node, call) for key, per_node in step_calls.items() for node, cs in per_node.items()
                for call in cs]
        binaries = compile_calls([c for _, _, c in flat], target, quiet=ctx.options.get("quiet", False))
        rejected = {}
        for (key, node, _), binary in zip(flat, binaries):
            problems = check_resources(binary, target)
            if problems:
                rejected.setdefault((node, key), problems)
        if not rejected:
            break
        for (node, key), problems in rejected.items():
            remaining = options[(node, key)]
            bad = remaining.pop(0)
            label = _config_label({"kernel": program[node][key]["kernel"], "config": bad[0]})
            rejections.setdefault((node, label), ([], problems))[0].append(key)
            if not remaining:
                raise RdnacError(f"node {node!r}: no candidate config fits target {target.name} at {key}; "
                                 f"last problem: {problems[0]}")
            program[node][key].update(config=remaining[0][0], reason=remaining[0][1])
    for (node, label), (ks, problems) in rejections.items():
        ctx.decide(NAME, node, f"rejected {label} for {_key_span(ks)}", "; ".join(problems))
    unique = {}
    for b in binaries:
        unique.setdefault(b.key, b)
    for node in graph.nodes:
        chosen = {}
        for key, choice in program.get(node.name, {}).items():
            chosen.setdefault(_config_label(choice), []).append(key)
        for label, ks in chosen.items():
            ctx.decide(NAME, node.name, f"{label} for {_key_span(ks)}",
                       program[node.name][ks[0]].get("reason", ""))
    return program, list(unique.values())


def _propagate_meta(node: Node, env: dict) -> None:
    """Give a node's outputs meta tensors of the shapes its op's shape rule gives (no computation)."""
    from rdnac.ir.graph import TensorSpec
    from rdnac.ir.ops import OPS

    specs = [TensorSpec(str(env[n].dtype).removeprefix("torch."), tuple(env[n].shape)) for n in node.inputs]
    for name, spec in zip(node.outputs, OPS[node.op].infer(node.attrs, specs)):
        env[name] = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype), device="meta")


def _config_label(choice: dict) -> str:
    c = choice["config"]
    consts = ",".join(f"{k}={v}" for k, v in c["constexprs"].items())
    return f"{choice['kernel']}[{consts}; warps={c['num_warps']}, stages={c['num_stages']}]"


def _key_span(keys: list[str]) -> str:
    by_phase: dict[str, list[str]] = {}
    for k in keys:
        phase, bucket = k.split(":")
        by_phase.setdefault(phase, []).append(bucket)
    return "; ".join(f"{p} T<={','.join(bs)}" for p, bs in by_phase.items())
