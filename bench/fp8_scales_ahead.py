"""FP8 block-GEMM decode microbenchmark: scales loaded one K step ahead (SCALES_AHEAD, the default)
against loaded in the step that uses them, on the Qwen3-8B-shaped linears (GPU machine).

    PYTHONPATH=$PWD python bench/fp8_scales_ahead.py --m 1 16

Inputs are prequantized, as a plan's decode GEMMs get them from rms_norm_quant / gated_act_quant; each
timing is a captured graph of back-to-back calls cycling through enough weight copies to defeat L2
(`rdnac.compiler.tune._time`), with the shipped sm90 table's config. Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdnac.compiler import tuning  # noqa: E402
from rdnac.compiler.tune import L2_DEFEAT_BYTES, _time  # noqa: E402
from rdnac.kernels.gemm_fp8 import linear_fp8  # noqa: E402
from rdnac.kernels.launch import JitLauncher  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    launcher = JitLauncher()
    fp8 = torch.float8_e4m3fn
    for m in args.m:
        for name, (n, k) in SHAPES.items():
            problem = {"M": m, "N": n, "K": k, "dtype": "bfloat16", "has_bias": False, "fp8_format": "e4m3fn",
                       "weight_scheme": "block", "act_scheme": "dynamic_group", "block_size": [128, 128]}
            config = tuning.lookup("sm90", "gemm_fp8", problem)["config"]
            copies = max(1, min(16, -(-L2_DEFEAT_BYTES // (n * k))))
            sets = []
            for _ in range(copies):
                x = (torch.randn(m, k, device="cuda") * 0.5).to(fp8)
                xs = torch.rand(m, k // 128, device="cuda") + 0.5
                w = (torch.randn(n, k, device="cuda") * 0.5).to(fp8)
                ws = torch.rand(n // 128, k // 128, device="cuda") * 0.01
                sets.append(((x, w, ws, xs), dict(weight_scheme="block", act_scheme="prequantized",
                                                  fp8_format="e4m3fn", block_size=[128, 128], group=128,
                                                  out_dtype="bfloat16")))
            row = {"M": m, "linear": name, "N": n, "K": k, "config": config["constexprs"]}
            outs = {}
            for ahead in (False, True):
                cfg = {**config, "constexprs": {**config["constexprs"], "SCALES_AHEAD": ahead}}
                args_, kw = sets[0]
                outs[ahead] = linear_fp8(*args_, **kw, config=cfg, launcher=launcher)
                us = _time(linear_fp8, sets, max(copies, 8), cfg, launcher)
                row["ahead_us" if ahead else "in_step_us"] = round(us, 2)
                row["ahead_GBps" if ahead else "in_step_GBps"] = round(n * k / us / 1e3, 1)
            row["bit_identical"] = bool(torch.equal(outs[False], outs[True]))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
