"""A DeepSeek-V3-shaped plan with fewer layers, in the native FP8 block layout: decode TPOT on the GPU machine.

    python bench/deepseek_v3_fp8.py OUT --layers 2 --batch 1 64 --context 256          # the H100 (sm90)
    python bench/deepseek_v3_fp8.py OUT --tiny                                          # any machine, no GPU

Writes `rdnac.testing.deepseek.write_random_v3_fp8_block` (V3's widths: 128 heads of MLA on a 576-wide latent,
256 FP8 experts of 2048 with 128x128 block scales, top 8 of 8 groups; the first layer dense), compiles it for
sm90 (the FP8 experts stay FP8: `moe_experts_fp8_block`), loads it on cuda with its decode graphs and prints
one JSON line per batch: TPOT, tokens/s and the bytes a step reads (the routed experts only, the latent
cache) against the device's copy bandwidth (`rdnac.bench.decode.decode_record`), then 8 greedy tokens of
one prompt (the plan runs end to end). Correctness is the `gpu` test's (tests/test_deepseek.py,
test_fp8_block_gpu_plan_with_graphs: decisive weights against transformers): with these random weights the
router's near-ties flip experts between any two numerics, so tokens are not compared here.
Disk: about 12 GB per MoE layer for the checkpoint and as much for the plan (2 layers: ~30 GB in all).
`--tiny` (narrow widths, 2 layers) runs the same steps on a machine without a GPU: the sm90 plan's kernels
under the Triton interpreter (no timing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rdnac  # noqa: E402
from rdnac import SamplingParams  # noqa: E402
from rdnac.testing.deepseek import write_random_v3_fp8_block  # noqa: E402

# V3's structure at widths a CPU interprets in seconds: 4 heads on a 576-wide latent, 16 experts of 128
TINY = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
            q_lora_rank=256, vocab_size=512)
PROMPT = [3, 141, 59, 26, 53, 58, 97, 93, 238, 46, 26, 43]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (the first dense, then MoE)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="narrow widths, no GPU: kernels under the interpreter")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.tiny
    assert on_gpu or args.tiny, "decode timing needs a GPU; --tiny checks the same steps on cpu"
    out = args.out_dir
    t0 = time.perf_counter()
    ckpt = out / "ckpt"
    if not (ckpt / "config.json").exists():
        write_random_v3_fp8_block(ckpt, layers=2 if args.tiny else args.layers, device="cuda" if on_gpu else "cpu",
                                  **(TINY if args.tiny else {}))
    emit = lambda record: print(json.dumps(record), flush=True)  # noqa: E731
    emit({"step": "checkpoint", "seconds": round(time.perf_counter() - t0, 1)})
    t0 = time.perf_counter()
    max_seqs = max(args.batch)
    plan = rdnac.compile(ckpt, "sm90", out / "v3-fp8.msgpack", quiet=True, max_num_seqs=max_seqs,
                         max_model_len=args.context + 64, max_num_batched_tokens=max(64, max_seqs))
    emit({"step": "compile", "seconds": round(time.perf_counter() - t0, 1)})
    from rdnac.cli.inspect import summarize

    moe = summarize(plan)["moe"]
    emit({"step": "plan", "experts": [{k: m[k] for k in ("node", "op", "weight_format", "active_expert_bytes")}
                                      | {"decode": m.get("decode", {}).get("config")} for m in moe]})
    llm = rdnac.load(plan, device="cuda") if on_gpu else rdnac.load(plan, interpret=True)
    if on_gpu:
        from rdnac.bench.decode import copy_bandwidth, decode_record

        copy = copy_bandwidth()
        for batch in args.batch:
            emit({"step": "decode", "model": f"DeepSeek-V3-shaped, {args.layers} layers, FP8 block",
                  **decode_record(llm, batch, args.context, copy)})
    t0 = time.perf_counter()
    tokens = llm.generate([PROMPT], SamplingParams(max_tokens=8 if on_gpu else 2))[0].token_ids
    emit({"step": "greedy", "tokens": tokens, "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
