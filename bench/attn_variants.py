"""Prefill attention experiment (GPU machine): where do the paged prefill kernel's cycles go?

    PYTHONPATH=$PWD python bench/attn_variants.py --tokens 2048 --out results/attn.jsonl

One causal sequence at Qwen3-8B / Llama-3-8B attention widths (32 query heads, 8 kv heads, head_dim
128). Times rdnac's library kernel against variants of one experimental kernel that differ by one
idea each (flags), and torch's SDPA (flash) on the same q/k/v as the hardware reference:

  PAGED  keys gathered through the block table (as the runtime stores them) vs a contiguous [T, Hk, D]
  SPLIT  interior key tiles without masks, only the diagonal tiles masked
  PACK   the GQA group packed into the M tile (rows = tokens x group) vs one program per query head
  REV    heavy (late) query tiles launched first

Every variant is checked against SDPA (max abs difference) before it is timed. This is an experiment,
not the library: the winner's idea moves into rdnac/kernels/attention.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rdnac.kernels import attention as lib  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def _kv_offsets(j, bt_ptr, stride_ks, stride_kb, KVBS: tl.constexpr, PAGED: tl.constexpr):
    if PAGED:
        blk = tl.load(bt_ptr + j // KVBS).to(tl.int64)
        return blk * stride_kb + (j % KVBS) * stride_ks
    else:
        return j.to(tl.int64) * stride_ks


@triton.jit
def _attn(q_ptr, k_ptr, v_ptr, bt_ptr, out_ptr, T, stride_qt, stride_ks, stride_kb, qk_scale,
          HK: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, KVBS: tl.constexpr,
          PAGED: tl.constexpr, SPLIT: tl.constexpr, PACK: tl.constexpr, REV: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    if REV:
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        tile = tl.program_id(0)
    hh = tl.program_id(1)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    if PACK:
        kv_head = hh
        tok = rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        first_tok = tile * BLOCK_M // GROUP
        last_tok = (tile * BLOCK_M + BLOCK_M - 1) // GROUP
    else:
        kv_head = hh // GROUP
        tok = rows
        head = hh + 0 * rows
        first_tok = tile * BLOCK_M
        last_tok = tile * BLOCK_M + BLOCK_M - 1
    row_ok = tok < T
    d = tl.arange(0, D)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
    kv_end = tl.minimum(T, last_tok + 1)
    if SPLIT:
        kv_full = ((first_tok + 1) // BLOCK_N) * BLOCK_N
    else:
        kv_full = 0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(0, kv_full, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        off = _kv_offsets(j, bt_ptr, stride_ks, stride_kb, KVBS, PAGED) + kv_head * D
        k = tl.load(k_ptr + off[:, None] + d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + off[:, None] + d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    for start in range(kv_full, kv_end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < kv_end
        off = _kv_offsets(tl.where(j_ok, j, 0), bt_ptr, stride_ks, stride_kb, KVBS, PAGED) + kv_head * D
        k = tl.load(k_ptr + off[:, None] + d[None, :], mask=j_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(j_ok[None, :] & (j[None, :] <= tok[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + off[:, None] + d[None, :], mask=j_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_qt + head[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])


def bench(fn, reps=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    hq, hk, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    group = hq // hk
    torch.manual_seed(0)
    records = []

    def emit(rec):
        print(json.dumps(rec), flush=True)
        records.append(rec)

    for T in args.tokens:
        flops = 4 * hq * d * T * (T + 1) / 2
        q = torch.randn(T, hq * d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(T, hk, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(T, hk, d, device="cuda", dtype=torch.bfloat16)
        nb = triton.cdiv(T, bs)
        perm = torch.randperm(nb, device="cuda")  # blocks scattered through the cache, as at run time
        k_cache = torch.zeros(nb, bs, hk, d, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        pad = nb * bs - T
        k_cache[perm] = F.pad(k, (0, 0, 0, 0, 0, pad)).view(nb, bs, hk, d)
        v_cache[perm] = F.pad(v, (0, 0, 0, 0, 0, pad)).view(nb, bs, hk, d)
        table = perm.to(torch.int32).contiguous()
        scale = d ** -0.5
        qh = q.view(T, hq, d).transpose(0, 1).unsqueeze(0)
        kh = k.repeat_interleave(group, 1).transpose(0, 1).unsqueeze(0)
        vh = v.repeat_interleave(group, 1).transpose(0, 1).unsqueeze(0)
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION]):
            def sdpa():
                return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
            ref = sdpa().squeeze(0).transpose(0, 1).reshape(T, hq * d).float()
            us = bench(sdpa)
        emit({"variant": "sdpa-flash", "T": T, "us": round(us, 2), "tflops": round(flops / us / 1e6, 1)})

        seq_lens = torch.tensor([T], dtype=torch.int32, device="cuda")
        cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
        pos = torch.arange(T, dtype=torch.int32, device="cuda")
        bt2 = table.view(1, -1)
        for bm, bn, w, st in ((128, 32, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)):
            out = torch.empty_like(q)

            def run_lib():
                grid = (1, triton.cdiv(T * group, bm), hk)
                lib._prefill_kernel[grid](
                    q, k_cache, v_cache, bt2, seq_lens, cu, pos, q, out, q.stride(0), out.stride(0),
                    *k_cache.stride()[:3], *v_cache.stride()[:3], bt2.stride(0), scale, 0.0, 0,
                    HEAD_DIM=d, BLOCK_D=d, GROUP=group, KV_BLOCK_SIZE=bs, HAS_SINKS=False, HAS_SOFTCAP=False,
                    HAS_WINDOW=False, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
            try:
                run_lib()
                err = (out.float() - ref).abs().max().item()
                us = bench(run_lib)
                emit({"variant": "lib", "T": T, "cfg": [bm, bn, w, st], "us": round(us, 2),
                      "tflops": round(flops / us / 1e6, 1), "err": err})
            except Exception as e:  # noqa: BLE001 - an experiment: report and go on
                emit({"variant": "lib", "T": T, "cfg": [bm, bn, w, st], "error": str(e)[:200]})

        configs = ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 4, 3),
                   (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 8, 3), (256, 64, 8, 3))
        flags = [dict(PAGED=p, SPLIT=s, PACK=pk, REV=r) for p, s, pk, r in
                 ((True, False, True, False), (True, True, True, False), (True, True, True, True),
                  (False, True, True, True), (True, True, False, True), (False, True, False, True))]
        for fl in flags:
            for bm, bn, w, st in configs:
                out = torch.empty_like(q)
                kk, vv = (k_cache, v_cache) if fl["PAGED"] else (k, v)
                stride_ks = hk * d
                stride_kb = bs * hk * d
                rows = T * group if fl["PACK"] else T
                grid = (triton.cdiv(rows, bm), hk if fl["PACK"] else hq)

                def run():
                    _attn[grid](q, kk, vv, table, out, T, q.stride(0), stride_ks, stride_kb, scale * LOG2E,
                                HK=hk, D=d, GROUP=group, KVBS=bs, BLOCK_M=bm, BLOCK_N=bn,
                                num_warps=w, num_stages=st, **fl)
                name = "+".join(k_ for k_, v_ in fl.items() if v_) or "plain"
                try:
                    run()
                    err = (out.float() - ref).abs().max().item()
                    us = bench(run)
                    emit({"variant": name, "T": T, "cfg": [bm, bn, w, st], "us": round(us, 2),
                          "tflops": round(flops / us / 1e6, 1), "err": err})
                except Exception as e:  # noqa: BLE001
                    emit({"variant": name, "T": T, "cfg": [bm, bn, w, st], "error": str(e)[:200]})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    best = {}
    for r in records:
        if "us" in r and r.get("err", 0) < 0.05:
            key = (r["variant"], r["T"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    print("\nbest per variant:")
    for (name, T), r in sorted(best.items(), key=lambda x: (x[0][1], x[1]["us"])):
        print(f"  T={T:5d} {name:28s} {r['us']:9.1f} us {r['tflops']:7.1f} TFLOP/s cfg={r.get('cfg')}")


if __name__ == "__main__":
    main()
