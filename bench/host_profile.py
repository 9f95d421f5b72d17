"""Where the host time of an eager prefill step goes (GPU machine): cProfile of `Engine.execute`.

    python bench/host_profile.py --shape smollm2 --tokens 512

Writes a random checkpoint of the shape (`rdnac.testing.fp8.SHAPES`), compiles it for sm90, runs a few
warm-up prefill steps, then profiles steps of `--tokens` tokens and prints the step's host time (until
every kernel is enqueued), its launches, and the functions with the most own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rdnac  # noqa: E402
from rdnac.runtime.model_runner import StepEntry  # noqa: E402
from rdnac.testing.fp8 import SHAPES, write_random_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    write_random_checkpoint(work / "ckpt", seed=0, **SHAPES[args.shape])
    plan = work / "plan.msgpack"
    subprocess.run([sys.executable, "-c", "from rdnac.cli.main import main; main()", "compile", str(work / "ckpt"),
                    "--target", "sm90", "-o", str(plan), "-q"], check=True)
    engine = rdnac.load(plan, device="cuda")
    blocks = engine.engine.block_manager.take_blocks(-(-args.tokens // engine.runner.block_size))
    ids = [(7 * i) % 30000 + 300 for i in range(args.tokens)]
    entry = StepEntry(ids, blocks, 0, args.tokens)
    launches = 0
    api = engine.runner._executor.launcher._api  # count driver launches of one step
    original = api.launch

    def counting(*a, **k):
        nonlocal launches
        launches += 1
        return original(*a, **k)

    api.launch = counting
    for _ in range(3):
        engine.runner.execute([entry])
    torch.cuda.synchronize()
    launches = 0
    host = []
    profiler = cProfile.Profile()
    for _ in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        profiler.enable()
        engine.runner.execute([entry])
        profiler.disable()
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
    per_step = launches // args.steps
    print(f"{args.shape} prefill {args.tokens} tokens: host {sorted(host)[len(host) // 2] * 1e3:.2f} ms per step "
          f"(profiled), {per_step} launches per step")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
