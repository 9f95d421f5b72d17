"""`ModelSpec`: what one architecture is, declared; the config readers specs share.

A family file (llama.py, gemma3.py) declares one `ModelSpec` per
architecture: the config defaults transformers leaves out of config.json,
the blocks of a layer (blocks.py), the per-layer attention variants, the
norm style, the embedding scale and the head. `model.build_model` turns a
spec and a checkpoint into the IR graph. A `Wrapper` maps a multimodal
checkpoint (a vision-language model) onto its text model's spec, ignoring
the other towers with a stated reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rdnac.errors import CheckpointError, UnsupportedModelError

if TYPE_CHECKING:
    from rdnac.compiler.frontend.blocks import Block
    from rdnac.compiler.frontend.builder import GraphBuilder

# config.json's hidden_act -> the IR's gated_act `act`
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh"}


@dataclass(frozen=True)
class AttentionLayer:
    """One layer's attention variant: attributes of its rope and attention nodes."""

    sliding_window: int  # 0: global
    rope: dict  # rope_config's {"theta", "rotary_dim", "scaling"}
    scale: float
    softcap: float = 0.0


@dataclass(frozen=True)
class ModelSpec:
    """One causal-LM architecture. Flags given as a str name the config key that holds them."""

    architecture: str
    layer: tuple[Block, ...]  # the blocks of every layer, in order (a mixer, then a feed-forward)
    # (config, head_dim, where) -> each layer's attention variant (None for a layer without attention)
    attention_layers: Callable[[dict, int, Path], list[AttentionLayer | None]]
    defaults: dict = field(default_factory=dict)  # config keys transformers omits when they equal its defaults
    activation_key: str = "hidden_act"
    unit_offset_norms: bool = False  # every RMSNorm scales by 1 + w (Gemma)
    embedding_scale: str = "none"  # "none" | "sqrt_hidden" (rounded to the compute dtype, as transformers does)
    final_softcap_key: str | None = None  # config key of a tanh soft-cap on the logits
    max_positions: Callable[[GraphBuilder, dict], int] | None = None  # default: max_position_embeddings
    ignore: tuple[tuple[str, str], ...] = ()  # (tensor regex, reason) of checkpoint tensors not used on purpose
    inert_config: tuple[tuple[str, str], ...] = ()  # (config key, why it changes nothing), logged when set
    layer_of: Callable[[dict, int], tuple[Block, ...]] | None = None  # when layers differ (MoE every k-th...)

    def blocks(self, config: dict, index: int) -> tuple[Block, ...]:
        return self.layer_of(config, index) if self.layer_of else self.layer


class Config(dict):
    """config.json with the spec's defaults. A key a builder requires (`c["hidden_size"]`) that the file
    lacks is a CheckpointError naming the file and the key, whichever family asks for it."""

    def __init__(self, where: Path, values: dict):
        super().__init__(values)
        self.where = where

    def __missing__(self, key):
        raise CheckpointError(f"{config_file(self.where)}: requires key {key!r} for {self.get('architectures')}; "
                              f"got a config without it; use the checkpoint's original config.json")

    def dim(self, key: str) -> int:
        """A size or count (hidden_size, num_attention_heads...): a positive integer."""
        value = self[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{config_file(self.where)}: {key} requires a positive integer; got {value!r}")
        return value


def flag(config: dict, value: bool | str) -> bool:
    """A spec flag: a bool, or the name of the config key that holds it (absent: False)."""
    return value if isinstance(value, bool) else bool(config.get(value))


def config_file(path: Path) -> Path:
    """The file a config error names: config.json of an HF directory, the GGUF file itself."""
    return path / "config.json" if path.is_dir() else path


def layer_types(config: dict, num_layers: int, known: tuple[str, ...], where: Path) -> list[str] | None:
    """config.json's `layer_types` (None if absent), each entry checked against `known`."""
    types = config.get("layer_types")
    if not types:
        return None
    if len(types) < num_layers:
        raise UnsupportedModelError(f"{config_file(where)}: layer_types requires one entry per layer "
                                    f"({num_layers}); got {len(types)}")
    for i, kind in enumerate(types[:num_layers]):
        if kind not in known:
            raise UnsupportedModelError(f"{config_file(where)}: layer_types[{i}] is {kind!r}, a layer kind rdnac does "
                                        f"not build; supported: {', '.join(known)}")
    return list(types[:num_layers])


def rope_config(config: dict, head_dim: int, path) -> dict:
    """Normalize the HF v4 (`rope_theta`, `rope_scaling`) and v5 (`rope_parameters`) forms."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    params.update({k: v for k, v in scaling.items() if k not in params})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    prf = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * prf)
    if kind == "default":
        return {"theta": float(theta), "rotary_dim": rotary_dim, "scaling": None}
    if kind not in ("linear", "llama3", "yarn"):
        raise UnsupportedModelError(f"{path}: rope_type {kind!r} is not supported; "
                                    "supported: default, linear, llama3, yarn")
    # llama_4_scaling_beta is Ministral3's query scaling, handled by the builder; not a RoPE parameter
    not_rope = ("rope_theta", "type", "partial_rotary_factor", "llama_4_scaling_beta", "max_position_embeddings")
    out = {k: v for k, v in params.items() if k not in not_rope}
    out["rope_type"] = kind
    if kind in ("llama3", "yarn"):
        out.setdefault("original_max_position_embeddings",
                       config.get("original_max_position_embeddings", config.get("max_position_embeddings")))
    if kind == "yarn" and out.get("factor") is None:
        out["factor"] = config["max_position_embeddings"] / out["original_max_position_embeddings"]
    return {"theta": float(theta), "rotary_dim": rotary_dim, "scaling": out}


def embedding_scale(spec: ModelSpec, hidden: int, dtype: str) -> float:
    """The factor embeddings are multiplied by; Gemma's sqrt(hidden) is first cast to the weights' dtype
    (transformers: `embed_scale.to(weight.dtype)`, so sqrt(3072) = 55.4256 is 55.5 in bfloat16)."""
    if spec.embedding_scale == "none":
        return 1.0
    assert spec.embedding_scale == "sqrt_hidden", spec.embedding_scale
    import torch

    return float(torch.tensor(math.sqrt(hidden), dtype=torch.float32).to(getattr(torch, dtype)))


# The tensor prefixes of a vision-language wrapper's text model: transformers v5 and the older layout.
VLM_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                     ("language_model.lm_head.", "lm_head."))


@dataclass(frozen=True)
class Wrapper:
    """A multimodal architecture compiled text-only: its text_config.model_type picks the text spec."""

    architecture: str
    text_specs: dict[str, ModelSpec]  # text_config.model_type -> spec
    towers: tuple[tuple[str, str], ...]  # (tensor regex, reason) of the towers left out
    prefixes: tuple[tuple[str, str], ...] = VLM_TEXT_PREFIXES

    def text_spec(self, b: GraphBuilder, config: dict, path) -> ModelSpec:
        model_type = config.get("model_type")
        spec = self.text_specs.get(model_type)
        if spec is None:
            raise UnsupportedModelError(f"{path}: {self.architecture} requires text_config.model_type in "
                                        f"{sorted(self.text_specs)}; got {model_type!r}")
        for prefix, canonical in self.prefixes:
            b.alias_prefix(prefix, canonical)
        for pattern, reason in self.towers:
            b.ignore(pattern, reason)
        b.decide("model", f"{self.architecture}: text model only, as {spec.architecture}",
                 "the vision tower and projector are not compiled")
        return spec


def vision_towers(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Ignore rules for a wrapper's non-text modules ({module: label}), with or without the v5 `model.` prefix."""
    reason = "rdnac compiles the text model only (images are not supported yet)"
    return tuple((rf"(model\.)?{m}\..*", f"{label}: {reason}") for m, label in labels.items())
