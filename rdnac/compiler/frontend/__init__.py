"""Checkpoint frontends: read a checkpoint, build the IR graph of its family.

`read_checkpoint` picks the reader (HF directory or GGUF file; a model id resolves through
`rdnac.compiler.model_ids` first); `build_graph`
picks the architecture's `ModelSpec` (spec.py; declared in llama.py,
gemma2.py, gemma3.py, qwen3_moe.py, qwen3_5.py,
qwen3_next.py, gpt_oss.py, deepseek.py) from `config["architectures"]` and builds it (model.py).
"""

from __future__ import annotations

from pathlib import Path

from rdnac.compiler.frontend.checkpoint import Checkpoint
from rdnac.compiler.model_ids import parse_model_id, resolve
from rdnac.errors import CheckpointError, UnsupportedModelError


def read_checkpoint(model: str | Path) -> Checkpoint:
    if isinstance(model, str) and model.startswith("demo:"):
        from rdnac.compiler.frontend.demo_models import resolve_demo

        model = resolve_demo(model)
    model_id = parse_model_id(model) if isinstance(model, str) else None
    if model_id is not None:  # ORG/NAME[@REVISION][:QUANT]: through the Hugging Face cache
        resolved = resolve(model_id)
        checkpoint = read_checkpoint(resolved.path)
        checkpoint.source = {"model_id": str(model_id), "name": model_id.name, "commit": resolved.commit}
        return checkpoint
    path = Path(model)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; requires a Hugging Face model directory, "
                              "a .gguf file, a model id ORG/NAME[@REVISION][:QUANT], or demo:smollm2")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: requires a .gguf file or a Hugging Face directory; got {path.suffix or 'a file'}")
        from rdnac.compiler.frontend.gguf_reader import read_gguf

        return read_gguf(path)
    from rdnac.compiler.frontend.hf import read_hf

    return read_hf(path)


def families() -> dict:
    """Architecture name -> its ModelSpec (or Wrapper, for a multimodal checkpoint compiled text-only)."""
    from rdnac.compiler.frontend import deepseek, gemma2, gemma3, gpt_oss, llama, qwen3_5, qwen3_moe, qwen3_next

    return {**llama.ARCHITECTURES, **gemma2.ARCHITECTURES, **gemma3.ARCHITECTURES, **qwen3_moe.ARCHITECTURES,
            **qwen3_5.ARCHITECTURES, **qwen3_next.ARCHITECTURES, **gpt_oss.ARCHITECTURES, **deepseek.ARCHITECTURES}


def build_graph(checkpoint: Checkpoint, dtype: str):
    """(graph, weights, decisions) of the checkpoint's first supported architecture."""
    from rdnac.compiler.frontend.model import build_model

    archs = checkpoint.config.get("architectures") or []
    known = families()
    for arch in archs:
        if arch in known:
            return build_model(known[arch], checkpoint, dtype)
    raise UnsupportedModelError(
        f"{checkpoint.path}: architecture {archs or 'missing'} is not supported; supported: {', '.join(sorted(known))}")
