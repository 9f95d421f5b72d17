"""One MoE layer's experts (route + sort + grouped GEMMs + top-k sum) per config, on the GPU machine.

    python bench/moe_layer.py --shapes gpt-oss-20b qwen3-30b-a3b --tokens 1 16 64 2048

Per model shape, weight format and token count: the configs of the family's space that the cost model
finds fit sm90 (its best `--max-configs`, default 6: MXFP4 decode GEMV and W4A16 tiles, MXFP4 prefill
DEQUANT and W4A16 tiles), captured 20 times in a CUDA graph (launch overhead is the GPU's), with the
bytes the step actually reads (the routed experts' weights, counted from the ids, plus activations) as
GB/s and as % of a measured device copy; the cost model's pick is marked. One JSON line per measurement,
then a table of the best and the picked config per case and the MXFP4 / bf16 time per shape and batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdnac.compiler import cost_model  # noqa: E402
from rdnac.ir import mxfp4  # noqa: E402
from rdnac.kernels import moe, moe_route  # noqa: E402
from rdnac.kernels.launch import JitLauncher  # noqa: E402
from rdnac.kernels.moe_configs import experts_config_space  # noqa: E402
from rdnac.targets import get_target  # noqa: E402

SHAPES = {  # (experts, top_k, hidden, intermediate, formats, act)
    "gpt-oss-20b": (32, 4, 2880, 2880, ("mxfp4", "dense"), "swiglu_oai"),
    "qwen3-30b-a3b": (128, 8, 2048, 768, ("dense",), "silu"),
}
ROUTE = {"constexprs": {}, "num_warps": 1, "num_stages": 1}


def _graph_time(fn, reps: int = 20, replays: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (reps * replays)


def _copy_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = _graph_time(lambda: dst.copy_(src), reps=5)
    return 2 * src.numel() / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 64, 2048])
    parser.add_argument("--max-configs", type=int, default=6, help="the cost model's best N feasible configs")
    args = parser.parse_args()
    results: dict[tuple, list[dict]] = {}
    launcher, target = JitLauncher(), get_target("sm90")
    copy = _copy_gbps()
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbps": round(copy, 1)}), flush=True)
    for shape in args.shapes:
        E, k, H, I, formats, act = SHAPES[shape]
        w13 = torch.randn(E, 2 * I, H, device="cuda") / H ** 0.5
        w2 = torch.randn(E, H, I, device="cuda") / I ** 0.5
        for fmt in formats:
            if fmt == "mxfp4":
                q13, q2 = ([mxfp4.quantize(w[e]) for e in range(E)] for w in (w13, w2))  # per expert: memory
                weights = [torch.stack(t) for q in (q13, q2) for t in zip(*q)]
                run = moe.moe_experts_mxfp4
            else:
                weights = [w13.to(torch.bfloat16), w2.to(torch.bfloat16)]
                run = moe.moe_experts
            per_expert = sum(w[0].numel() * w.element_size() for w in weights)
            for T in args.tokens:
                x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
                logits = torch.randn(T, E, device="cuda")
                problem = {"op": "moe_experts", "M": T, "E": E, "H": H, "I": I, "top_k": k, "dtype": "bfloat16",
                           "weight_format": fmt, "has_bias": False, "act": act}
                ranked = cost_model.rank("moe", problem, experts_config_space(problem), target)
                active = moe_route.moe_route(logits, top_k=k, scoring="topk_softmax", config=ROUTE,
                                             launcher=launcher)[1].unique().numel()
                read = active * per_expert + T * H * 2 * 2 + T * k * (I * 2 * 2 + H * 4 * 2)
                for rank, (config, est) in enumerate(ranked[:args.max_configs]):
                    if not est.is_feasible:
                        continue

                    def step():
                        rw, ids = moe_route.moe_route(logits, top_k=k, scoring="topk_softmax", config=ROUTE,
                                                      launcher=launcher)
                        return run(x, rw, ids, *weights, act=act, config=config, launcher=launcher)

                    try:
                        seconds = _graph_time(step)
                    except Exception as e:  # noqa: BLE001 (a config the JIT refuses is reported, not fatal)
                        print(json.dumps({"shape": shape, "format": fmt, "T": T, "config": config,
                                          "error": str(e).splitlines()[0]}), flush=True)
                        continue
                    gbps = read / seconds / 1e9
                    line = {"shape": shape, "format": fmt, "T": T, "active_experts": active,
                            "config": config["constexprs"], "warps": config["num_warps"],
                            "stages": config["num_stages"], "cost_model_rank": rank,
                            "us": round(seconds * 1e6, 1), "bytes_read": read,
                            "gbps": round(gbps, 1), "pct_copy": round(100 * gbps / copy, 1)}
                    results.setdefault((shape, fmt, T), []).append(line)
                    print(json.dumps(line), flush=True)
    _summary(results)


def _tile(line: dict) -> str:
    c = line["config"]
    path = "gemv" if c.get("GEMV") else "dequant" if c.get("DEQUANT") else "w4a16" if line["format"] == "mxfp4" else ""
    return f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{line['warps']}s{line['stages']} {path}".strip()


def _summary(results: dict[tuple, list[dict]]) -> None:
    """Best and picked config per case; MXFP4 time over bf16 time per shape and token count."""
    print(f"\n{'shape':15} {'format':6} {'T':>5} | {'best us':>8} {'%copy':>6} {'best tile':28} | "
          f"{'pick us':>8} {'%copy':>6} {'pick tile':28} | pick/best")
    best_us = {}
    for (shape, fmt, T), lines in results.items():
        best = min(lines, key=lambda x: x["us"])
        pick = next((x for x in lines if x["cost_model_rank"] == min(y["cost_model_rank"] for y in lines)), best)
        best_us[shape, fmt, T] = best["us"]
        print(f"{shape:15} {fmt:6} {T:>5} | {best['us']:>8.1f} {best['pct_copy']:>6.1f} {_tile(best):28} | "
              f"{pick['us']:>8.1f} {pick['pct_copy']:>6.1f} {_tile(pick):28} | {pick['us'] / best['us']:.2f}")
    for (shape, fmt, T), us in best_us.items():
        if fmt == "mxfp4" and (shape, "dense", T) in best_us:
            print(f"{shape} T={T}: mxfp4 / bf16 best time = {us / best_us[shape, 'dense', T]:.2f} "
                  f"(issue 24 goal at T=1: <= 0.35)")


if __name__ == "__main__":
    main()
