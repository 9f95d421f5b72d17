"""What every checkpoint reader produces: config, tensors, tokenizer, templates.

Readers (`hf.py` for Hugging Face directories, `gguf_reader.py` for GGUF
files) turn a checkpoint into a `Checkpoint` whose config and tensor names
follow Hugging Face conventions, so one ModelSpec (`llama.py`, `gemma3.py`...) serves
both formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch


class TensorSource(Protocol):
    def names(self) -> list[str]: ...

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(dtype name as stored, shape) without loading the data."""
        ...

    def load(self, name: str) -> torch.Tensor:
        """The tensor in a float/int torch dtype; quantized GGUF data comes back dequantized (float32)."""
        ...


@dataclass
class Checkpoint:
    path: Path
    format: str  # "hf" or "gguf"
    config: dict  # the text model's config.json contents, HF keys
    tensors: TensorSource
    tokenizer_json: str | None  # a `tokenizers` JSON document
    tokenizer_config: dict = field(default_factory=dict)  # bos_token, eos_token, add_bos_token...
    chat_template: str | None = None
    generation_config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # decisions the reader made (recorded in the plan)
    source: dict | None = None  # a model id's {"model_id", "name", "commit"}; None for a local path
