"""The weights sidecar (`PLAN.weights.safetensors`): its record in the plan, and reading it back checked.

A safetensors file is an 8-byte little-endian header length, a JSON header
({name: {dtype, shape, data_offsets}}), then the tensors' bytes. The plan
records the file's size and sha256, and one xxh3-64 checksum per tensor
(`record_weights`). `read_weights` reads each tensor's bytes in chunks into
its destination buffer and checksums every chunk while it is still in cache,
so verifying costs a few percent of a load (BENCHMARKS.md) and is on by
default; a mismatch names the tensor and the file. Plans written before the
per-tensor record fall back to the whole file's sha256 (a second full read).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

from rdnac.errors import PlanError

CHECKSUM = "xxh3_64"  # the per-tensor checksum a plan records (the xxhash package)
_CHUNK = 1 << 22  # 4 MiB: hashed while it is still in cache
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
# safetensors dtype names -> torch dtypes
ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2": torch.float8_e5m2,
             "BOOL": torch.bool}


def _xxhash():
    try:
        import xxhash
    except ImportError:
        raise PlanError("checking plan weights requires the xxhash package (an rdnac dependency); got none "
                        "installed; do `pip install xxhash`") from None
    return xxhash


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the first tensor byte, {name: entry}) of a safetensors file; a bad header is a PlanError."""
    with path.open("rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= _MAX_HEADER:
            raise PlanError(f"{path}: requires a safetensors header; got a corrupt or truncated file; "
                            "recompile or copy the matching file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            raise PlanError(f"{path}: requires a safetensors header (JSON); got a corrupt one; recompile or "
                            "copy the matching file") from None
    if not isinstance(header, dict):
        raise PlanError(f"{path}: requires a safetensors header (a JSON map); got {type(header).__name__}")
    header.pop("__metadata__", None)
    return 8 + n, header


def record_weights(path: Path) -> dict:
    """The plan's record of a weights file just written: size, sha256, and a checksum per tensor.
    One sequential read computes both hashes."""
    xxhash = _xxhash()
    start, header = read_header(path)
    whole = hashlib.sha256()
    checksums = {}
    with path.open("rb") as f:
        whole.update(f.read(start))
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            assert f.tell() == start + begin, f"{path}: safetensors data of {name} is not contiguous"
            h = xxhash.xxh3_64()
            for pos in range(begin, end, _CHUNK):
                chunk = f.read(min(_CHUNK, end - pos))
                h.update(chunk)
                whole.update(chunk)
            checksums[name] = h.hexdigest()
        whole.update(f.read())
    return {"size": path.stat().st_size, "sha256": whole.hexdigest(), "checksum": CHECKSUM, "tensors": checksums}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def read_weights(path: Path, header: tuple[int, dict], names: list[str], device: str,
                 checksums: dict[str, str] | None, plan_path: Path) -> dict[str, torch.Tensor]:
    """The tensors `names` of the file, read chunk by chunk; with `checksums`, each chunk is hashed as it
    lands and a tensor whose bytes do not match its recorded checksum is refused, naming it."""
    h_new = _xxhash().xxh3_64 if checksums is not None else None
    start, entries = header
    out = {}
    with path.open("rb", buffering=0) as f:
        for name in sorted(names, key=lambda n: entries[n]["data_offsets"][0]):  # one forward pass
            entry = entries[name]
            begin, end = entry["data_offsets"]
            buf = torch.empty(end - begin, dtype=torch.uint8)  # [bytes]
            view = memoryview(buf.numpy())
            h = h_new() if h_new else None
            f.seek(start + begin)
            pos = 0
            while pos < len(view):
                got = f.readinto(view[pos:pos + _CHUNK])
                if not got:
                    raise PlanError(f"{path}: tensor {name!r} is cut short at byte {pos} of {len(view)}; the file "
                                    "is truncated; recompile or copy the matching file")
                if h is not None:
                    h.update(view[pos:pos + got])
                pos += got
            if h is not None and h.hexdigest() != checksums.get(name):
                raise PlanError(f"{path}: tensor {name!r} requires the {CHECKSUM} checksum {plan_path.name} "
                                f"records ({checksums.get(name)}); got {h.hexdigest()}: the weights file is corrupt "
                                "or from another compile; recompile or copy the matching file")
            tensor = buf.view(ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])
            out[name] = tensor if device == "cpu" else tensor.to(device)
    return out
