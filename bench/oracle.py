"""What would a decode step cost without some of its kernels? (GPU machine; timing only, outputs are garbage)

    python bench/oracle.py --shape qwen3-8b --batch 1 4 --skip rms_norm qk_norm_rope_cache attention

Compiles (or reuses) a random-weight sm90 plan of the shape, then captures the
decode graphs again with the launches of the named IR ops left out (each
left-out op passes an input of the right shape through instead) and times
batch-1/4 steps. The difference to the full step bounds what fusing those
ops away can save. A measurement aid only: the skipped steps compute nothing
meaningful.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import rdnac  # noqa: E402
from rdnac.testing.fp8 import SHAPES, write_random_checkpoint  # noqa: E402
from decode import copy_bandwidth, tpot  # noqa: E402
from harness import CONTEXT, decode_bytes  # noqa: E402


def _pass_through(op: str):
    """A stand-in for `op`'s wrapper that launches nothing and returns inputs of the outputs' shapes."""
    if op == "rms_norm":
        return lambda x, *rest, **kw: (x, x) if len(rest) == 2 else x
    if op in ("qk_norm_rope_cache", "attention"):
        return lambda q, *rest, **kw: q
    if op == "gated_act":
        return lambda x, **kw: x[:, : x.shape[1] // 2]
    raise SystemExit(f"oracle: no pass-through for op {op!r}")


def with_skipped(engine, ops: tuple[str, ...]) -> None:
    """Re-capture the engine's decode graphs with the launches of `ops` left out."""
    ex = engine.runner._executor
    skip = {node.name for node in engine.graph.nodes if node.op in ops}
    real = ex.program
    fake_names = {}
    program = {}
    for name, steps in real.items():
        if name in skip:
            op = next(n.op for n in engine.graph.nodes if n.name == name)
            fake_names[f"oracle.{op}"] = _pass_through(op)
            program[name] = {k: {**v, "kernel": f"oracle.{op}"} for k, v in steps.items()}
        else:
            program[name] = steps
    ex.program = program
    ex._wrappers.update(fake_names)
    engine.runner.capture_graphs()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    ap.add_argument("--scheme", default="bf16", choices=["bf16", "fp8-block"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--skip", nargs="+", default=["rms_norm", "qk_norm_rope_cache", "attention"])
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp())
    ckpt, plan = work / f"{args.shape}-{args.scheme}", work / f"{args.shape}-{args.scheme}.sm90.msgpack"
    if not plan.exists():
        write_random_checkpoint(ckpt, scheme=None if args.scheme == "bf16" else args.scheme, seed=0,
                                **SHAPES[args.shape])
        started = time.perf_counter()
        rdnac.compile(ckpt, target="sm90", output=plan, quiet=True)
        print(json.dumps({"compile_s": round(time.perf_counter() - started, 1)}), flush=True)
    bw = copy_bandwidth()
    variants = [()] + [(op,) for op in args.skip] + ([tuple(args.skip)] if len(args.skip) > 1 else [])
    for ops in variants:
        engine = rdnac.load(plan, device="cuda")
        if ops:
            with_skipped(engine, ops)
        for batch in args.batch:
            t = min(tpot(engine, batch, CONTEXT) for _ in range(3))
            read = decode_bytes(engine, batch, CONTEXT)
            print(json.dumps({"shape": args.shape, "scheme": args.scheme, "skipped": list(ops), "batch": batch,
                              "tpot_ms": round(t * 1e3, 3), "pct_of_copy": round(100 * read / t / 1e9 / bw, 1),
                              "copy_GBps": round(bw, 1)}), flush=True)
        del engine
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
