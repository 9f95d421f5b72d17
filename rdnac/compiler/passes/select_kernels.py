"""Select kernels: a wrapper and a config per node and step key, within the target's limits.

The last pass of a GPU compile. For every step key (phase x token bucket)
and node, the node's op names its kernel family, wrapper and problem in the
kernel registry (`rdnac.kernels.registry`); the family's candidates are
ordered (by the cost-model estimator its record names, GEMMs; else its
default first, then the rest of its space; a measurement first). The whole
program is recorded over meta tensors (`rdnac.compiler.record`), every
specialization is built for the target in parallel, and any node whose
binaries exceed the LDS budget or spill moves to its next candidate, with
the rejection and its reason logged. The result is the plan's program and
its kernel binaries (`state.program`, `state.binaries`).
"""

from __future__ import annotations

import json

import torch

from rdnac.compiler import cost_model, tuning
from rdnac.compiler.build import check_resources, compile_calls
from rdnac.compiler.passes import CompileState
from rdnac.compiler.record import common_alignment, record_call
from rdnac.errors import RdnacError
from rdnac.ir.graph import Graph, Node
from rdnac.kernels import gemm, gemm_gated, registry
from rdnac.kernels.launch import with_pdl
from rdnac.runtime.executor import StepMeta, bucket_for
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


def node_problem(node: Node, phase: str, env: dict[str, torch.Tensor], runtime: dict) -> tuple[str, dict]:
    """(family name, problem) of a node at a step: its op's record in the kernel registry says both."""
    if not registry.has_kernel(node.op):
        why = registry.REFERENCE_ONLY_OPS.get(node.op)
        raise RdnacError(f"node {node.name!r}: no kernel family implements op {node.op!r} for GPU targets"
                         + (f" ({why})" if why else ""))
    why = registry.reference_only_attrs(node.op, node.attrs)
    if why:
        raise RdnacError(f"node {node.name!r}: no GPU kernel for op {node.op!r} with these attributes ({why})")
    fam, entry = registry.for_op(node.op)
    return fam.name, entry.problem(node.attrs, [env[n] for n in node.inputs], phase, runtime)


def _candidates(family: str, problem: dict, target: Target) -> list[tuple[dict, str]]:
    fam = registry.family(family)
    space = fam.config_space(problem)
    if fam.cost_model is not None:
        ranked = [(cfg, est.reason) for cfg, est in cost_model.rank(fam.cost_model, problem, space, target)]
        if family == "gemm_gated" and problem["M"] > gemm.DECODE_MAX_M:
            ranked = _unfused_first(problem, target) + ranked
    else:
        default = fam.default_config(problem)
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
    # each config once: a repeat compiles to the binary that just failed (gfx1151's tiny Qwen3.5 out_proj GEMM:
    # 16x128x64 was ranked twice)
    unique: dict[str, tuple[dict, str]] = {}
    for config, reason in ranked:
        unique.setdefault(json.dumps(config, sort_keys=True), (config, reason))
    return list(unique.values())


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
             "NB": max_blocks, "BS": runtime["kv_block_size"], "NS": num_seqs}  # NS: per-sequence state slots
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
            constexprs = with_pdl(kernel, constexprs, runtime.get("pdl", False), runtime.get("early_meta", False),
                                  runtime.get("early_weights", False))
            call = record_call(kernel, tuple(args), constexprs, num_warps, num_stages)
            calls.setdefault(current["node"], []).append(call)

    executor = Executor(graph, program, PerNode(), "meta")
    executor.run(env, meta, on_node=lambda node: current.update(node=node.name))
    return calls


def run(state: CompileState) -> None:
    """Sets state.program (node -> step key -> {"kernel", "config"}) and state.binaries; cpu: nothing to do."""
    if not state.target.is_gpu:
        return
    graph, target, runtime, opts = state.graph, state.target, state.runtime, state.options
    keys = step_keys(opts.max_num_seqs, opts.max_num_batched_tokens)
    program: dict[str, dict] = {n.name: {} for n in graph.nodes if n.op not in registry.VIEW_OPS}
    options: dict[tuple[str, str], list] = {}  # (node, key) -> remaining ranked candidates
    # (node, config label) -> (step keys, problems): configs rejected by the cost model's resource estimate
    # (LDS over the target's, with the size) or by their compiled binaries; all are logged
    rejections: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    for phase, bucket in keys:
        key = f"{phase}:{bucket}"
        env, _ = meta_env(graph, phase, bucket, runtime)
        for node in graph.nodes:
            if node.op in registry.VIEW_OPS:  # computed by the executor (views), no kernel to select
                _propagate_meta(node, env)
                continue
            family, problem = node_problem(node, phase, env, runtime)
            ranked = _candidates(family, problem, target)
            fitting = [r for r in ranked if not r[1].startswith("does not fit")]
            for config, why in ranked if fitting else ():
                if why.startswith("does not fit"):
                    label = _config_label({"kernel": registry.wrapper_for(node.op, phase), "config": config})
                    rejections.setdefault((node.name, label), ([], [f"cost model: {why}"]))[0].append(key)
            ranked = fitting or ranked
            options[(node.name, key)] = ranked
            program[node.name][key] = {"kernel": registry.wrapper_for(node.op, phase), "config": ranked[0][0],
                                       "reason": ranked[0][1]}
            _propagate_meta(node, env)
    # (node, key) -> the binaries that failed under every config tried so far: a kernel whose binary fails whatever
    # the config (a helper kernel the node launches with its own tiles) is named when the candidates run out
    always_failed: dict[tuple[str, str], set[str]] = {}
    while True:
        step_calls = {}
        for phase, bucket in keys:
            step_calls[f"{phase}:{bucket}"] = _record_step(graph, program, phase, bucket, runtime)
        flat = [(key, node, call) for key, per_node in step_calls.items() for node, cs in per_node.items()
                for call in cs]
        binaries = compile_calls(common_alignment([c for _, _, c in flat]), target, quiet=opts.quiet)
        rejected, failing = {}, {}
        for (key, node, _), binary in zip(flat, binaries):
            problems = check_resources(binary, target)
            if problems:
                rejected.setdefault((node, key), problems)
                failing.setdefault((node, key), set()).add(binary.key)
        if not rejected:
            break
        for (node, key), problems in rejected.items():
            prior = always_failed.get((node, key))
            always_failed[(node, key)] = failing[(node, key)] if prior is None else prior & failing[(node, key)]
            remaining = options[(node, key)]
            bad = remaining.pop(0)
            label = _config_label({"kernel": program[node][key]["kernel"], "config": bad[0]})
            rejections.setdefault((node, label), ([], problems))[0].append(key)
            if not remaining:
                tried = sum(n == node and key in ks for (n, _), (ks, _) in rejections.items())
                stuck = always_failed[(node, key)]
                if stuck and tried > 1:  # no config could have fixed it: say which kernel, not the last config
                    raise RdnacError(f"node {node!r}: kernel {min(stuck)} does not fit target {target.name} at "
                                     f"{key} under any of the node's {tried} candidate configs (its binary is the "
                                     f"same whatever the config); {'; '.join(problems)}")
                raise RdnacError(f"node {node!r}: no candidate config fits target {target.name} at {key}; "
                                 f"last problem: {problems[0]}")
            program[node][key].update(config=remaining[0][0], reason=remaining[0][1])
    for (node, label), (ks, problems) in rejections.items():
        state.decide(NAME, node, f"rejected {label} for {_key_span(ks)}", "; ".join(problems))
    unique = {}
    for b in binaries:
        unique.setdefault(b.key, b)
    for node in graph.nodes:
        chosen = {}
        for key, choice in program.get(node.name, {}).items():
            chosen.setdefault(_config_label(choice), []).append(key)
        for label, ks in chosen.items():
            state.decide(NAME, node.name, f"{label} for {_key_span(ks)}",
                         program[node.name][ks[0]].get("reason", ""))
    state.program, state.binaries = program, list(unique.values())


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
