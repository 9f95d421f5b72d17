"""GGUF checkpoint reader: one llama.cpp .gguf file -> a `Checkpoint`.

The first step of the pipeline for GGUF input (`read_checkpoint` picks it for
a .gguf path). It turns llama.cpp's metadata into a Hugging Face config.json
dict and its tensor names into Hugging Face names, so the family builders
(`llama.py`) serve GGUF and HF checkpoints alike. Tensors are read lazily and
come back dequantized to float32, with llama.cpp's Q/K row permutation undone
for the llama architecture and the +1 its Gemma converter folds into every
norm weight taken back out: the values transformers holds after
`from_pretrained(dir, gguf_file=...)`. Where a Gemma 3 file is silent (the
sliding-window pattern, the local RoPE base, the attention scale), the config
says what llama.cpp's gemma3 loader assumes. The tokenizer is rebuilt from the
metadata by `gguf_tokenizer.py`.

A tensor with no HF name stays visible as `gguf:<name>` so the strict coverage
check of the family builder reports it instead of it being dropped.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize

from rdnac.compiler.frontend.checkpoint import Checkpoint
from rdnac.compiler.frontend.gguf_layout import check_layout
from rdnac.compiler.frontend.gguf_tokenizer import build_tokenizer
from rdnac.errors import CheckpointError, UnsupportedModelError

# general.architecture -> (HF architecture, HF model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),  # llama.cpp writes Mistral-style models as llama too
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),  # the text model of Gemma3ForConditionalGeneration too
}
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 norms around both sublayers; its ffn_norm is the pre-MLP norm, not Llama's post-attention one.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_NAMES_BY_ARCH = {"gemma3": _GEMMA3_LAYER_NAMES}
# llama.cpp's Gemma converters store every `*norm.weight` as HF's w + 1 (Gemma's RMSNorm scales by 1 + w).
_NORM_OFFSET_ARCHS = ("gemma3",)
_GEMMA3_SWA_PATTERN = 6  # llama.cpp's gemma3 loader: every 6th layer is global
_GEMMA3_SWA_ROPE_BASE = 10000.0  # llama.cpp's gemma3 loader: the RoPE base of the sliding-window layers
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def read_gguf(path: Path) -> Checkpoint:
    """Read a single-file GGUF of a supported architecture; tensors stay on disk until loaded."""
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF general.architecture requires one of {sorted(ARCHITECTURES)}; got {arch!r}; "
            "use a GGUF of a Llama, Mistral, Qwen2, Qwen3 or Gemma 3 model")
    if meta.get("split.count", 1) > 1:
        raise UnsupportedModelError(
            f"{path}: requires a single-file GGUF; got part {meta.get('split.no', 0) + 1} of {meta['split.count']}; "
            "merge the parts with `llama-gguf-split --merge`")
    notes: list[str] = []
    config = _config(meta, {t.name for t in reader.tensors}, path, notes)
    tensors = GGUFTensors(path, reader, config, arch)
    unmapped = [n for n in tensors.names() if n.startswith("gguf:")]
    if unmapped:
        notes.append(f"{path.name}: GGUF tensors with no Hugging Face name: {unmapped}")
    tokenizer_json, tokenizer_config, tok_notes = build_tokenizer(meta, path)
    generation_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    eot = meta.get("tokenizer.ggml.eot_token_id")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    if eot is None and arch == "gemma3" and "<end_of_turn>" in tokens:
        eot = tokens.index("<end_of_turn>")  # llama.cpp finds the end-of-turn token by its text
    if eot is not None and eot != config.get("eos_token_id"):
        # llama.cpp also stops at the end-of-turn token; generation must too
        generation_config["eos_token_id"] = [x for x in (config.get("eos_token_id"), eot) if x is not None]
    return Checkpoint(path=path, format="gguf", config=config, tensors=tensors, tokenizer_json=tokenizer_json,
                      tokenizer_config=tokenizer_config, chat_template=meta.get("tokenizer.chat_template"),
                      generation_config=generation_config, notes=notes + tok_notes)


class GGUFTensors:
    """`TensorSource` over one GGUF file: HF names, float32 values, dequantized on `load`."""

    def __init__(self, path: Path, reader: GGUFReader, config: dict, arch: str = "llama"):
        self._path = path
        self._tensors = {}  # HF name -> ReaderTensor
        self._permute_heads: dict[str, int] = {}  # HF name -> heads to un-permute over
        self._norm_offset: set[str] = set()  # HF names stored as w + 1
        is_llama = arch == "llama"  # only llama.cpp's llama converter permutes Q/K rows (not gemma3, not qwen)
        for t in reader.tensors:
            name = hf_name(t.name, arch)
            assert name not in self._tensors, f"two GGUF tensors map to {name}"
            self._tensors[name] = t
            if arch in _NORM_OFFSET_ARCHS and t.name.endswith("norm.weight"):
                self._norm_offset.add(name)
            if is_llama and ".self_attn.q_proj." in name:
                self._permute_heads[name] = config["num_attention_heads"]
            elif is_llama and ".self_attn.k_proj." in name:
                self._permute_heads[name] = config["num_key_value_heads"]
        bad = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors if t.tensor_type not in SUPPORTED_TYPES]
        if bad:
            raise UnsupportedModelError(
                f"{path}: GGUF tensor types require one of {', '.join(q.name for q in SUPPORTED_TYPES)}; "
                f"got {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; use another quantization of the model")

    def names(self) -> list[str]:
        return list(self._tensors)

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        t = self._tensor(name)
        return "float32", tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest dim first

    def load(self, name: str) -> torch.Tensor:
        t = self._tensor(name)
        shape = self.spec(name)[1]
        try:
            values = dequantize(t.data, t.tensor_type).reshape(shape)
        except ValueError as e:
            raise CheckpointError(f"{self._path}: tensor {t.name} cannot be decoded as {t.tensor_type.name} "
                                  f"{list(shape)} ({_first_line(e)}); the file is corrupt, re-download it") from None
        if name in self._permute_heads:
            values = unpermute_rows(values, self._permute_heads[name])
        if name in self._norm_offset:
            values = values - np.float32(1.0)  # in float32, as transformers subtracts it
        assert values.dtype == np.float32, values.dtype
        if not values.flags.writeable:  # F32 data is a view of the read-only file mapping
            values = np.array(values)
        return torch.from_numpy(values)

    def _tensor(self, name: str):
        if name not in self._tensors:
            raise KeyError(f"{self._path}: no tensor {name!r}")
        return self._tensors[name]


def hf_name(gguf_name: str, arch: str = "llama") -> str:
    """The Hugging Face name of a GGUF tensor of architecture `arch`, or `gguf:<name>` when there is none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    layer_names = _LAYER_NAMES_BY_ARCH.get(arch, _LAYER_NAMES)
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in layer_names:
        return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
    return f"gguf:{gguf_name}"


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's llama Q/K permutation: within each head, llama.cpp interleaves
    the two rotary halves (rows r and r + D/2 become adjacent); put them back as halves."""
    rows = w.shape[0]
    assert rows % (2 * num_heads) == 0, f"{rows} rows do not split into {num_heads} heads of two halves"
    # w: [H, 2 (pair), D/2, ...] after the swap
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config(meta: dict, tensor_names: set[str], path: Path, notes: list[str]) -> dict:
    """The Hugging Face config.json of the text model, from llama.cpp's `{arch}.*` keys."""
    arch = meta["general.architecture"]

    def key(name: str, default=...):
        value = meta.get(f"{arch}.{name}", default)
        if value is ...:
            raise CheckpointError(f"{path}: requires GGUF metadata key {arch}.{name}; got none; "
                                  "re-convert the model with llama.cpp's convert_hf_to_gguf.py")
        return value

    hidden, num_heads = key("embedding_length"), key("attention.head_count")
    num_kv_heads = key("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):
        raise UnsupportedModelError(f"{path}: {arch}.attention.head_count_kv requires one value for all layers; "
                                    f"got one per layer ({num_kv_heads[:4]}...)")
    head_dim = key("attention.key_length", None)
    if head_dim is None:  # llama.cpp's rule; for llama transformers reads the rotary width, which is equal
        head_dim = key("rope.dimension_count", None) if arch == "llama" else None
        head_dim = head_dim or hidden // num_heads
    value_dim = key("attention.value_length", head_dim)
    if value_dim != head_dim:
        raise UnsupportedModelError(f"{path}: {arch}.attention.value_length requires the key length ({head_dim}); "
                                    f"got {value_dim}; value heads of another width are not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = key("vocab_size", None) or (len(tokens) if tokens else None)
    if vocab_size is None:
        raise CheckpointError(f"{path}: requires {arch}.vocab_size or tokenizer.ggml.tokens; got neither")
    hf_arch, model_type = ARCHITECTURES[arch]
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": key("rope.freq_base", None),
        "max_position_embeddings": key("context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensor_names,  # llama.cpp omits a tied lm_head
    }
    if config["rope_theta"] is None:
        config["rope_theta"] = 10000.0
        notes.append(f"{path.name}: no {arch}.rope.freq_base; using llama.cpp's default 10000")
    rotary = key("rope.dimension_count", head_dim)
    if rotary != head_dim:
        config["partial_rotary_factor"] = rotary / head_dim
    if arch != "qwen2":  # Qwen2 always has q/k/v biases; Llama and Qwen3 say so in the config
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = False
    scaling = _rope_scaling(meta, arch, path)
    if scaling:
        config["rope_scaling"] = scaling
    if arch == "gemma3":
        _gemma3_fields(config, key, path, notes)
    if "rope_freqs.weight" in tensor_names:
        notes.append(f"{path.name}: rope_freqs.weight holds per-dimension RoPE factors (Llama 3.1 style); "
                     "it is kept as gguf:rope_freqs.weight, it is not a config field")
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id"), ("unk_token_id", "unknown_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in meta:
            config[hf_key] = meta[f"tokenizer.ggml.{gguf_key}"]
    return config


def _gemma3_fields(config: dict, key, path: Path, notes: list[str]) -> None:
    """Gemma 3's own config.json fields. The converter writes only the window and the optional final
    soft-cap; the rest is what llama.cpp's gemma3 loader assumes, which matches every released Gemma 3."""
    del config["hidden_act"], config["mlp_bias"]
    num_layers = config["num_hidden_layers"]
    window = key("attention.sliding_window", 0)
    pattern = key("attention.sliding_window_pattern", _GEMMA3_SWA_PATTERN)  # written for other archs only
    if not window:
        is_sliding = [False] * num_layers  # newer llama.cpp: no window key, no sliding layers
        notes.append(f"{path.name}: no gemma3.attention.sliding_window; every layer attends globally, as in llama.cpp")
    elif isinstance(pattern, list):
        if len(pattern) != num_layers:
            raise CheckpointError(f"{path}: gemma3.attention.sliding_window_pattern requires one entry per layer "
                                  f"({num_layers}); got {len(pattern)}; re-convert the model")
        is_sliding = [bool(p) for p in pattern]
    else:  # llama.cpp's set_swa_pattern(n): layer i slides unless (i + 1) % n == 0; n = 0 means all slide
        is_sliding = [pattern == 0 or (i + 1) % pattern != 0 for i in range(num_layers)]
    if config.get("rope_scaling"):
        notes.append(f"{path.name}: RoPE scaling {config['rope_scaling']} applies to the global layers only "
                     "(the sliding-window layers keep scale 1, as in llama.cpp)")
    notes.append(f"{path.name}: the file states no query_pre_attn_scalar, local RoPE base or (usually) window "
                 "pattern; they are llama.cpp's gemma3 assumptions (1/sqrt(head_dim) scores, or hidden/heads for "
                 f"the 62-layer 27B; base {_GEMMA3_SWA_ROPE_BASE:g}; every {_GEMMA3_SWA_PATTERN}th layer global)")
    softcap = key("final_logit_softcapping", None)
    config.update(
        hidden_activation="gelu_pytorch_tanh",  # ggml_gelu is the tanh approximation
        sliding_window=window or None,
        layer_types=["sliding_attention" if s else "full_attention" for s in is_sliding],
        rope_local_base_freq=key("rope.freq_base_swa", _GEMMA3_SWA_ROPE_BASE),
        # llama.cpp scales scores by 1/sqrt(head_dim), or by 1/sqrt(hidden / heads) for the 62-layer 27B,
        # which is each checkpoint's query_pre_attn_scalar
        query_pre_attn_scalar=(config["hidden_size"] // config["num_attention_heads"] if num_layers == 62
                               else config["head_dim"]),
        final_logit_softcapping=softcap or None,  # 0 means none in llama.cpp
        attn_logit_softcapping=None,  # Gemma 3 has none; llama.cpp's gemma3 graph applies none
    )


def _rope_scaling(meta: dict, arch: str, path: Path) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and meta.get(f"{arch}.rope.scale_linear") is not None:  # the key of older files
        kind, factor = "linear", meta[f"{arch}.rope.scale_linear"]
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": factor}
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            out["original_max_position_embeddings"] = original
        for name in ("beta_fast", "beta_slow"):
            if f"{arch}.rope.scaling.yarn_{name}" in meta:
                out[name] = meta[f"{arch}.rope.scaling.yarn_{name}"]
        return out
    raise UnsupportedModelError(f"{path}: {arch}.rope.scaling.type requires 'none', 'linear' or 'yarn'; "
                                f"got {kind!r}")


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise CheckpointError(f"{path}: requires an existing .gguf file; got no such file")
    check_layout(path)  # counts bounded by the file's size first: GGUFReader trusts them
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, struct.error, OSError) as e:
        size = path.stat().st_size
        raise CheckpointError(f"{path}: requires a complete GGUF v2/v3 file; "
                              f"got a truncated or corrupt file of {size} bytes "
                              f"({type(e).__name__}: {_first_line(e)}); re-download or re-convert it") from None


def _metadata(reader: GGUFReader, path: Path) -> dict:
    """Every key-value field as plain Python values (str, int, float, bool, lists); a float32 value
    becomes the Python float of that float32 (1e-5 reads 9.999999747378752e-06), as in transformers."""
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            value = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: GGUF metadata key {name} cannot be decoded ({_first_line(e)}); "
                                  "the file is corrupt, re-download it") from None
        meta[name] = value
    return meta


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]
