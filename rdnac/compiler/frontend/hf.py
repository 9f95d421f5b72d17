"""Hugging Face directory reader: config.json, safetensors, tokenizer, templates.

Produces a `Checkpoint` (see checkpoint.py). Safetensors may be one file or
sharded with `model.safetensors.index.json`. A multimodal wrapper's
`text_config` becomes the config; the wrapper's architecture is kept under
`wrapper_architectures` so family builders can ignore the other towers on
purpose.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rdnac.compiler.frontend.checkpoint import Checkpoint
from rdnac.errors import CheckpointError


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: requires valid JSON; got {e.msg} at line {e.lineno}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: requires UTF-8 JSON text; got bytes that do not decode") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: requires a JSON object; got a {type(value).__name__}")
    return value


def _read_tokenizer(path: Path) -> str | None:
    """tokenizer.json's text, checked to load now: a corrupt one is refused at compile, not at run."""
    from tokenizers import Tokenizer

    if not path.exists():
        return None
    text = path.read_text(errors="replace")
    try:
        Tokenizer.from_str(text)
    except Exception as e:  # the tokenizers package raises a bare Exception for any malformed document
        raise CheckpointError(f"{path}: requires a tokenizer.json the tokenizers library loads; got {str(e)[:100]}; "
                              "restore the checkpoint's original file, or remove it to compile a plan that "
                              "takes token ids") from None
    return text


def _check_safetensors_file(path: Path) -> dict:
    """Validate the header as data (every entry's dtype, shape and byte range, the ranges tiling the data)
    and the data length; returns the header. Catches truncation and corruption before any tensor loads."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {header_len} bytes, file {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: requires a JSON object; got {type(header).__name__}")
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ requires string values")
            continue
        ranges.append((_entry_range(path, name, entry), name))
    data_end = 0
    for (begin, end), name in sorted(ranges):
        if begin != data_end:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} starts at byte {begin}; "
                                  f"requires {data_end} (tensors tile the data without gaps or overlaps)")
        data_end = end
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: requires {8 + header_len + data_end} bytes; got {size}; "
            "re-download or re-save the checkpoint")
    return header


def _entry_range(path: Path, name: str, entry) -> tuple[int, int]:
    """A header entry's [begin, end) data range, after checking its dtype, shape and size agree."""
    def bad(requirement: str, got) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} requires {requirement}; "
                               f"got {got!r:.60}; re-download or re-save the checkpoint")

    if not isinstance(entry, dict):
        raise bad("an object with dtype, shape and data_offsets", entry)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ST_ITEMSIZE:
        raise bad(f"a dtype in {sorted(_ST_ITEMSIZE)}", dtype)
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise bad("a shape of non-negative integers", shape)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise bad("data_offsets [begin, end] with 0 <= begin <= end", offsets)
    nbytes = math.prod(shape) * _ST_ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"{nbytes} bytes for {dtype} {shape}", offsets)
    return offsets[0], offsets[1]


def _is_size(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class SafetensorsSource:
    """Lazy tensor access over one or more safetensors files."""

    def __init__(self, files: dict[str, Path]):
        self._file_of = files  # tensor name -> file
        self._headers: dict[Path, dict] = {}
        self._handles: dict[Path, object] = {}
        for path in sorted(set(files.values())):
            self._headers[path] = _check_safetensors_file(path)
        for name, path in files.items():
            if name not in self._headers[path]:
                raise CheckpointError(f"{path}: the index lists tensor {name!r} in this file but it is absent")

    def names(self) -> list[str]:
        return list(self._file_of)

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        entry = self._headers[self._file_of[name]][name]
        return _ST_DTYPES.get(entry["dtype"], entry["dtype"]), tuple(entry["shape"])

    def load(self, name: str) -> torch.Tensor:
        path = self._file_of[name]
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(str(path), framework="pt")
            return self._handles[path].get_tensor(name)
        except SafetensorError as e:  # what the header check above does not see (the library is stricter)
            raise CheckpointError(f"{path}: corrupt safetensors file ({e}); re-download or re-save the "
                                  "checkpoint") from None


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1}
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _tensor_files(directory: Path) -> dict[str, Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: requires a 'weight_map' object")
        missing = sorted({f for f in weight_map.values() if not (directory / f).exists()})
        if missing:
            raise CheckpointError(f"{index}: shard files listed but missing: {', '.join(missing)}")
        return {name: directory / f for name, f in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: requires model.safetensors or model.safetensors.index.json; found neither")
    out: dict[str, Path] = {}
    for path in files:
        for name in _check_safetensors_file(path):
            if name != "__metadata__":
                out[name] = path
    return out


def _chat_template(directory: Path, tokenizer_config: dict) -> str | None:
    if (directory / "chat_template.jinja").exists():
        return (directory / "chat_template.jinja").read_text()
    if (directory / "chat_template.json").exists():
        return _read_json(directory / "chat_template.json").get("chat_template")
    if isinstance(tokenizer_config.get("chat_template"), str):
        return tokenizer_config["chat_template"]
    return None


def read_hf(directory: Path) -> Checkpoint:
    config_path = directory / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{directory}: requires config.json (a Hugging Face model directory) or a .gguf file")
    config = _read_json(config_path)
    notes = []
    if "text_config" in config:
        if not isinstance(config["text_config"], dict):
            raise CheckpointError(f"{config_path}: text_config requires an object; got {config['text_config']!r:.40}")
        text = dict(config["text_config"])
        text["wrapper_architectures"] = config.get("architectures", [])
        # A text_config without architectures is built by the family that knows the wrapper (text-only).
        text["architectures"] = text.get("architectures") or config.get("architectures", [])
        notes.append(f"config: using text_config of {config.get('architectures')}")
        if "quantization_config" in config and "quantization_config" not in text:
            text["quantization_config"] = config["quantization_config"]
        if "tie_word_embeddings" in config:  # transformers ties the wrapper's lm_head by the wrapper's flag
            text["tie_word_embeddings"] = config["tie_word_embeddings"]
        config = text
    tokenizer_config = _read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").exists() else {}
    chat_template = _chat_template(directory, tokenizer_config)
    tokenizer_json = _read_tokenizer(directory / "tokenizer.json")
    generation_config = (_read_json(directory / "generation_config.json")
                         if (directory / "generation_config.json").exists() else {})
    return Checkpoint(path=directory, format="hf", config=config, tensors=SafetensorsSource(_tensor_files(directory)),
                      tokenizer_json=tokenizer_json, tokenizer_config=tokenizer_config, chat_template=chat_template,
                      generation_config=generation_config, notes=notes)


def override_tokenizer(checkpoint: Checkpoint, source: str) -> None:
    """`--tokenizer SOURCE`: the tokenizer, its config and chat template of an HF directory (or model id)
    replace the checkpoint's (a GGUF's rebuilt tokenizer, say); recorded as a reader note."""
    from rdnac.compiler.model_ids import parse_model_id, resolve

    model_id = parse_model_id(source)
    directory = resolve(model_id).path if model_id is not None else Path(source)
    if not directory.is_dir() or not (directory / "tokenizer.json").exists():
        raise CheckpointError(f"--tokenizer {source}: requires a directory with tokenizer.json (a Hugging Face "
                              f"model or tokenizer directory); got {'no tokenizer.json in it' if directory.is_dir() else 'no such directory'}")
    checkpoint.tokenizer_json = _read_tokenizer(directory / "tokenizer.json")
    config_path = directory / "tokenizer_config.json"
    if config_path.exists():
        checkpoint.tokenizer_config = _read_json(config_path)
    template = _chat_template(directory, checkpoint.tokenizer_config if config_path.exists() else {})
    if template is not None:
        checkpoint.chat_template = template
    checkpoint.notes.append(f"tokenizer: from {directory} (--tokenizer), replacing the checkpoint's")
