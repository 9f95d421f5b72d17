"""FP8 on sm90 end to end (GPU machine): Qwen3-8B-shaped random checkpoints, bf16 / FP8 block-128 /
FP8 per-tensor, compiled for sm90; 32 greedy tokens of the kernel plan against the reference
interpreter running the same plan graph on the GPU (decisive random weights: see
`write_random_checkpoint`), teacher-forced logit agreement, and decode TPOT at batch 1 per scheme.

    python bench/fp8_e2e.py --layers 8
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

import rdnac  # noqa: E402
from rdnac import SamplingParams  # noqa: E402
from rdnac.runtime.llm import LLM  # noqa: E402
from rdnac.runtime.model_runner import ModelRunner  # noqa: E402
from rdnac.testing.fp8 import write_random_checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import tpot  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--schemes", nargs="+", default=["bf16", "fp8-block", "fp8-tensor"])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    prompts = [[11, 400, 1200, 7, 42, 99, 3000, 17], [900, 12, 13, 14, 15, 16]]
    for scheme in args.schemes:
        ckpt = work / scheme
        started = time.perf_counter()
        write_random_checkpoint(ckpt, layers=args.layers, scheme=None if scheme == "bf16" else scheme, seed=0,
                                decisive=True)
        gen_s = time.perf_counter() - started
        started = time.perf_counter()
        plan = rdnac.compile(ckpt, target="sm90", output=work / f"{scheme}.msgpack", quiet=True,
                             max_model_len=4096)
        compile_s = time.perf_counter() - started
        engine = rdnac.load(plan, device="cuda")
        ours = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=32))]
        # The reference interpreter on the same plan graph and weights, on the GPU (no kernels).
        reference = LLM(ModelRunner(engine.plan, engine.weights, "cuda"))
        ref = [c.token_ids for c in reference.generate(prompts, SamplingParams(max_tokens=32))]
        same = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(ours, ref)]
        ids = prompts[0] + ours[0]
        lo, lr = engine.logits(ids).float(), reference.logits(ids).float()
        cosine = torch.nn.functional.cosine_similarity(lo, lr, dim=-1).min().item()
        agree = (lo.argmax(-1) == lr.argmax(-1)).float().mean().item()
        t = tpot(engine, 1, 256)
        print(json.dumps({"scheme": scheme, "layers": args.layers, "generate_s": round(gen_s, 1),
                          "compile_s": round(compile_s, 1), "first_divergence_vs_interpreter": same,
                          "tokens_identical": ours == ref, "teacher_forced_top1": round(agree, 4),
                          "min_logit_cosine": round(cosine, 5),
                          "tpot_ms_b1": round(t * 1e3, 3),
                          "weights_GB": round((work / f"{scheme}.weights.safetensors").stat().st_size / 1e9, 2)}))
        del engine, reference
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
