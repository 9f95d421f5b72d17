"""Prefill logits of FP8 and bf16 sm90 kernel plans against the reference interpreter on the same
plan graph and GPU (Qwen3-8B widths, few layers): max abs error, min cosine, top-1 agreement.

    python bench/fp8_logits.py --layers 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rdnac  # noqa: E402
from rdnac.runtime.llm import LLM  # noqa: E402
from rdnac.runtime.model_runner import ModelRunner  # noqa: E402
from rdnac.testing.fp8 import write_random_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--schemes", nargs="+", default=["fp8-block", "fp8-tensor", "bf16"])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    prompt = [(37 * i) % 150000 + 7 for i in range(40)]
    for scheme in args.schemes:
        write_random_checkpoint(work / scheme, layers=args.layers, scheme=None if scheme == "bf16" else scheme)
        plan = rdnac.compile(work / scheme, target="sm90", output=work / f"{scheme}.msgpack", quiet=True,
                             max_model_len=4096)
        engine = rdnac.load(plan, device="cuda")
        ours = engine.logits(prompt).float()
        reference = LLM(ModelRunner(engine.plan, engine.weights, "cuda")).logits(prompt).float()
        cos = torch.nn.functional.cosine_similarity(ours, reference, dim=-1)
        top1 = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
        top2 = reference.topk(2, dim=-1).values
        print(json.dumps({"scheme": scheme, "layers": args.layers, "max_abs_err": round((ours - reference).abs().max().item(), 4),
                          "max_abs_logit": round(reference.abs().max().item(), 3), "min_cosine": round(cos.min().item(), 5),
                          "top1_agreement": round(top1, 3),
                          "median_top2_gap": round((top2[:, 0] - top2[:, 1]).median().item(), 4)}))
        del engine
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
