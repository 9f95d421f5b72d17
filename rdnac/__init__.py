"""rdnac: an ahead-of-time compiler for LLMs on AMD GPUs.

    plan = rdnac.compile("demo:smollm2", target="cpu")   # checkpoint -> plan file
    engine = rdnac.load(plan)                             # plan -> runtime engine
    engine.generate(["What is the capital of France?"], chat=True)
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def compile(model: str | Path, target: str = "cpu", output: str | Path | None = None, **options) -> Path:
    """Compile a checkpoint (HF directory, .gguf file, or demo:NAME) into a plan; returns its path."""
    from rdnac.compiler.pipeline import compile_model

    return compile_model(model, target, output, **options)


def load(plan: str | Path, device: str = "cpu", **options):
    """Load a plan for running; returns an `Engine`."""
    from rdnac.runtime.engine import Engine

    return Engine.load(plan, device=device, **options)
