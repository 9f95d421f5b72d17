"""`rdnac bench` on a random-weight sm90 plan, with graphs and with --enforce-eager (GPU machine).

    python bench/serving.py --shape llama-smollm2 -c 1 4 16 64 --input-len 128 --output-len 128
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rdnac  # noqa: E402
from rdnac.cli.bench import bench  # noqa: E402
from tests.support.checkpoints import make_checkpoint  # noqa: E402
from tests.test_gpu_models import SHAPES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-smollm2")
    ap.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    family, overrides = SHAPES[args.shape]
    work = Path(tempfile.mkdtemp())
    make_checkpoint(family, work / "ckpt", **overrides)
    plan = rdnac.compile(work / "ckpt", target="sm90", output=work / "plan.msgpack", quiet=True)
    for eager in (False, True):
        for r in bench(str(plan), device="cuda", concurrency=args.concurrency, input_len=args.input_len,
                       output_len=args.output_len, num_prompts=None, seed=0, enforce_eager=eager, quiet=True):
            print(json.dumps({"shape": args.shape, **r}))


if __name__ == "__main__":
    main()
