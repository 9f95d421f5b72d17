"""Issue 29 item 3: paged causal prefill attention in TFLOP/s, the new kernel against the one before it.

    PYTHONPATH=$PWD python bench/prefill_attention29.py --out $OUT/attn29          # on the GPU machine (sm90)
    PYTHONPATH=$PWD python bench/prefill_attention29.py --tiny --out /tmp/attn29   # cpu dry run (interpreter)

Qwen3-8B / Llama-3.1-8B attention widths (32 query heads, 8 kv heads, head_dim 128, bf16, 16-token cache
blocks, block tables shuffled like the runtime's), one sequence per case:
  2048         a 2048-token prompt          16384        a 16384-token prompt
  8192+8192    a chunk of 8192 tokens after 8192 already in the cache (chunked prefill)

FLOPs = 4 * num_heads * head_dim * pairs: QK^T and PV, 2 FLOPs a multiply-add, over the causal (query, key)
pairs, T(T+1)/2 for a whole prompt of T tokens and C*P + C(C+1)/2 for a chunk of C after P cached tokens
(the tuner's count, `rdnac.compiler.tune`; masked halves of diagonal tiles are not counted). Per layer:
the whole-model prefill runs this once per layer.

Kernels and configs: `new` is rdnac.kernels.attention at the sm90 tuning table's config (what a plan picks
today), the cost model's first pick, every 128-row wide tile of the config space and the default; `base` is the kernel before
issue 29 (bench/prefill_attention_base.py) at the table's config and 128x64 (8 warps, 3 stages). Each is
checked against the op's reference (rdnac.ir.ops.attention) on the first and last 64 query tokens
(the reference materializes [heads, queries, keys] in float32), then timed as a captured CUDA graph of
back-to-back calls (median of 5 replays). Writes OUT/results.jsonl and OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefill_attention_base import _prefill_kernel_base  # noqa: E402

from rdnac.compiler import cost_model, tune, tuning  # noqa: E402
from rdnac.ir import ops  # noqa: E402
from rdnac.kernels import attention  # noqa: E402
from rdnac.kernels.launch import InterpretLauncher, JitLauncher  # noqa: E402
from rdnac.targets import get_target  # noqa: E402

BLOCK_SIZE = 16


class BaseKernel:
    """Launches the pre-issue-29 kernel wherever the wrapper launches the current one (same arguments)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def launch(self, kernel, grid, args, *, constexprs, num_warps=4, num_stages=2):
        kernel = _prefill_kernel_base if kernel is attention._prefill_kernel else kernel
        self.inner.launch(kernel, grid, args, constexprs=constexprs, num_warps=num_warps, num_stages=num_stages)


def causal_pairs(prefix: int, chunk: int) -> int:
    return chunk * prefix + chunk * (chunk + 1) // 2


def make_case(prefix: int, chunk: int, hq: int, hk: int, d: int, device: str, seed: int = 0):
    """(wrapper args, wrapper keywords) of one sequence: `chunk` new tokens after `prefix` cached ones."""
    gen = torch.Generator().manual_seed(seed)
    ctx = prefix + chunk
    blocks = -(-ctx // BLOCK_SIZE)
    table = (torch.randperm(blocks, generator=gen).to(torch.int32) + 1)[None]  # block 0 stays unused
    k_cache, v_cache = (torch.randn(blocks + 1, BLOCK_SIZE, hk, d, generator=gen).to(torch.bfloat16).to(device)
                        for _ in range(2))
    q = torch.randn(chunk, hq * d, generator=gen).to(torch.bfloat16).to(device)
    ints = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    args = (q, k_cache, v_cache, table.to(device), ints([ctx]), ints([0, chunk]),
            torch.arange(prefix, ctx, device=device))
    kw = dict(num_heads=hq, num_kv_heads=hk, head_dim=d, scale=d ** -0.5, max_query_len=chunk)
    return args, kw


def reference_rows(args, kw, rows: torch.Tensor) -> torch.Tensor:
    """ops.attention for the query tokens `rows` only (their positions carry the causal mask)."""
    q, k_cache, v_cache, table, seq_lens, _, positions = args
    attrs = {k: v for k, v in kw.items() if k != "max_query_len"}
    cu = torch.tensor([0, rows.numel()], dtype=torch.int32, device=q.device)
    return ops.attention(q[rows], k_cache, v_cache, table, seq_lens, cu, positions[rows], **attrs)


def check(out: torch.Tensor, args, kw, rows: torch.Tensor) -> float:
    """Max abs error against the reference on `rows`; raises past bf16 tolerance."""
    expected = reference_rows(args, kw, rows).float()
    err = (out[rows].float() - expected).abs().max().item()
    if not (torch.isfinite(out[rows]).all() and err <= 2e-2 + 2e-2 * expected.abs().max().item()):
        raise AssertionError(f"max abs error {err} against the reference")
    return err


def time_us(fn, device: str, reps: int) -> float:
    if device == "cpu":  # the dry run: the interpreter, timed once (checks the path, not the speed)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    return tune.graph_time_us(lambda i: fn(), reps)


def label(config: dict) -> str:
    c = config["constexprs"]
    return f"{c['BLOCK_M']}x{c['BLOCK_N']} w{config['num_warps']} s{config['num_stages']}"


def configs_for(problem: dict, tiny: bool) -> list[tuple[str, dict, str]]:
    """(kernel, config, why) rows of one case."""
    table = tuning.lookup("sm90", "attention", problem)
    table_config = table["config"] if table else attention._config(8, 4, BLOCK_M=128, BLOCK_N=128)
    space = attention.config_space(problem)
    pick = cost_model.rank("attention", problem, space, get_target("sm90"))[0][0]
    if tiny:
        wide = [attention._config(4, 2, BLOCK_M=32, BLOCK_N=16)]
        table_config, pick = attention._config(4, 2, BLOCK_M=64, BLOCK_N=32), attention.default_config(problem)
    else:
        # the 128-row wide tiles (the H100/H200 tuner runs put 128-row tiles first: sm90.json)
        wide = [attention._config(w, st, BLOCK_M=m, BLOCK_N=n) for m, n, w, st in attention._WIDE_PREFILL_TILES
                if m == 128]
        wide = [c for c in wide if c in space] + [attention.default_config(problem)]
    rows = [("new", table_config, "sm90 table" + (" = cost model pick" if pick == table_config else ""))]
    rows += [("new", pick, "cost model pick")] if pick != table_config else []
    rows += [("new", c, "space") for c in wide if c not in (table_config, pick)]
    # Plans launch with PDL, whose 128x128 binaries at 3-4 stages spill 2 registers under Triton 3.6: the
    # kernel before issue 29 then fell to the family default (64x32); the new selection to 128x128 at 2 stages.
    default = attention.default_config(problem)
    rows += [("base", table_config, "sm90 table"), ("base", default, "family default: old plans' PDL fallback"),
             ("base", attention._config(8, 3, BLOCK_M=128, BLOCK_N=64), "")]
    return [(kernel, c, "dry run") for kernel, c, _ in rows] if tiny else rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="cpu dry run: tiny widths under the Triton interpreter")
    p.add_argument("--cases", nargs="+", default=None, help="e.g. 2048 16384 8192+8192 (prefix+chunk)")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    hq, hk, d = (4, 1, 64) if args.tiny else (32, 8, 128)
    cases = args.cases or (["40", "100", "30+50"] if args.tiny else ["2048", "16384", "8192+8192"])
    args.out.mkdir(parents=True, exist_ok=True)
    results = (args.out / "results.jsonl").open("w")
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run, Triton interpreter)",
           "torch": torch.__version__, "triton": __import__("triton").__version__}
    print(json.dumps(env), file=results, flush=True)
    lines = [f"Device: {env['device']}, torch {env['torch']}, Triton {env['triton']}; {hq}/{hk} heads x {d}, bf16",
             "", "| case | kernel | config | why | us | TFLOP/s | max err |", "|---|---|---|---|---|---|---|"]
    launcher = InterpretLauncher() if args.tiny else JitLauncher()
    failed = 0
    for case in cases:
        prefix, chunk = (int(x) for x in case.split("+")) if "+" in case else (0, int(case))
        call_args, kw = make_case(prefix, chunk, hq, hk, d, device)
        problem = {"phase": "prefill", "num_heads": hq, "num_kv_heads": hk, "head_dim": d, "block_size": BLOCK_SIZE,
                   "max_model_len": 32768, "dtype": "bfloat16", "kv_dtype": "bfloat16", "num_seqs": 1,
                   "num_tokens": chunk}
        flops = 4 * hq * d * causal_pairs(prefix, chunk)
        n = min(64, chunk)
        rows = torch.cat([torch.arange(n), torch.arange(chunk - n, chunk)]).unique().to(device)
        for kernel, config, why in configs_for(problem, args.tiny):
            run_launcher = launcher if kernel == "new" else BaseKernel(launcher)
            record = {"case": case, "prefix": prefix, "tokens": chunk, "kernel": kernel, "config": config, "why": why,
                      "flops": flops}
            try:
                out = attention.attention_prefill(*call_args, **kw, config=config, launcher=run_launcher)
                record["max_err"] = check(out, call_args, kw, rows)
                del out
                us = time_us(lambda: attention.attention_prefill(*call_args, **kw, config=config,
                                                                 launcher=run_launcher), device, args.reps)
                record.update(us=round(us, 2), tflops=round(flops / us / 1e6, 1))
                lines.append(f"| {case} | {kernel} | {label(config)} | {why} | {us:.1f} | {record['tflops']:.1f} | "
                             f"{record['max_err']:.3g} |")
            except Exception as e:  # a config that fails to build or run is a row, the others still run
                failed += 1
                record["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                lines.append(f"| {case} | {kernel} | {label(config)} | {why} | failed: {type(e).__name__} | | |")
            print(json.dumps(record), file=results, flush=True)
            print(lines[-1], flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
