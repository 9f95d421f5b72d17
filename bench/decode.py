"""Decode TPOT of an sm90 plan, graphs vs eager, with achieved bandwidth (GPU machine).

    python bench/decode.py --shape smollm2 --batch 1 4 16 64

Builds a random-weight checkpoint of the shape with transformers, compiles it
for sm90, and measures in one run: device copy bandwidth, prefill, and
decode TPOT per batch size (graphs and --enforce-eager). Prints one JSON
line per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rdnac  # noqa: E402
from rdnac.runtime.model_runner import StepEntry  # noqa: E402
from tests.support.checkpoints import make_checkpoint  # noqa: E402
from tests.test_gpu_models import SHAPES  # noqa: E402


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - start) / 1e9  # read + write, GB/s


def tpot(engine, batch: int, context: int, steps: int = 50) -> float:
    """Seconds per decode step for `batch` sequences at `context` tokens (KV already allocated)."""
    per_seq = -(-(context + 1) // engine.runner.block_size)
    entries = []
    for b in range(batch):
        blocks = engine.engine.block_manager.take_blocks(per_seq)
        entries.append(StepEntry([1] * (context + 1), blocks, context, context + 1))
    for _ in range(5):
        engine.runner.execute(entries)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.runner.execute(entries)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    for e in entries:
        engine.engine.block_manager.free(e.block_table)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-smollm2")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args()
    family, overrides = SHAPES[args.shape]
    work = Path(tempfile.mkdtemp())
    make_checkpoint(family, work / "ckpt", **overrides)
    started = time.perf_counter()
    plan = rdnac.compile(work / "ckpt", target="sm90", output=work / "plan.msgpack", quiet=True)
    compile_s = time.perf_counter() - started
    bw = copy_bandwidth()
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_GBps": round(bw, 1),
                      "shape": args.shape, "compile_s": round(compile_s, 1)}))
    weight_bytes = (work / "plan.weights.safetensors").stat().st_size
    for eager in (False, True):
        engine = rdnac.load(plan, device="cuda", enforce_eager=eager)
        a = engine.graph.attrs
        kv_per_token = 2 * a["num_layers"] * a["num_kv_heads"] * a["head_dim"] * 2
        for batch in args.batch:
            t = tpot(engine, batch, args.context)
            read = weight_bytes + batch * args.context * kv_per_token
            print(json.dumps({"mode": "eager" if eager else "graphs", "batch": batch, "context": args.context,
                              "tpot_ms": round(t * 1e3, 3), "tokens_per_s": round(batch / t, 1),
                              "achieved_GBps": round(read / t / 1e9, 1),
                              "pct_of_copy": round(100 * read / t / 1e9 / bw, 1)}))
        del engine
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
