"""Build one-layer sm90 plans of a real shape with whatever Triton this python has: a CPU check, before
spending device time, that every kernel specialization a real plan needs builds under the GPU
machine's Triton (3.6 there, 3.9 on the CI machine).

    # a second venv holding the GPU machine's Triton (pip download --no-deps triton==3.6.0)
    cp -a .venv /tmp/v36 && /tmp/v36/bin/python -m pip install --no-deps triton-3.6.0-*.whl
    XDG_CACHE_HOME=/tmp/c36 /tmp/v36/bin/python bench/triton_compat.py --shapes qwen3-8b \
        --schemes fp8-block fp8-tensor bf16

A plan's kernels depend on its linears' shapes and the batch buckets, not on the layer count, so one
layer builds every specialization the 36-layer plan has. Session 14: the split-K reduce kernels built
under 3.9 and failed under 3.6 on the H100 ("'str' object has no attribute 'type'"); this finds that in
a minute per scheme on two cores. Exits non-zero when a plan fails to build.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import rdnac_cmd  # noqa: E402
from rdnac.testing.fp8 import SHAPES, write_random_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["qwen3-8b"], choices=sorted(SHAPES))
    ap.add_argument("--schemes", nargs="+", default=["fp8-block", "fp8-tensor", "bf16"],
                    choices=["bf16", "fp8-block", "fp8-tensor"])
    ap.add_argument("--target", default="sm90")
    args = ap.parse_args()
    import triton

    print(f"triton {triton.__version__}, target {args.target}", flush=True)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            for scheme in args.schemes:
                ckpt = Path(tmp) / f"{shape}-{scheme}"
                write_random_checkpoint(ckpt, scheme=None if scheme == "bf16" else scheme, seed=0,
                                        **{**SHAPES[shape], "layers": 1})
                t0 = time.perf_counter()
                proc = subprocess.run(rdnac_cmd("compile", str(ckpt), "--target", args.target, "-o", f"{ckpt}.msgpack",
                                                "-q"), capture_output=True, text=True)
                ok = proc.returncode == 0
                print(f"{shape} {scheme}: {'built' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f} s", flush=True)
                if not ok:
                    print(proc.stderr[-3000:], flush=True)
                    failed.append(f"{shape} {scheme}")
                shutil.rmtree(ckpt)
    if failed:
        raise SystemExit(f"failed to build for {args.target}: {', '.join(failed)}")


if __name__ == "__main__":
    main()
