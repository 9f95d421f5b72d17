"""Build the shipped tuning tables from model shapes: GEMM and attention configs searched on this GPU.

    python -m rdnac.bench.tune_shapes --shapes qwen3-8b llama3-8b --out rdnac/compiler/tuned/sm90.json

The search itself is `rdnac.compiler.tune` (what `rdnac tune PLAN` runs for
a compiled plan); this script lists problems by model shape instead. For
every linear of the shapes (merged qkv and gate_up, o, down, logits; for bf16 also gate_up with its
gated activation, the `gemm_gated` family) and
M in --m (1 stands for the whole decode regime M <= 16): the family's config
space plus wider decode and prefill candidates, each built for the target
through the plan path (`rdnac.compiler.tuning` explains the method), timed,
and the fastest stored with its time, its bandwidth or TFLOP/s, and the
time of the cost model's own pick for comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rdnac.compiler.tune import CONTEXT, save_results, search
from rdnac.testing.fp8 import SHAPES

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
        if not FP8_SCHEMES[scheme]:  # a bf16 plan's gate_up GEMM carries its activation (fuse_gated_linear)
            out.append(("gemm_gated", {"M": m, "N": i, "K": h, "dtype": "bfloat16", "act": "silu"}))  # every SHAPES model
    return out


def attention_problems(shape: str, batches: list[int], prefill: list[int]) -> list[tuple[str, dict]]:
    s = SHAPES[shape]
    base = {"num_heads": s["heads"], "num_kv_heads": s["kv_heads"], "head_dim": s["head_dim"], "block_size": 16,
            "max_model_len": 4096, "dtype": "bfloat16"}
    return ([("attention", dict(base, phase="decode", num_seqs=b, num_tokens=b)) for b in batches]
            + [("attention", dict(base, phase="prefill", num_seqs=1, num_tokens=t)) for t in prefill])


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m rdnac.bench.tune_shapes", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["qwen3-8b", "llama3-8b", "smollm2"], choices=sorted(SHAPES))
    ap.add_argument("--schemes", nargs="+", default=["bf16"], choices=sorted(FP8_SCHEMES))
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 2048])
    ap.add_argument("--attention", action="store_true", help="Also decode and prefill attention.")
    ap.add_argument("--decode-batches", type=int, nargs="*", default=[1, 64],
                    help="decode attention batch sizes with --attention (none: prefill only)")
    ap.add_argument("--prefill", type=int, nargs="*", default=[2048])
    ap.add_argument("--context", type=int, nargs="+", default=[CONTEXT],
                    help=f"cached tokens per sequence for decode attention (default {CONTEXT}; the issue-6 "
                         f"harness decodes at 256). Several: each candidate is timed at each, and the entry keeps "
                         f"the config with the smallest worst slowdown (rdnac.compiler.tune.robust_pick)")
    ap.add_argument("--families", nargs="+", default=["gemm", "gemm_fp8", "gemm_gated", "attention"],
                    help="Tune only these kernel families.")
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
            jobs += [j for j in attention_problems(shape, args.decode_batches, args.prefill) if j not in jobs]
    results = search([j for j in jobs if j[0] in args.families], args.target, contexts=tuple(args.context))
    save_results(args.out, results)


if __name__ == "__main__":
    main()
