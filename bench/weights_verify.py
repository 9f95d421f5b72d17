"""What verifying a plan's weights at load costs: `Plan.load_weights` with and without per-tensor checksums.

Writes a plan whose weights are ~1 GB of bf16 tensors shaped like a slice of an 8B model (with
`write_plan`, so the record is the real one), then loads them alternately with verify on and off,
from the page cache, and prints the median times and the overhead. Optionally also the whole-file
sha256 (what plans without per-tensor checksums fall back to) and safetensors' own loader.

    PYTHONPATH=$PWD python bench/weights_verify.py --gb 1 --repeats 5 [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rdnac.plans import read_plan, write_plan
from rdnac.plans.weights_file import CHECKSUM, _xxhash, sha256_file


def make_plan(directory: Path, gb: float) -> Path:
    # one Llama-8B layer's linears (bf16) repeated until ~gb GB: 4096x4096 q/o, 1024x4096 k/v, 14336x4096 x3
    shapes = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
    weights, total, i = {}, 0, 0
    while total < gb * 1e9:
        shape = shapes[i % len(shapes)]
        weights[f"w{i}"] = torch.randn(shape, dtype=torch.bfloat16)
        total += weights[f"w{i}"].numel() * 2
        i += 1
    body = {"graph": {"weights": {k: {"dtype": "bfloat16", "shape": list(v.shape)} for k, v in weights.items()}}}
    return write_plan(directory / "bench.msgpack", {}, body, weights)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--extra", action="store_true", help="also time the whole-file sha256 and safetensors' loader")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plan = read_plan(make_plan(Path(tmp), args.gb))
        size = plan.weights_path.stat().st_size
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

        def load(verify):
            return lambda: (plan.load_weights(args.device, verify=verify), sync())

        load(False)()  # into the page cache
        times = {"off": [], "on": []}
        for _ in range(args.repeats):
            times["off"].append(_time(load(False)))
            times["on"].append(_time(load(True)))
        print(f"weights {size / 1e9:.2f} GB, {len(plan.header['weights']['tensors'])} tensors, device {args.device}, "
              f"{args.repeats} alternating runs each")
        for stat in (min, statistics.median):
            off, on = stat(times["off"]), stat(times["on"])
            print(f"{stat.__name__:>6}: verify off {off:.3f} s ({size / off / 1e9:.2f} GB/s), verify on {on:.3f} s "
                  f"({size / on / 1e9:.2f} GB/s): {100 * (on - off) / off:+.1f}%")
        print(f"runs off {[round(t, 3) for t in times['off']]}\nruns on  {[round(t, 3) for t in times['on']]}")
        # the checksum alone, over the same bytes already in memory (no read): what verify adds at most
        weights = plan.load_weights("cpu", verify=False)
        xxh = _xxhash()
        alone = min(_time(lambda: [xxh.xxh3_64(memoryview(t.reshape(-1).view(torch.uint8).numpy())).hexdigest()
                                   for t in weights.values()]) for _ in range(args.repeats))
        print(f"{CHECKSUM} of the {size / 1e9:.2f} GB alone (in memory, min): {alone:.3f} s = "
              f"{100 * alone / min(times['off']):.1f}% of the fastest load without it")
        if args.extra:
            from safetensors.torch import load_file

            sha = statistics.median(_time(lambda: sha256_file(plan.weights_path)) for _ in range(3))
            st = statistics.median(_time(lambda: (load_file(plan.weights_path, device=args.device), sync()))
                                   for _ in range(3))
            print(f"whole-file sha256: {sha:.3f} s; safetensors load_file: {st:.3f} s")


if __name__ == "__main__":
    main()
