"""Search GEMM and attention configs on this GPU and store the winners in the tuning table (GPU machine).

    python bench/tune_kernels.py --shapes qwen3-8b llama-8b --out rdnac/compiler/tuned/sm90.json

For every linear of the shapes (merged qkv and gate_up, o, down, logits) and
M in --m (1 stands for the whole decode regime M <= 16): the family's config
space plus wider decode and prefill candidates, each built for the target
through the plan path (`rdnac.compiler.tuning` explains the method), timed,
and the fastest stored with its time, its bandwidth or TFLOP/s, and the
time of the cost model's own pick for comparison.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rdnac.compiler import cost_model, tuning  # noqa: E402
from rdnac.compiler.build import check_resources, compile_calls  # noqa: E402
from rdnac.kernels.launch import RecordingLauncher  # noqa: E402
from rdnac.runtime.aot import AotLauncher  # noqa: E402
from rdnac.targets import get_target  # noqa: E402
from harness import SHAPES  # noqa: E402

L2_DEFEAT_BYTES = 256 << 20
CONTEXT = 1024  # decode attention is timed at this many cached tokens per sequence
FP8_SCHEMES = {"bf16": None,
               "fp8-block": dict(weight_scheme="block", act_scheme="dynamic_group", block_size=[128, 128]),
               "fp8-tensor": dict(weight_scheme="channel", act_scheme="dynamic_token", block_size=None),
               # per-tensor checkpoints: merged q/k/v and gate/up become per-channel, o_proj/down_proj stay per-tensor
               "fp8-tensor-unmerged": dict(weight_scheme="tensor", act_scheme="dynamic_token", block_size=None)}


def problems(shape: str, scheme: str, ms: list[int]) -> list[tuple[str, dict]]:
    s = SHAPES[shape]
    h, d, i = s["hidden"], s["head_dim"], s["intermediate"]
    dims = [((s["heads"] + 2 * s["kv_heads"]) * d, h), (h, s["heads"] * d), (2 * i, h), (h, i)]
    out = []
    for m in ms:
        for n, k in dims + ([(s["vocab"], h)] if m <= 64 else []):
            fp8 = FP8_SCHEMES[scheme] if (n, k) != (s["vocab"], h) else None  # lm_head stays bf16
            if fp8:
                out.append(("gemm_fp8", {"M": m, "N": n, "K": k, "dtype": "bfloat16", "has_bias": False,
                                         "fp8_format": "e4m3fn", **fp8}))
            else:
                out.append(("gemm", {"M": m, "N": n, "K": k, "dtype": "bfloat16", "has_bias": False}))
    return out


def attention_problems(shape: str, batches: list[int], prefill: list[int]) -> list[tuple[str, dict]]:
    s = SHAPES[shape]
    base = {"num_heads": s["heads"], "num_kv_heads": s["kv_heads"], "head_dim": s["head_dim"], "block_size": 16,
            "max_model_len": 4096, "dtype": "bfloat16"}
    return ([("attention", dict(base, phase="decode", num_seqs=b, num_tokens=b)) for b in batches]
            + [("attention", dict(base, phase="prefill", num_seqs=1, num_tokens=t)) for t in prefill])


def _acfg(warps, stages, **constexprs):
    return {"constexprs": constexprs, "num_warps": warps, "num_stages": stages}


def _cfg(bm, bn, bk, group, split, warps, stages):
    return {"constexprs": {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_SIZE_M": group, "SPLIT_K": split},
            "num_warps": warps, "num_stages": stages}


def candidates(family: str, problem: dict) -> list[dict]:
    module = importlib.import_module(f"rdnac.kernels.{family}")
    space = list(module.config_space(problem))
    if family == "attention":
        if problem["phase"] == "decode":
            extra = [_acfg(w, st, NUM_SPLITS=s, BLOCK_N=n) for s in (1, 2, 4, 8, 16, 32) for n in (16, 32, 64, 128)
                     for w, st in ((4, 3), (2, 2), (8, 2))]
        else:
            extra = [_acfg(w, st, BLOCK_M=m, BLOCK_N=n) for m, n, w, st in
                     ((128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2),
                      (128, 32, 8, 3), (64, 128, 8, 2), (128, 128, 8, 3))]
        return [c for j, c in enumerate(space + extra) if c not in (space + extra)[:j]]
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
                        extra.append(_cfg(16, bn, bk, 1, split, 4, stages))
    elif M > 256:
        for bn, bk, warps, stages in ((256, 64, 8, 3), (256, 64, 8, 4), (128, 64, 8, 4), (128, 128, 8, 3),
                                      (128, 64, 4, 4)):
            if not (block_scale and bk != 128):
                extra.append(_cfg(128, bn, bk, 8, 1, warps, stages))
    return [c for j, c in enumerate(space + extra) if c not in (space + extra)[:j]]


def _attention_tensors(problem: dict, device: str, copies: int, context: int):
    hq, hk, d, bs = problem["num_heads"], problem["num_kv_heads"], problem["head_dim"], problem["block_size"]
    decode = problem["phase"] == "decode"
    b = problem["num_seqs"]
    t = b if decode else problem["num_tokens"]
    ctx = context if decode else t
    per_seq = -(-ctx // bs)
    make = (lambda *shape, dtype=torch.bfloat16: torch.empty(shape, dtype=dtype, device="meta")) if device == "meta" \
        else (lambda *shape, dtype=torch.bfloat16: torch.randn(shape, device=device).to(dtype))
    q = make(t, hq * d)
    ints = (lambda v: torch.empty(len(v), dtype=torch.int32, device="meta")) if device == "meta" \
        else (lambda v: torch.tensor(v, dtype=torch.int32, device=device))
    tables = torch.arange(b * per_seq, dtype=torch.int32).reshape(b, per_seq)
    tables = torch.empty(b, per_seq, dtype=torch.int32, device="meta") if device == "meta" else tables.to(device)
    seq_lens = ints([ctx] * b)
    cu = ints(list(range(b + 1)) if decode else [0, t])
    positions = ints([ctx - 1] * b if decode else list(range(t)))
    kw = dict(num_heads=hq, num_kv_heads=hk, head_dim=d, scale=d ** -0.5)
    if not decode:
        kw["max_query_len"] = t
    sets = []
    for _ in range(copies):
        k_cache, v_cache = make(b * per_seq, bs, hk, d), make(b * per_seq, bs, hk, d)
        sets.append(((q, k_cache, v_cache, tables, seq_lens, cu, positions), kw))
    return sets


def _tensors(family: str, problem: dict, device: str, copies: int, context: int = 1024):
    if family == "attention":
        return _attention_tensors(problem, device, copies, context)
    M, N, K = problem["M"], problem["N"], problem["K"]
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    sets = []
    for c in range(copies):
        if family == "gemm":
            w = (0.02 * torch.randn(N, K, device=device)).to(torch.bfloat16) if device != "meta" else \
                torch.empty(N, K, device="meta", dtype=torch.bfloat16)
            sets.append(((x, w), {}))
        else:
            w = (torch.randn(N, K, device=device) * 64).to(torch.float8_e4m3fn) if device != "meta" else \
                torch.empty(N, K, device="meta", dtype=torch.float8_e4m3fn)
            shape = {"block": ((N + 127) // 128, (K + 127) // 128), "channel": (N,), "tensor": (1,)}[problem["weight_scheme"]]
            scale = torch.full(shape, 1e-3, device=device) if device != "meta" else torch.empty(shape, device="meta")
            sets.append(((x, w, scale), {k: problem[k] for k in ("weight_scheme", "act_scheme", "fp8_format",
                                                                  "block_size")}))
    return sets


def _wrapper(family: str, problem: dict | None = None):
    from rdnac.kernels import attention, gemm, gemm_fp8

    if family == "attention":
        return attention.attention_decode if problem["phase"] == "decode" else attention.attention_prefill
    return gemm.linear if family == "gemm" else gemm_fp8.linear_fp8


def search(jobs: list[tuple[str, dict]], target: str) -> list[dict]:
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
    print(f"built {len(binaries)} binaries for {len(plan)} candidates in {time.perf_counter() - started:.0f} s",
          flush=True)
    ok, pos = [], 0
    for j, config, calls in plan:
        bins = binaries[pos:pos + len(calls)]
        pos += len(calls)
        if not any(check_resources(b, tgt) for b in bins):
            ok.append((j, config, bins))
    launcher = AotLauncher([b.to_dict() for _, _, bins in ok for b in bins], "cuda")
    results = []
    for j, (family, problem) in enumerate(jobs):
        if family == "attention":
            ctx = CONTEXT if problem["phase"] == "decode" else problem["num_tokens"]
            weight_bytes = 2 * problem["num_seqs"] * ctx * problem["num_kv_heads"] * problem["head_dim"] * 2
        else:
            weight_bytes = problem["N"] * problem["K"] * (2 if family == "gemm" else 1)
        copies = max(1, min(16, -(-L2_DEFEAT_BYTES // weight_bytes)))
        sets = _tensors(family, problem, "cuda", copies, CONTEXT)
        reps = max(copies, 8)
        timed = []
        for jj, config, _ in ok:
            if jj != j:
                continue
            timed.append((_time(_wrapper(family, problem), sets, reps, config, launcher), config))
        timed.sort(key=lambda t: t[0])
        best_us, best = timed[0]
        entry = {"key": tuning.problem_key(family, problem), "M": tuning.problem_m(family, problem),
                 "family": family, "problem": problem, "config": best, "us": round(best_us, 2),
                 "candidates": len(timed)}
        if family == "attention":
            entry["GBps"] = round(weight_bytes / best_us / 1e3, 1)
            if problem["phase"] == "prefill":
                t = problem["num_tokens"]
                entry["tflops"] = round(4 * problem["num_heads"] * problem["head_dim"] * t * (t + 1) / 2 / best_us / 1e6, 1)
            else:
                entry["context"] = CONTEXT
        else:
            flops = 2 * problem["M"] * problem["N"] * problem["K"]
            entry["GBps"] = round((weight_bytes + problem["M"] * problem["K"] * 2) / best_us / 1e3, 1)
            entry["tflops"] = round(flops / best_us / 1e6, 1)
        if family == "gemm":
            pick = cost_model.rank("gemm", problem, [c for _, c in timed], tgt)[0][0]
            entry["cost_model_pick_us"] = round(next(t for t, c in timed if c == pick), 2)
        print(json.dumps(entry), flush=True)
        results.append(entry)
        del sets
        torch.cuda.empty_cache()
    return results


def _time(fn, sets, reps, config, launcher) -> float:

    def step(i):
        args, kw = sets[i % len(sets)]
        fn(*args, **kw, config=config, launcher=launcher)

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["qwen3-8b", "llama-8b", "smollm2"], choices=sorted(SHAPES))
    ap.add_argument("--schemes", nargs="+", default=["bf16"], choices=sorted(FP8_SCHEMES))
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 2048])
    ap.add_argument("--attention", action="store_true", help="Also decode (batch 1, 64) and prefill attention.")
    ap.add_argument("--prefill", type=int, nargs="+", default=[2048])
    ap.add_argument("--target", default="sm90")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    jobs = []
    for shape in args.shapes:
        for scheme in args.schemes:
            for job in problems(shape, scheme, args.m):
                if job not in jobs:
                    jobs.append(job)
        if args.attention:
            jobs += [j for j in attention_problems(shape, [1, 64], args.prefill) if j not in jobs]
    results = search(jobs, args.target)
    import rdnac

    tuning.save(args.out, torch.cuda.get_device_name(), {"rdnac": rdnac.__version__, "torch": torch.__version__,
                                                          "triton": triton.__version__}, results)


if __name__ == "__main__":
    main()
