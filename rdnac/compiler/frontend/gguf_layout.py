"""A bounds check of a GGUF file's header before the `gguf` package parses it.

`gguf.GGUFReader` trusts every count in the file: a damaged array length
(one flipped bit in a 300-entry token list) makes it walk hundreds of
thousands of phantom strings through numpy memmaps, tens of seconds before it
fails. This walk reads the same layout with `struct`, checking each length and
count against the bytes left, and refuses a damaged file in milliseconds
naming where it broke. gguf_reader.py calls it first; the reader still decodes.

Layout (GGUF v2/v3): magic "GGUF", u32 version, u64 tensor count, u64 key-value
count; each key-value: string key, u32 type, value (an array is u32 item type,
u64 count, items); each tensor info: string name, u32 dims, u64 per dim, u32
type, u64 offset. A string is a u64 length and that many bytes.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from rdnac.errors import CheckpointError

# value type -> its fixed size (strings and arrays have none)
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


class _Damaged(Exception):
    pass


def check_layout(path: Path) -> None:
    """Raise CheckpointError if the header's lengths and counts do not fit in the file."""
    if path.stat().st_size < 24:
        return  # no room for a header: gguf_reader.py says the file is truncated
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:  # only the header is read
        _walk(path, data)


def _walk(path: Path, data) -> None:
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise _Damaged(f"a {size}-byte field at byte {pos} runs past the end")
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += size
        return value

    def skip(count: int, size: int, what: str) -> None:
        nonlocal pos
        if count * size > len(data) - pos:
            raise _Damaged(f"{what} of {count} x {size} bytes at byte {pos} is longer than the rest of the file")
        pos += count * size

    def string(what: str) -> None:
        skip(take("<Q"), 1, what)

    def value(kind: int, what: str, depth: int = 0) -> None:
        if kind in _FIXED:
            skip(1, _FIXED[kind], what)
        elif kind == _STRING:
            string(what)
        elif kind == _ARRAY and depth == 0:
            item, count = take("<I"), take("<Q")
            if item in _FIXED:
                skip(count, _FIXED[item], what)
            elif item == _STRING or (item == _ARRAY and depth == 0):
                if count * 8 > len(data) - pos:  # each item is at least its 8-byte length: bound the walk first
                    raise _Damaged(f"{what}: {count} items at byte {pos} cannot fit in the rest of the file")
                for _ in range(count):
                    value(item, what, depth + 1)
            else:
                raise _Damaged(f"{what}: array item type {item} is not a GGUF type")
        else:
            raise _Damaged(f"{what}: value type {kind} is not a GGUF type")

    try:
        if data[:4] != b"GGUF":
            return  # not GGUF at all: gguf_reader.py says so
        pos = 4
        version = take("<I")
        if version not in (2, 3):
            return  # gguf_reader.py names the version
        num_tensors, num_kv = take("<Q"), take("<Q")
        skip(num_kv, 12, "the key-value count")  # a key's length and a value's type at least
        skip(num_tensors, 24, "the tensor count")
        pos = 24
        for i in range(num_kv):
            string(f"key-value {i}'s key")
            value(take("<I"), f"key-value {i}")
        for i in range(num_tensors):
            string(f"tensor info {i}'s name")
            dims = take("<I")
            if not 1 <= dims <= _MAX_DIMS:
                raise _Damaged(f"tensor info {i} has {dims} dimensions; GGUF allows 1 to {_MAX_DIMS}")
            skip(dims, 8, f"tensor info {i}'s dimensions")
            skip(1, 12, f"tensor info {i}'s type and offset")
    except _Damaged as e:
        raise CheckpointError(f"{path}: requires a complete GGUF file; got a damaged header ({e}); re-download or "
                              "re-convert it") from None
