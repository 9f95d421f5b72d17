"""Build small plans of every family and scheme under whatever Triton this python imports.

tests/test_triton_gpu_machine.py runs this in a subprocess of the main environment's python with the GPU
machine's Triton (rdnac/testing/gpu_machine.py, installed by `make gpu-triton`) first on the path:

    PYTHONPATH=.gpu-triton-3.6.0:. XDG_CACHE_HOME=.gpu-triton-3.6.0/cache \\
        .venv/bin/python -m tests.support.gpu_machine_build OUT [CASE ...]

It prints one JSON line naming the Triton it imported, then one per (case, target): built or not, the
BuildError's text and the kernels it names, the Triton version each binary records, and the seconds taken.
Adding a family or scheme is one line in CASES.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

TARGETS = ("sm90", "gfx1201")

# Qwen3-8B's attention (hidden 4096, 32 heads, 8 KV heads of 128) in one layer, with intermediate and vocab cut
# to 4096: measured under Triton 3.6, the sm90 plans have the same kernels and code paths (constexprs other than
# block sizes) as the Qwen3-8B one-layer plan's, in all three schemes: split-K GEMMs with and without
# self-reduce, both split-K reduce kernels, FP8 block GEMMs, split decode attention. Width 2048 with 16 heads
# loses the self-reducing FP8 block GEMM and decode attention. The vocab only sets the logits GEMM's config
# (4096 adds a split-K one); the full vocab would write 2.5 GB of embeddings per checkpoint.
WIDTH = dict(hidden=4096, layers=1, heads=32, kv_heads=8, head_dim=128, intermediate=4096, vocab=4096)


def random_checkpoint(arch: str) -> Callable[..., Path]:
    from rdnac.testing.fp8 import write_random_checkpoint

    return partial(write_random_checkpoint, arch=arch, **WIDTH)


# Gemma at Gemma 3's head_dim 256 (the attention kernels' largest tile), two layers (one sliding, one global):
# the 1 + w norms (plain, fused add, fused quant, fused q/k norm + RoPE + cache), the GELU-tanh gated GEMM,
# the logits soft-cap and, in Gemma 2, soft-capped prefill and decode attention.
GEMMA_WIDTH = dict(hidden_size=2048, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, intermediate_size=4096, vocab_size=4096, sliding_window=64,
                   layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0)


def hf_random_checkpoint(model_type: str, **config) -> Callable[..., Path]:
    """A writer of a random checkpoint from transformers' own modeling code, for families the FP8 generator
    does not write; bf16 only (scheme None)."""
    def write(out: Path, scheme: str | None = None) -> Path:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        assert scheme is None, f"{model_type}: the transformers writer makes bf16 checkpoints only; got {scheme}"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.bfloat16)
        model.save_pretrained(out)
        return out
    return write


# Qwen3.5 at the 27B's per-head shapes (GDN: 16 key heads, 48 value heads of 128; gated attention with head_dim
# 256), narrow elsewhere: one linear-attention and one full-attention layer: the conv, the chunked and recurrent
# gated delta rule, the gated norm and the sigmoid output gate at the shapes that decide their registers.
QWEN3_5_WIDTH = dict(hidden_size=2048, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                     head_dim=256, intermediate_size=4096, vocab_size=4096, linear_num_key_heads=16,
                     linear_num_value_heads=48, linear_key_head_dim=128, linear_value_head_dim=128,
                     layer_types=["linear_attention", "full_attention"])


# DeepSeek-V3's attention widths at 16 heads (the 576-wide latent: kv_lora_rank 512 + rope 64; nope 128, value
# 128, q LoRA 1536), hidden 1024: a dense first layer, then an MoE layer with V3's sigmoid group-limited routing
# (16 experts in 4 groups, top 4 of the 2 best groups) and a shared expert. The MLA kernels' registers are decided
# by the latent width and the heads per tile, not by the layer count or the hidden size.
DEEPSEEK_V3_WIDTH = dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=4096, kv_lora_rank=512, q_lora_rank=1536,
                         qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, moe_intermediate_size=256,
                         n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
                         first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                         max_position_embeddings=4096)


def deepseek_v3_fp8_block(out: Path, scheme: str | None = None) -> Path:
    """DEEPSEEK_V3_WIDTH in DeepSeek's native FP8 block layout (rdnac.testing.deepseek's writer): FP8 linears and
    FP8 experts with 128x128 `weight_scale_inv`."""
    from rdnac.testing.deepseek import write_random_v3_fp8_block

    assert scheme == "fp8-block", scheme
    width = {k: v for k, v in DEEPSEEK_V3_WIDTH.items() if k not in ("num_hidden_layers", "first_k_dense_replace")}
    return write_random_v3_fp8_block(out, layers=DEEPSEEK_V3_WIDTH["num_hidden_layers"],
                                     first_k_dense_replace=DEEPSEEK_V3_WIDTH["first_k_dense_replace"], **width)


def moe_checkpoint(shape: str) -> Callable[..., Path]:
    """rdnac.testing.moe's Hub-layout writer: Qwen3-MoE in bf16, GPT-OSS with MXFP4 experts (scheme mxfp4)."""
    def write(out: Path, scheme: str | None = None) -> Path:
        from rdnac.testing.moe import write_random_moe_checkpoint

        return write_random_moe_checkpoint(out, shape, scheme or "bf16")
    return write


def int8_checkpoint(write_float: Callable[..., Path]) -> Callable[..., Path]:
    """A random float checkpoint (`write_float`'s) turned into llm-compressor's W8A8 int8 layout
    (rdnac.testing.int8; a GDN layer's in_proj stays float, as its recipe keeps it)."""
    def write(out: Path, scheme: str | None = None) -> Path:
        from rdnac.testing.int8 import write_int8_checkpoint

        assert scheme == "int8", scheme
        write_float(out / "float", scheme=None)
        write_int8_checkpoint(out / "float", out / "int8")
        shutil.rmtree(out / "float")
        return out / "int8"
    return write


def family_checkpoint(shape: str, layers: int, **overrides) -> Callable[..., Path]:
    """rdnac.testing.families' writer (the GPU benchmarks' Qwen3.5-MoE and DeepSeek checkpoints), narrowed."""
    def write(out: Path, scheme: str | None = None) -> Path:
        from rdnac.testing.families import write_random_family_checkpoint

        return write_random_family_checkpoint(out, shape, layers, scheme or "bf16", device="cpu", **overrides)
    return write


# DeepSeek at real per-head widths (MLA: kv_lora_rank 512 + rope 64, the 576-wide latent head; nope 128, v 128),
# a dense layer then a MoE one, narrow elsewhere; V3's FP8 block linears, q LoRA and group-limited routing (8
# groups, top-4 groups: 32 experts so 4 groups hold its top-8). Qwen3.5-MoE at the 35B-A3B's GDN and expert widths.
NARROW = dict(hidden_size=1024, intermediate_size=2048, vocab_size=4096, n_routed_experts=8,
              moe_intermediate_size=512)


@dataclass(frozen=True)
class Case:
    family: str
    scheme: str  # "bf16", "fp8-block", "fp8-tensor", "mxfp4" or "int8"
    write: Callable[..., Path]  # write(out_dir, scheme=None | "fp8-block" | "fp8-tensor") -> checkpoint dir

    @property
    def name(self) -> str:
        return f"{self.family}-{self.scheme}"


# Every family rdnac supports, with each family's own kernels: Llama/Mistral (plain attention), Qwen2 (q/k/v
# bias: the GEMMs' bias epilogues), Qwen3 (q/k norm: the fused norm-rope-cache kernel), Gemma 3 and Gemma 2
# (see GEMMA_WIDTH).
CASES = [
    Case("llama", "bf16", random_checkpoint("LlamaForCausalLM")),
    Case("llama", "fp8-block", random_checkpoint("LlamaForCausalLM")),
    Case("llama", "fp8-tensor", random_checkpoint("LlamaForCausalLM")),
    Case("qwen2", "bf16", random_checkpoint("Qwen2ForCausalLM")),
    Case("qwen2", "fp8-block", random_checkpoint("Qwen2ForCausalLM")),
    Case("qwen3", "bf16", random_checkpoint("Qwen3ForCausalLM")),
    Case("qwen3", "fp8-block", random_checkpoint("Qwen3ForCausalLM")),
    Case("qwen3", "fp8-tensor", random_checkpoint("Qwen3ForCausalLM")),
    Case("gemma3", "bf16", hf_random_checkpoint("gemma3_text", **GEMMA_WIDTH)),
    Case("gemma2", "bf16", hf_random_checkpoint("gemma2", attn_logit_softcapping=50.0,
                                                **{k: v for k, v in GEMMA_WIDTH.items() if k != "layer_types"})),
    Case("qwen3_5", "bf16", hf_random_checkpoint("qwen3_5_text", **QWEN3_5_WIDTH)),
    # the fused MoE family (dense and MXFP4 experts), GPT-OSS's sinks and windows
    Case("qwen3_moe", "bf16", moe_checkpoint("qwen3-moe-tiny")),
    Case("gpt_oss", "mxfp4", moe_checkpoint("gpt-oss-tiny")),
    # INT8 W8A8 (compressed-tensors): the int8 GEMMs (split-K and self-reduce at decode), the int8 norm and
    # activation quant fusions,
    Case("qwen3", "int8", int8_checkpoint(random_checkpoint("Qwen3ForCausalLM"))),
    # and the hybrid model's: the GDN out_proj's int8 activations from the fused gated norm
    Case("qwen3_5", "int8", int8_checkpoint(hf_random_checkpoint("qwen3_5_text", **QWEN3_5_WIDTH))),
    Case("deepseek_v2", "bf16", family_checkpoint("deepseek-v2-lite", 2, **NARROW)),
    Case("qwen3_5_moe", "bf16", family_checkpoint("qwen3.5-35b-a3b", 2, hidden_size=1024, vocab_size=4096,
                                                  num_experts=16)),
    # multi-head latent attention (cache write, absorbed prefill and split decode, the per-head GEMMs) at a
    # 576-wide head, DeepSeek's group-limited routing kernel
    Case("deepseek_v3", "bf16", hf_random_checkpoint("deepseek_v3", **DEEPSEEK_V3_WIDTH)),
    # the native FP8 block layout: block-scaled GEMMs and the FP8 block experts of the fused MoE
    Case("deepseek_v3", "fp8-block", deepseek_v3_fp8_block),
]


# Code paths a plan's binaries may take, reported per build so a check can name the ones it covered: PDL and
# the loads before its wait (EARLY_META, EARLY_WEIGHTS: sm90 only), the FP8 down projection computing its
# activation (GATED_A, fuse_act_linear: GPU fp8-block plans at decode sizes).
PATHS = ("PDL", "EARLY_META", "EARLY_WEIGHTS", "GATED_A")


def build(case: Case, out: Path) -> list[dict]:
    """Write the case's checkpoint, compile it for every target, delete both; one record per target."""
    import rdnac
    from rdnac.compiler.build import BuildError
    from rdnac.plans import read_plan

    t0 = time.perf_counter()
    ckpt = case.write(out / case.name, scheme=None if case.scheme == "bf16" else case.scheme)
    records = [{"case": case.name, "target": "checkpoint", "seconds": round(time.perf_counter() - t0, 1)}]
    for target in TARGETS:
        t0 = time.perf_counter()
        record = {"case": case.name, "target": target}
        try:
            plan = rdnac.compile(ckpt, target=target, output=out / f"{case.name}.{target}.msgpack", quiet=True)
            body = read_plan(plan).body
            kernels = body["kernels"]
            # what kernel selection rejected and why (the configs that spill or exceed LDS under this Triton)
            rejected = sorted({f"{d['action']}: {d['reason'][-160:]}" for d in body["decisions"]
                               if d["action"].startswith("rejected")})
            record.update(built=True, kernels=len(kernels), rejected=rejected,
                          kernel_tritons=sorted({k["triton_version"] for k in kernels}),
                          kernel_names=sorted({k["kernel"].split(":")[-1] for k in kernels}),
                          paths=sorted({p for k in kernels for p in PATHS if k["call"]["constexprs"].get(p)}))
        except BuildError as e:
            record.update(built=False, error=str(e), failed_kernels=e.kernels)
        except Exception:  # noqa: BLE001 -- any other failure of the compile is reported the same way
            record.update(built=False, error=traceback.format_exc(limit=-8), failed_kernels=[])
        record["seconds"] = round(time.perf_counter() - t0, 1)
        records.append(record)
        for path in out.glob(f"{case.name}.{target}.*"):
            path.unlink()
    shutil.rmtree(ckpt.parent if case.scheme == "int8" else ckpt)  # int8: the converted copy's directory too
    return records


def interpret_gemm() -> dict:
    """One GEMM per decode and prefill config under this Triton's interpreter (`rdnac run --interpret`), against
    torch: Triton 3.6's interpreter turned a scalar into an int in a way NumPy 2.4 refuses (launch.py)."""
    import torch

    from rdnac.kernels import gemm
    from rdnac.kernels.launch import InterpretLauncher

    g = torch.Generator().manual_seed(0)
    errors = {}
    for M in (1, 37):
        x, w = torch.randn(M, 96, generator=g), torch.randn(64, 96, generator=g)
        problem = {"M": gemm.m_bucket(M), "N": 64, "K": 96, "dtype": "float32", "has_bias": False}
        try:
            out = gemm.linear(x, w, config=gemm.default_config(problem), launcher=InterpretLauncher())
            errors[M] = (out - x @ w.T).abs().max().item()
        except Exception as e:  # noqa: BLE001 -- reported, the test names it
            errors[M] = f"{type(e).__name__}: {e}"
    return {"interpret_gemm": errors}


def main(argv: list[str]) -> None:
    import triton

    if argv == ["--interpret"]:
        print(json.dumps({"triton": triton.__version__, **interpret_gemm()}), flush=True)
        return
    out, names = Path(argv[0]), argv[1:]
    unknown = set(names) - {c.name for c in CASES}
    assert not unknown, f"unknown cases {sorted(unknown)}"
    print(json.dumps({"triton": triton.__version__, "triton_file": triton.__file__}), flush=True)
    for case in CASES:
        if not names or case.name in names:
            for record in build(case, out):
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
