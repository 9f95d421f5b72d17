"""Fused RMSNorm + FP8 quant against the unfused pair, built through the plan path (GPU machine).

    PYTHONPATH=$PWD python bench/norm_quant.py --tokens 1 2048

At Qwen3-8B's hidden size (4096), bf16 activations, e4m3fn: per (config, token count) the time of
`rms_norm_quant` (per-128-group and per-token scales), of `rms_norm` followed by the `linear_fp8`
quant kernel, and of `rms_norm` alone, each AOT-built for sm90 (`compile_calls`), checked against the
target's resources, launched by the runtime's `AotLauncher` inside a captured graph, as a plan runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rdnac.compiler.build import check_resources, compile_calls  # noqa: E402
from rdnac.compiler.tune import _time  # noqa: E402
from rdnac.kernels import rms_norm, rms_norm_quant  # noqa: E402
from rdnac.kernels.fp8_quant import quantize_activations  # noqa: E402
from rdnac.compiler.record import RecordingLauncher  # noqa: E402
from rdnac.runtime.aot import AotLauncher  # noqa: E402


def cases(hidden: int):
    """(name, config, fn(x, residual, weight, *, config, launcher))"""
    out = []
    for group in (128, 0):
        for cfg in rms_norm_quant.config_space({"H": hidden, "group": group}):
            def fused(x, r, w, *, config, launcher, group=group):
                return rms_norm_quant.rms_norm_quant(x, r, w, eps=1e-6, fp8_format="e4m3fn", group=group,
                                                     config=config, launcher=launcher)
            out.append((f"rms_norm_quant g{group}", cfg, fused))
        norm_cfg = rms_norm.default_config({"H": hidden, "num_heads": 1})

        def unfused(x, r, w, *, config, launcher, group=group):
            y, _ = rms_norm.rms_norm(x, r, w, eps=1e-6, config=config, launcher=launcher)
            return quantize_activations(y, None, "e4m3fn", group, launcher=launcher)
        out.append((f"rms_norm + quant g{group}", norm_cfg, unfused))

    def norm_only(x, r, w, *, config, launcher):
        return rms_norm.rms_norm(x, r, w, eps=1e-6, config=config, launcher=launcher)
    out.append(("rms_norm", rms_norm.default_config({"H": hidden, "num_heads": 1}), norm_only))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2048])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--target", default="sm90")
    args = ap.parse_args()
    h = args.hidden
    todo = []
    for t in args.tokens:
        meta = [torch.empty(t, h, dtype=torch.bfloat16, device="meta")] * 2 + [
            torch.empty(h, dtype=torch.bfloat16, device="meta")]
        for name, cfg, fn in cases(h):
            rec = RecordingLauncher()
            fn(*meta, config=cfg, launcher=rec)
            todo.append((t, name, cfg, fn, rec.calls))
    binaries = compile_calls([c for *_, calls in todo for c in calls], args.target, quiet=True)
    launcher = AotLauncher([b.to_dict() for b in binaries], "cuda")
    pos = 0
    for t, name, cfg, fn, calls in todo:
        bins = binaries[pos:pos + len(calls)]
        pos += len(calls)
        problems = [p for b in bins for p in check_resources(b, args.target)]
        sets = [((torch.randn(t, h, device="cuda").bfloat16(), torch.randn(t, h, device="cuda").bfloat16(),
                  torch.rand(h, device="cuda").bfloat16()), {}) for _ in range(4)]
        us = _time(fn, sets, 16, cfg, launcher)
        moved = t * h * 2 * 4 + t * h  # x, residual in; residual, y out (bf16) or q (fp8) out: an estimate
        print(json.dumps({"tokens": t, "case": name, "config": cfg, "us": round(us, 2),
                          "GBps": round(moved / us / 1e3, 1), "resource_problems": problems}), flush=True)


if __name__ == "__main__":
    main()
