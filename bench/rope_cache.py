"""Fused q/k-norm + RoPE + KV-cache write against the unfused kernels (GPU machine).

    python bench/rope_cache.py --tokens 1 64 2048 --tpot-shape qwen3-0.6b

Part 1, per model shape and token count: the one fused launch against the
unfused chain (head_rms_norm x2 when the model has q/k norms, rope,
kv_cache_write), each captured 20 times in a CUDA graph so launch overhead
is the GPU's, not Python's; prints time per layer and the fused kernel's
achieved GB/s (q, k, v read once; q', k', v written once). Part 2: decode
TPOT (graphs) of a random-weight sm90 plan with the pass on and off. One
JSON line per measurement.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rdnac.ir.rope_math import rope_inv_freq  # noqa: E402
from rdnac.kernels import kv_cache, qk_norm_rope_cache, rms_norm, rope  # noqa: E402
from rdnac.kernels.launch import JitLauncher  # noqa: E402

SHAPES = {  # (num_heads, num_kv_heads, head_dim, qk_norm)
    "llama-smollm2": (9, 3, 64, False),
    "qwen3-0.6b": (16, 8, 128, True),
    "qwen3-8b": (32, 8, 128, True),
}


def _graph_time(fn, reps: int = 20, replays: int = 20) -> float:
    """Seconds per call of `fn`, from `reps` calls captured in one CUDA graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (reps * replays)


def kernel_times(shape: str, num_tokens: int) -> dict:
    heads, kv_heads, head_dim, qk_norm = SHAPES[shape]
    dev, dtype, jit = "cuda", torch.bfloat16, JitLauncher()
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, device=dev, dtype=dtype)  # [T, (Hq+2Hk)*D]
    q, k, v = torch.split(qkv, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], 1)
    block = 16
    num_blocks = -(-num_tokens // block) + 1
    k_cache = torch.zeros(num_blocks, block, kv_heads, head_dim, device=dev, dtype=dtype)  # [NB, BS, Hk, D]
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_blocks * block, device=dev)[:num_tokens]
    positions = torch.randint(0, 4096, (num_tokens,), device=dev)
    norms = [torch.randn(head_dim, device=dev, dtype=dtype) for _ in range(2)] if qk_norm else []
    inv_freq, scaling = rope_inv_freq(head_dim, 1e6, None)
    inv_freq = inv_freq.to(dev)
    rope_attrs = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rotary_dim=head_dim, theta=1e6)
    problem = {"head_dim": head_dim, "num_heads": heads, "num_kv_heads": kv_heads, "qk_norm": qk_norm}

    def fused():
        qk_norm_rope_cache.qk_norm_rope_cache(q, k, v, positions, slots, k_cache, v_cache, *norms, **rope_attrs,
                                              qk_norm=qk_norm, eps=1e-6, inv_freq=inv_freq,
                                              attention_scaling=scaling,
                                              config=qk_norm_rope_cache.default_config(problem), launcher=jit)

    def unfused():
        q1, k1 = q, k
        if qk_norm:
            q1 = rms_norm.head_rms_norm(q, norms[0], num_heads=heads, head_dim=head_dim, eps=1e-6,
                                        config=rms_norm.default_config({"H": head_dim, "num_heads": heads}),
                                        launcher=jit)
            k1 = rms_norm.head_rms_norm(k, norms[1], num_heads=kv_heads, head_dim=head_dim, eps=1e-6,
                                        config=rms_norm.default_config({"H": head_dim, "num_heads": kv_heads}),
                                        launcher=jit)
        q2, k2 = rope.rope(q1, k1, positions, **rope_attrs, inv_freq=inv_freq, attention_scaling=scaling,
                           config=rope.default_config(problem), launcher=jit)
        kv_cache.kv_cache_write(k2, v, slots, k_cache, v_cache, num_kv_heads=kv_heads, head_dim=head_dim,
                                config=kv_cache.default_config(problem), launcher=jit)

    t_fused, t_unfused = _graph_time(fused), _graph_time(unfused)
    moved = 2 * num_tokens * (heads + 2 * kv_heads) * head_dim * 2  # bf16 q,k,v in; q',k',v out
    return {"shape": shape, "tokens": num_tokens, "launches_unfused": 4 if qk_norm else 2, "launches_fused": 1,
            "unfused_us": round(t_unfused * 1e6, 2), "fused_us": round(t_fused * 1e6, 2),
            "speedup": round(t_unfused / t_fused, 2), "fused_GBps": round(moved / t_fused / 1e9, 1)}


def decode_tpot(shape: str, batches: list[int], context: int, layers: int | None) -> None:
    import rdnac
    from rdnac.bench.decode import tpot
    from tests.support.checkpoints import make_checkpoint
    from tests.test_gpu_models import SHAPES as MODEL_SHAPES

    family, overrides = MODEL_SHAPES[shape]
    if layers:
        overrides = {**overrides, "num_hidden_layers": layers}
    work = Path(tempfile.mkdtemp())
    make_checkpoint(family, work / "ckpt", **overrides)
    for label, disabled in (("fused", ()), ("unfused", ("fuse_qk_norm_rope_cache",))):
        started = time.perf_counter()
        plan = rdnac.compile(work / "ckpt", target="sm90", output=work / f"{label}.msgpack", quiet=True,
                             disable_passes=disabled)
        compile_s = time.perf_counter() - started
        engine = rdnac.load(plan, device="cuda")
        for batch in batches:
            t = tpot(engine, batch, context)
            print(json.dumps({"tpot": label, "shape": shape, "layers": engine.graph.attrs["num_layers"],
                              "batch": batch, "context": context, "tpot_ms": round(t * 1e3, 3),
                              "compile_s": round(compile_s, 1)}), flush=True)
        del engine
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 2048])
    ap.add_argument("--tpot-shape", default="qwen3-0.6b", help="model shape for the decode TPOT ('' to skip)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--layers", type=int, default=None, help="override the TPOT model's layer count")
    args = ap.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name()}), flush=True)
    for shape in args.shapes:
        for num_tokens in args.tokens:
            print(json.dumps(kernel_times(shape, num_tokens)), flush=True)
    if args.tpot_shape:
        decode_tpot(args.tpot_shape, args.batch, args.context, args.layers)


if __name__ == "__main__":
    main()
