"""Decode with the KV cache in bf16 and in FP8, in one run, on the GPU machine (issue 29, build item 4).

    python bench/fp8_kv.py --out /tmp/fp8_kv                      # Qwen3-8B shapes, bf16 weights, context 8192
    python bench/fp8_kv.py --shapes qwen3-8b --scheme fp8-block --context 8192 16384

Writes a random checkpoint of the shapes (`rdnac.testing.fp8.SHAPES`), compiles it for the GPU twice
(`--kv-cache-dtype auto` and `fp8`), loads both plans side by side and times batch-1 decode steps at each
context (CUDA graphs, as `rdnac bench` does), alternating the plans so clock and thermal drift fall on
both: bf16, fp8, bf16, fp8; each record is the median of its rounds. Prints one JSON line per plan and
context (TPOT, achieved GB/s against the device's copy bandwidth, bytes per step, KV bytes per token)
and a summary line with the speedup. Needs about 2 x the weights in GPU memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rdnac  # noqa: E402
from rdnac.bench.decode import copy_bandwidth, decode_bytes, tpot  # noqa: E402
from rdnac.ir.state import bytes_per_token  # noqa: E402
from rdnac.testing.fp8 import SHAPES, write_random_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="qwen3-8b", choices=sorted(SHAPES))
    p.add_argument("--scheme", default=None, help="FP8 weights (fp8-block, fp8-tensor); default bf16 weights")
    p.add_argument("--context", type=int, nargs="+", default=[8192])
    p.add_argument("--target", default="sm90")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per plan")
    p.add_argument("--steps", type=int, default=50, help="decode steps per measurement")
    p.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    args = p.parse_args(argv)

    work = args.out or Path(tempfile.mkdtemp(prefix="fp8_kv_"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{args.shapes}.{args.scheme or 'bf16'}"
    started = time.perf_counter()
    if not (ckpt / "config.json").exists():
        write_random_checkpoint(ckpt, **SHAPES[args.shapes], scheme=args.scheme)
    print(f"# checkpoint {ckpt} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    max_len = max(args.context) + 64
    plans = {}
    for kv in ("auto", "fp8"):
        t0 = time.perf_counter()
        plans[kv] = rdnac.compile(ckpt, args.target, work / f"{kv}.{args.target}.msgpack", quiet=True,
                                  kv_cache_dtype=kv, max_model_len=max_len, max_num_seqs=1)
        print(f"# compiled kv {kv} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    blocks = -(-(max_len + 1) // 16) + 8  # one sequence at the longest context (KV block 16, the default)
    llms = {kv: rdnac.load(path, device="cuda", verify_weights=False, max_num_seqs=1, num_blocks=blocks)
            for kv, path in plans.items()}
    copy_gbps = copy_bandwidth()
    device = torch.cuda.get_device_name()
    results = {}
    for context in args.context:
        times = {kv: [] for kv in llms}
        for _ in range(args.rounds):
            for kv, llm in llms.items():
                times[kv].append(tpot(llm, 1, context, steps=args.steps))
        for kv, llm in llms.items():
            t = statistics.median(times[kv])
            read = decode_bytes(llm, 1, context)
            results[(kv, context)] = t
            print(json.dumps({
                "bench": "fp8_kv", "device": device, "shapes": args.shapes, "weights": args.scheme or "bf16",
                "kv_cache": {s.dtype for s in llm.graph.state}.pop(), "batch": 1, "context": context,
                "tpot_ms": round(t * 1e3, 3), "rounds_ms": [round(x * 1e3, 3) for x in times[kv]],
                "kv_bytes_per_token": bytes_per_token(llm.graph.state), "bytes_read_GB": round(read / 1e9, 3),
                "achieved_GBps": round(read / t / 1e9, 1), "pct_of_copy": round(100 * read / t / 1e9 / copy_gbps, 1),
                "copy_GBps": round(copy_gbps, 1)}), flush=True)
        speedup = results[("auto", context)] / results[("fp8", context)]
        print(json.dumps({"bench": "fp8_kv", "summary": True, "device": device, "context": context,
                          "bf16_kv_tpot_ms": round(results[("auto", context)] * 1e3, 3),
                          "fp8_kv_tpot_ms": round(results[("fp8", context)] * 1e3, 3),
                          "fp8_kv_faster": speedup > 1, "speedup": round(speedup, 4)}), flush=True)
    print(f"# total {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
