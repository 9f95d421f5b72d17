"""rdnac: an ahead-of-time compiler for LLMs on AMD GPUs.

    plan = rdnac.compile("demo:smollm2", target="cpu")    # checkpoint -> plan file
    llm = rdnac.load(plan)                                 # plan -> the runtime's generation loop
    llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=16))
"""

from __future__ import annotations

from pathlib import Path

from rdnac.runtime.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["SamplingParams", "compile", "load"]


def compile(model: str | Path, target: str = "cpu", output: str | Path | None = None, **options) -> Path:
    """Compile a checkpoint (HF directory, .gguf file, or demo:NAME) into a plan; returns its path."""
    from rdnac.compiler.pipeline import compile_model

    return compile_model(model, target, output, **options)


def load(plan: str | Path, device: str = "cpu", **options):
    """Load a plan for running; returns an `LLM` (rdnac.runtime.llm): generate, chat, stream, logits.
    Options: verify_weights (default True: each tensor checked against the plan's checksum as it loads),
    interpret, enforce_eager, launch_pdl, and the LLMEngine's (max_num_seqs, max_num_batched_tokens,
    num_blocks, gpu_memory_utilization, enable_prefix_caching)."""
    from rdnac.runtime.llm import LLM

    return LLM.load(plan, device=device, **options)

