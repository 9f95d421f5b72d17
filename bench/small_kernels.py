"""Every config of the small fused kernels, per token count, against the family default (GPU machine).

    PYTHONPATH=$PWD python bench/small_kernels.py --tokens 1 4 16 64 2048

At Qwen3-8B widths (hidden 4096, 32/8 heads of 128, intermediate 12288), bf16 activations, e4m3fn:
rms_norm (with the residual add), rms_norm_quant (per-128-group and per-token scales),
qk_norm_rope_cache (q/k norm, neox RoPE, paged cache write), gated_act and gated_act_quant (group
128) over the merged gate_up output. Every candidate of the family's config space is AOT-built for
the target (`compile_calls`), checked against its resources, and timed by the runtime's
`AotLauncher` inside a captured graph of back-to-back calls (`rdnac.compiler.tune._time`), as a plan
runs them. One JSON line per (family, tokens, config), then one summary line per (family, tokens)
with the default's time and the fastest config.
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
from rdnac.kernels import (activation, activation_quant, qk_norm_rope_cache, rms_norm,  # noqa: E402
                           rms_norm_quant)
from rdnac.compiler.record import RecordingLauncher  # noqa: E402
from rdnac.runtime.aot import AotLauncher  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 4096, 32, 8, 128, 12288
BF16 = torch.bfloat16


def _inputs(family: str, tokens: int, device: str):
    """(args, kwargs) of one call of the family's wrapper on fresh random inputs."""
    def rand(*shape, dtype=BF16):
        if device == "meta":
            return torch.empty(*shape, dtype=dtype, device="meta")
        return torch.randn(*shape, device=device).to(dtype)

    if family in ("rms_norm", "rms_norm_quant g128", "rms_norm_quant g0"):
        return (rand(tokens, HIDDEN), rand(tokens, HIDDEN), rand(HIDDEN)), {}
    if family in ("gated_act", "gated_act_quant g128"):
        return (rand(tokens, 2 * INTER),), {}
    assert family == "qk_norm_rope_cache", family
    qkv = rand(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    q, k, v = qkv[:, :HEADS * HEAD_DIM], qkv[:, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM], \
        qkv[:, (HEADS + KV_HEADS) * HEAD_DIM:]
    num_blocks = tokens // 16 + 2
    cache = [rand(num_blocks, 16, KV_HEADS, HEAD_DIM) for _ in range(2)]
    index = (torch.empty(tokens, dtype=torch.int64, device="meta") if device == "meta"
             else torch.arange(tokens, device=device))
    inv_freq = (torch.empty(HEAD_DIM // 2, device="meta") if device == "meta"
                else 1e6 ** (-torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM))
    return (q, k, v, index, index, *cache, rand(HEAD_DIM), rand(HEAD_DIM)), dict(
        num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, rotary_dim=HEAD_DIM, theta=1e6,
        qk_norm=True, inv_freq=inv_freq, attention_scaling=1.0)


def families(tokens: int):
    """(family, module, problem, fn(*args, config, launcher, **kw))"""
    def norm(x, r, w, *, config, launcher):
        return rms_norm.rms_norm(x, r, w, eps=1e-6, config=config, launcher=launcher)

    def norm_quant(group):
        def fn(x, r, w, *, config, launcher):
            return rms_norm_quant.rms_norm_quant(x, r, w, eps=1e-6, fp8_format="e4m3fn", group=group,
                                                 config=config, launcher=launcher)
        return fn

    def act(gate_up, *, config, launcher):
        return activation.gated_act(gate_up, config=config, launcher=launcher)

    def act_quant(gate_up, *, config, launcher):
        return activation_quant.gated_act_quant(gate_up, fp8_format="e4m3fn", group=128, config=config,
                                                launcher=launcher)

    def rope(*args, config, launcher, **kw):
        return qk_norm_rope_cache.qk_norm_rope_cache(*args, **kw, config=config, launcher=launcher)

    return [("rms_norm", rms_norm, {"H": HIDDEN, "num_heads": 1, "M": tokens}, norm),
            ("rms_norm_quant g128", rms_norm_quant, {"H": HIDDEN, "group": 128, "M": tokens}, norm_quant(128)),
            ("rms_norm_quant g0", rms_norm_quant, {"H": HIDDEN, "group": 0, "M": tokens}, norm_quant(0)),
            ("qk_norm_rope_cache", qk_norm_rope_cache,
             {"head_dim": HEAD_DIM, "num_heads": HEADS, "num_kv_heads": KV_HEADS, "qk_norm": True, "M": tokens}, rope),
            ("gated_act", activation, {"I": INTER, "M": tokens}, act),
            ("gated_act_quant g128", activation_quant, {"I": INTER, "group": 128, "M": tokens}, act_quant)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 2048])
    ap.add_argument("--target", default="sm90")
    ap.add_argument("--only", nargs="*", help="family names to run (default: all)")
    args = ap.parse_args()
    todo = []
    for t in args.tokens:
        for family, module, problem, fn in families(t):
            if args.only and family not in args.only:
                continue
            default = module.default_config(problem)
            space = module.config_space(problem)
            for cfg in space + ([default] if default not in space else []):
                rec = RecordingLauncher()
                a, kw = _inputs(family, t, "meta")
                fn(*a, **kw, config=cfg, launcher=rec)
                todo.append((t, family, cfg, cfg == default, fn, rec.calls))
    binaries = compile_calls([c for *_, calls in todo for c in calls], args.target, quiet=True)
    launcher = AotLauncher([b.to_dict() for b in binaries], "cuda")
    pos, best = 0, {}
    for t, family, cfg, is_default, fn, calls in todo:
        bins = binaries[pos:pos + len(calls)]
        pos += len(calls)
        problems = [p for b in bins for p in check_resources(b, args.target)]
        if problems:
            print(json.dumps({"tokens": t, "family": family, "config": cfg, "resource_problems": problems}))
            continue
        sets = [_inputs(family, t, "cuda") for _ in range(4)]
        us = round(_time(fn, sets, 16, cfg, launcher), 2)
        print(json.dumps({"tokens": t, "family": family, "config": cfg, "default": is_default, "us": us}), flush=True)
        entry = best.setdefault((family, t), {"best_us": None})
        if is_default:
            entry["default_us"], entry["default"] = us, cfg
        if entry["best_us"] is None or us < entry["best_us"]:
            entry.update(best_us=us, best=cfg)
    for (family, t), entry in best.items():
        print(json.dumps({"summary": family, "tokens": t, **entry}), flush=True)


if __name__ == "__main__":
    main()
