"""`rdnac tune`: measure kernel configs on this GPU and write them to the tuning table.

Every candidate of a problem (the family's config space plus wider decode and
prefill tiles) is built through the plan path: recorded over meta tensors,
compiled for the target in parallel (`compile_calls`), checked against the
target's resources (`check_resources`). The survivors are loaded with the
runtime's `AotLauncher`, checked against the family's default config on the
same inputs (a candidate off by more than 2% of the output's range is
left out, with the reason logged), and timed as a captured CUDA/HIP graph of
back-to-back calls that cycle through enough weight copies to defeat the L2
cache. `rdnac.compiler.tuning` stores and looks up the winners;
`problems_from_plan` lists the problems a compiled plan selects configs for.
"""

from __future__ import annotations

import json
import time

import torch
import triton

from rdnac.compiler import cost_model, tuning
from rdnac.compiler.build import check_resources, compile_calls
from rdnac.errors import RdnacError
from rdnac.compiler.record import RecordingLauncher
from rdnac.kernels import registry
from rdnac.kernels.gemm import _config
from rdnac.kernels.launch import JitLauncher
from rdnac.targets import get_target

L2_DEFEAT_BYTES = 256 << 20
CONTEXT = 1024  # decode attention is timed at this many cached tokens per sequence


def _acfg(warps, stages, **constexprs):
    return {"constexprs": constexprs, "num_warps": warps, "num_stages": stages}


def candidates(family: str, problem: dict) -> list[dict]:
    space = list(registry.family(family).config_space(problem))
    if family == "attention":
        if problem["phase"] == "decode":
            extra = [_acfg(w, st, NUM_SPLITS=s, BLOCK_N=n) for s in (1, 2, 4, 8, 16, 32) for n in (16, 32, 64, 128)
                     for w, st in ((4, 3), (2, 2), (8, 2))]
            # Split KV without the reduce launch (see attention.py), only ever measured
            extra += [{**c, "constexprs": {**c["constexprs"], "SELF_REDUCE": True}} for c in extra
                      if c["constexprs"]["NUM_SPLITS"] > 1]
        else:
            extra = [_acfg(w, st, BLOCK_M=m, BLOCK_N=n) for m, n, w, st in
                     ((128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2),
                      (128, 32, 8, 3), (64, 128, 8, 2), (128, 128, 8, 3), (128, 128, 8, 4), (64, 64, 4, 4),
                      (64, 32, 4, 3), (64, 128, 4, 3))]
        return [c for j, c in enumerate(space + extra) if c not in (space + extra)[:j]]
    if family == "gemm_gated":  # the merged [2N, K] GEMM's candidates without split-K, BLOCK_N halved
        from rdnac.kernels.gemm_gated import from_gemm_configs, merged_problem, unfused_configs, wide_configs

        gemm_candidates = candidates("gemm", merged_problem(problem))
        fused = space + [c for c in from_gemm_configs(gemm_candidates) if c not in space]
        # the unfused pair and the merged GEMM with a gated epilogue (WIDE), measured alike
        return fused + unfused_configs(gemm_candidates, problem) + wide_configs(gemm_candidates)
    M, N, K = problem["M"], problem["N"], problem["K"]
    block_scale = problem.get("weight_scheme") == "block"
    extra = []
    if M <= 16:
        for bn in ((64, 128) if block_scale else (32, 64, 128)):
            for bk in ((128,) if block_scale else (128, 256)):
                for split in (1, 2, 4, 8, 16):
                    kps = triton.cdiv(triton.cdiv(K, split), bk) * bk
                    if split > 1 and (kps < 2 * bk or triton.cdiv(K, kps) != split):
                        continue
                    for stages in (3, 4):
                        extra.append(_config(16, bn, bk, 1, split, 4, stages))
    elif M > 256:
        for bn, bk, warps, stages in ((256, 64, 8, 3), (256, 64, 8, 4), (128, 64, 8, 4), (128, 128, 8, 3),
                                      (128, 64, 4, 4)):
            if not (block_scale and bk != 128):
                extra.append(_config(128, bn, bk, 8, 1, warps, stages))
    unique = [c for j, c in enumerate(space + extra) if c not in (space + extra)[:j]]
    if M <= 16:  # split-K without the reduce launch (see gemm.py), only ever measured
        unique += [{**c, "constexprs": {**c["constexprs"], "SELF_REDUCE": True}} for c in unique
                   if c["constexprs"]["SPLIT_K"] > 1]
        if problem.get("act_scheme") == "dynamic_group":  # x quantized inside the GEMM (see gemm_fp8.py)
            group = problem["block_size"][1]
            unique += [{**c, "constexprs": {**c["constexprs"], "QUANT_A": True}} for c in unique
                       if c["constexprs"]["BLOCK_K"] == group]
    return unique


def _attention_tensors(problem: dict, device: str, copies: int, context: int):
    hq, hk, d, bs = problem["num_heads"], problem["num_kv_heads"], problem["head_dim"], problem["block_size"]
    decode = problem["phase"] == "decode"
    b = problem["num_seqs"]
    t = b if decode else problem["num_tokens"]
    ctx = context if decode else t
    per_seq = -(-ctx // bs)

    def ints(values):
        return torch.tensor(values, dtype=torch.int32).to(device)

    q = torch.randn(t, hq * d, device=device).to(torch.bfloat16)  # meta tensors: shapes only (recording)
    tables = torch.arange(b * per_seq, dtype=torch.int32).reshape(b, per_seq).to(device)
    seq_lens = ints([ctx] * b)
    cu = ints(list(range(b + 1)) if decode else [0, t])
    positions = ints([ctx - 1] * b if decode else list(range(t)))
    kw = dict(num_heads=hq, num_kv_heads=hk, head_dim=d, scale=d ** -0.5)
    if not decode:
        kw["max_query_len"] = t
    cache_dtype = getattr(torch, problem.get("kv_dtype", "bfloat16"))
    unit = 1.0
    if cache_dtype != torch.bfloat16:  # an FP8 cache (decode): the same values, stored at a per-tensor scale
        unit = 0.05
        kw.update(k_scale=unit, v_scale=unit)
    sets = []
    for _ in range(copies):
        k_cache, v_cache = (torch.randn(b * per_seq, bs, hk, d, device=device).div(unit).to(cache_dtype)
                            for _ in range(2))
        sets.append(((q, k_cache, v_cache, tables, seq_lens, cu, positions), kw))
    return sets


def _tensors(family: str, problem: dict, device: str, copies: int, context: int = 1024):
    """`copies` argument sets for one problem's wrapper (distinct weights, so timing defeats the L2)."""
    if family == "attention":
        return _attention_tensors(problem, device, copies, context)
    M, N, K = problem["M"], problem["N"], problem["K"]
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    sets = []
    for _ in range(copies):
        if family == "gemm":
            sets.append(((x, (0.02 * torch.randn(N, K, device=device)).to(torch.bfloat16)), {}))
        elif family == "gemm_gated":  # weight [2N, K]: gate rows, then up rows
            sets.append(((x, (0.02 * torch.randn(2 * N, K, device=device)).to(torch.bfloat16)), {"act": problem["act"]}))
        elif family == "gemm_int8":  # measured as dynamic_token (tuning.measured_form)
            w = torch.randint(-127, 128, (N, K), device=device, dtype=torch.int8)
            sets.append(((x, w, torch.full((N,), 1e-3, device=device)),
                         {"weight_scheme": "channel", "act_scheme": "dynamic_token"}))
        else:
            w = (64 * torch.randn(N, K, device=device)).to(torch.float8_e4m3fn)
            shape = {"block": ((N + 127) // 128, (K + 127) // 128), "channel": (N,), "tensor": (1,)}[problem["weight_scheme"]]
            scale = torch.full(shape, 1e-3, device=device)
            sets.append(((x, w, scale), {k: problem[k] for k in ("weight_scheme", "act_scheme", "fp8_format",
                                                                  "block_size")}))
    return sets


# The op whose wrapper times a tuned family's problems (gemm also serves logits; attention its quant form).
_TIMED_OP = {"gemm": "linear", "gemm_gated": "linear_gated_act", "gemm_fp8": "linear_fp8", "gemm_int8": "linear_int8",
             "attention": "attention"}


def _wrapper(family: str, problem: dict):
    fam, entry = registry.for_op(_TIMED_OP[family])
    assert fam.name == family, (family, fam.name)
    return entry.for_phase(problem.get("phase", "prefill"))


def build_candidates(jobs: list[tuple[str, dict]], target: str, log=print) -> list[tuple[int, dict, list]]:
    """(job index, config, binaries) of every candidate that builds for `target` within its resources."""
    tgt = get_target(target)
    plan = []  # (job index, config, [KernelCall])
    for j, (family, problem) in enumerate(jobs):
        (args, kw), = _tensors(family, problem, "meta", 1)
        for config in candidates(family, problem):
            rec = RecordingLauncher()
            _wrapper(family, problem)(*args, **kw, config=config, launcher=rec)
            plan.append((j, config, rec.calls))
    started = time.perf_counter()
    binaries = compile_calls([c for _, _, calls in plan for c in calls], tgt, quiet=True)
    log(f"built {len(binaries)} binaries for {len(plan)} candidates in {time.perf_counter() - started:.0f} s")
    ok, pos = [], 0
    for j, config, calls in plan:
        bins = binaries[pos:pos + len(calls)]
        pos += len(calls)
        if not any(check_resources(b, tgt) for b in bins):
            ok.append((j, config, bins))
    return ok


def search(jobs: list[tuple[str, dict]], target: str, log=print, contexts: tuple[int, ...] = (CONTEXT,)) -> list[dict]:
    """Time every candidate of every job on this machine's GPU; one table entry per job (the fastest).

    Decode attention is timed at each of `contexts` cached tokens per sequence. A plan keeps one config per
    batch bucket whatever the context, so with several contexts the entry keeps `robust_pick`'s config (the
    smallest worst slowdown against each context's fastest) and records each context's times."""
    from rdnac.runtime.aot import AotLauncher, check_target

    if not torch.cuda.is_available():
        raise RdnacError("tuning requires a GPU visible to torch; none found (tune on the machine that will run "
                         "the plans, then compile anywhere with its table)")
    check_target(target, torch.device("cuda"))
    tgt = get_target(target)
    ok = build_candidates(jobs, target, log)
    launcher = AotLauncher([b.to_dict() for _, _, bins in ok for b in bins], "cuda")
    results = []
    for j, (family, problem) in enumerate(jobs):
        decode_attention = family == "attention" and problem["phase"] == "decode"
        ctxs = list(contexts) if decode_attention else [contexts[0]]
        by_context = {ctx: _time_candidates(j, family, problem, ok, launcher, ctx, log) for ctx in ctxs}
        timed, weight_bytes = by_context[ctxs[0]]
        best, worst = robust_pick({ctx: t for ctx, (t, _) in by_context.items()})  # one context: its fastest
        best_us = next(us for us, c in timed if c == best)  # the kept config at the first context
        entry = {"key": tuning.problem_key(family, problem), "M": tuning.problem_m(family, problem),
                 "family": family, "problem": problem, "config": best, "us": round(best_us, 2),
                 "candidates": len(timed)}
        if family == "attention":
            entry["GBps"] = round(weight_bytes / best_us / 1e3, 1)
            if problem["phase"] == "prefill":
                t = problem["num_tokens"]
                entry["tflops"] = round(4 * problem["num_heads"] * problem["head_dim"] * t * (t + 1) / 2 / best_us / 1e6, 1)
            else:
                entry["context"] = ctxs[0]
                if len(ctxs) > 1:
                    entry["contexts"] = [{"context": ctx, "us": round(next(us for us, c in t if c == best), 2),
                                          "fastest_us": round(t[0][0], 2), "fastest": t[0][1]}
                                         for ctx, (t, _) in by_context.items()]
                    entry["worst_slowdown"] = round(worst, 3)
        else:
            flops = 2 * problem["M"] * problem["N"] * problem["K"] * (2 if family == "gemm_gated" else 1)
            entry["GBps"] = round((weight_bytes + problem["M"] * problem["K"] * 2) / best_us / 1e3, 1)
            entry["tflops"] = round(flops / best_us / 1e6, 1)
        if best["constexprs"].get("QUANT_A"):
            # a prequantized GEMM looks this entry up too (tuning.measured_form) and has no x to quantize:
            # it takes the fastest config that reads fp8 x (every such time carries the same quant launch)
            entry["prequantized_config"] = next(c for _, c in timed if not c["constexprs"].get("QUANT_A"))
        estimator = registry.family(family).cost_model
        if estimator is not None:  # how far the model's own pick is from the fastest
            pick = cost_model.rank(estimator, problem, [c for _, c in timed], tgt)[0][0]
            entry["cost_model_pick_us"] = round(next(t for t, c in timed if c == pick), 2)
        log(json.dumps(entry))
        results.append(entry)
    return results


def robust_pick(timed: dict[int, list[tuple[float, dict]]]) -> tuple[dict, float]:
    """The config, among those timed at every context, whose worst slowdown against each context's fastest
    (time / fastest time) is smallest, and that slowdown; ties go to the smaller total time."""
    contexts = list(timed)
    times = [{json.dumps(c, sort_keys=True): us for us, c in timed[ctx]} for ctx in contexts]
    fastest = [min(t.values()) for t in times]
    common = [key for key in times[0] if all(key in t for t in times[1:])]
    if not common:
        raise RdnacError(f"no candidate was timed at every context {contexts}")
    worst = {k: max(t[k] / f for t, f in zip(times, fastest)) for k in common}
    key = min(common, key=lambda k: (worst[k], sum(t[k] for t in times)))
    return json.loads(key), worst[key]


def _time_candidates(j: int, family: str, problem: dict, ok: list, launcher, context: int,
                     log) -> tuple[list[tuple[float, dict]], int]:
    """([(us, config)] fastest first, bytes the problem reads) for job j's built candidates, decode attention
    at `context` cached tokens; candidates disagreeing with the default config are logged and left out."""
    if family == "attention":
        ctx = context if problem["phase"] == "decode" else problem["num_tokens"]
        weight_bytes = 2 * problem["num_seqs"] * ctx * problem["num_kv_heads"] * problem["head_dim"] * 2
    else:
        weight_bytes = problem["N"] * problem["K"] * {"gemm": 2, "gemm_gated": 4}.get(family, 1)  # gated: [2N, K]
    copies = max(1, min(16, -(-L2_DEFEAT_BYTES // weight_bytes)))
    sets = _tensors(family, problem, "cuda", copies, context)
    reps = max(copies, 8)
    timed = []
    wrapper = _wrapper(family, problem)
    args, kw = sets[0]
    default = registry.family(family).default_config(problem)
    built = any(jj == j and config == default for jj, config, _ in ok)  # usually: it is in the space
    reference = wrapper(*args, **kw, config=default, launcher=launcher if built else JitLauncher()).float()
    for jj, config, _ in ok:
        if jj != j:
            continue
        wrong = _disagrees(wrapper(*args, **kw, config=config, launcher=launcher).float(), reference)
        if wrong:  # a fast wrong kernel must never win: say so and leave it out
            log(f"{tuning.problem_key(family, problem)}: candidate {config} left out: {wrong}")
            continue
        timed.append((_time(wrapper, sets, reps, config, launcher), config))
    if not timed:
        raise RdnacError(f"{tuning.problem_key(family, problem)} at M={tuning.problem_m(family, problem)}: "
                         f"no candidate agrees with the default config's output (see the log above)")
    timed.sort(key=lambda t: t[0])
    del sets
    torch.cuda.empty_cache()
    return timed, weight_bytes


def _disagrees(out: torch.Tensor, reference: torch.Tensor) -> str:
    """Why a candidate's output is not the default config's within bf16 rounding ('' when it is)."""
    if out.shape != reference.shape:
        return f"shape {tuple(out.shape)}, expected {tuple(reference.shape)}"
    if not torch.isfinite(out).all():
        return "non-finite output"
    scale = reference.abs().max().item() or 1.0
    err = (out - reference).abs().max().item() / scale
    return f"max error {err:.3g} of the output's range (limit 0.02)" if err > 0.02 else ""


def _time(fn, sets, reps, config, launcher) -> float:

    def step(i):
        args, kw = sets[i % len(sets)]
        fn(*args, **kw, config=config, launcher=launcher)

    return graph_time_us(step, reps)


def graph_time_us(step, reps: int) -> float:
    """Microseconds per call of step(i): `reps` calls (i = 0..reps-1) captured in one CUDA graph, the median
    of 5 replays (warmed up once eagerly and once replayed)."""
    step(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            step(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    del graph
    return sorted(times)[2]




def save_results(path, results: list[dict]) -> None:
    """Merge measured entries into the table at `path`, stamped with this GPU and the versions."""
    import rdnac

    tuning.save(path, torch.cuda.get_device_name(), {"rdnac": rdnac.__version__, "torch": torch.__version__,
                                                     "triton": triton.__version__}, results)


def _normalized(problem: dict) -> dict:
    """A plan's problem as the search times it (`tuning.measured_form`, without the fused group)."""
    return {k: v for k, v in tuning.measured_form(problem).items() if k != "group"}


def problems_from_plan(plan_path) -> list[tuple[str, dict]]:
    """The tunable problems (GEMM, FP8 GEMM, gated GEMM, attention) a compiled GPU plan selects configs for, one per
    tile regime: decode at 1 and the plan's batch, middle sizes at 64, prefill at its largest step."""
    from rdnac.compiler.passes.select_kernels import _propagate_meta, meta_env, node_problem
    from rdnac.ir.graph import Graph
    from rdnac.plans import read_plan

    plan = read_plan(plan_path)
    if not plan.body.get("kernels"):
        raise RdnacError(f"{plan.path}: tuning requires a plan compiled for a GPU target; this one is for "
                         f"{plan.header['target']}")
    graph, runtime = Graph.from_dict(plan.body["graph"]), plan.body["runtime"]
    keys = [("decode", 1), ("decode", 64), ("prefill", runtime["max_num_batched_tokens"])]
    if runtime["max_num_seqs"] < 64:
        keys[1] = ("decode", runtime["max_num_seqs"])
    jobs: list[tuple[str, dict]] = []
    for phase, tokens in keys:
        env, _ = meta_env(graph, phase, tokens, runtime)
        for node in graph.nodes:
            if node.op not in registry.VIEW_OPS:
                family, problem = node_problem(node, phase, env, runtime)
                job = (family, _normalized(problem))
                if family in tuning.tuned_families() and job not in jobs:
                    jobs.append(job)
            _propagate_meta(node, env)
    return jobs
