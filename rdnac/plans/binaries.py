"""The kernel records a plan carries: each specialization (`KernelCall`) and its binary (`KernelBinary`).

`KernelCall` is one specialization of a kernel in rdnac's library: argument
types, constexprs, warps, stages and the alignment/divisibility it assumes;
`spec_key` is the key a launch finds its binary by. `KernelBinary` is that
specialization compiled for one target: the hsaco/cubin bytes, the metadata
Triton's loader needs, and what it costs there (`Resources`). They are plan
format: `rdnac.compiler.build` writes them (through `rdnac.targets.compile`),
`rdnac.runtime.aot` reads them, `rdnac inspect` shows them. Plain data only;
nothing here imports Triton.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

BINARY_FORMAT_VERSION = 2  # 2: NVIDIA spills from ptxas -v


def spec_key(kernel: str, types: Any, constexprs: dict[str, Any], num_warps: int, num_stages: int,
             divisible: tuple[str, ...] = ()) -> str:
    """The lookup key of one specialization: kernel, argument types, constexprs, warps, stages, and
    which of the kernel's declared shape ints are divisible by 16 (see `divisible_args`).

    Pointer alignment is not part of it: it is checked against the actual
    arguments when the binary found by this key launches."""
    cx = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(constexprs.items()))
    div = f"|div16={','.join(divisible)}" if divisible else ""
    return f"{kernel}({','.join(types)}){{{cx}}}w{num_warps}s{num_stages}{div}"


@dataclass(frozen=True, eq=True)
class KernelCall:
    """One kernel specialization a plan needs compiled (msgpack-safe via to_dict)."""

    kernel: str  # "module:function" in rdnac's kernel library
    signature: dict[str, str]  # runtime arg -> Triton type ("*bf16", "i32", "fp32"), in parameter order
    constexprs: dict[str, Any]  # every constexpr of the kernel (defaults filled), encoded values
    num_warps: int = 4
    num_stages: int = 2
    aligned: tuple[str, ...] | None = None  # pointer args assumed 16-byte aligned; None: all of them
    divisible: tuple[str, ...] = ()  # int args assumed divisible by 16; none by default (token counts vary)

    def __post_init__(self) -> None:
        pointers = tuple(a for a, ty in self.signature.items() if ty.startswith("*"))
        if self.aligned is None:
            object.__setattr__(self, "aligned", pointers)
        object.__setattr__(self, "aligned", tuple(self.aligned))
        object.__setattr__(self, "divisible", tuple(self.divisible))
        assert set(self.aligned) <= set(pointers), f"{self.kernel}: aligned {self.aligned} names non-pointer args"
        ints = {a for a, ty in self.signature.items() if ty[0] in "iu"}
        assert set(self.divisible) <= ints, f"{self.kernel}: divisible {self.divisible} names non-integer args"

    def __hash__(self) -> int:
        return hash((self.key, self.aligned, self.divisible))

    @property
    def key(self) -> str:
        return spec_key(self.kernel, self.signature.values(), self.constexprs, self.num_warps, self.num_stages,
                        self.divisible)

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "signature": dict(self.signature), "constexprs": dict(self.constexprs),
                "num_warps": self.num_warps, "num_stages": self.num_stages,
                "aligned": list(self.aligned), "divisible": list(self.divisible)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KernelCall:
        return cls(d["kernel"], dict(d["signature"]), dict(d["constexprs"]), d["num_warps"], d["num_stages"],
                   tuple(d["aligned"]), tuple(d["divisible"]))


@dataclass(frozen=True)
class Resources:
    """What one binary costs on its target, read from Triton's outputs at compile time."""

    shared_bytes: int  # dynamic LDS/shared memory per block (Triton's metadata.shared)
    num_regs: int | None  # VGPRs per lane (AMD) / registers per thread (NVIDIA)
    num_sgprs: int | None  # AMD scalar registers; None on NVIDIA
    num_spills: int  # AMD: VGPR + SGPR spill count; NVIDIA: ptxas's spill-store bytes / 4
    matrix_instructions: tuple[str, ...] = ()  # distinct v_wmma_*/v_mfma_* (AMD), wgmma/mma (NVIDIA)

    def to_dict(self) -> dict[str, Any]:
        return {"shared_bytes": self.shared_bytes, "num_regs": self.num_regs, "num_sgprs": self.num_sgprs,
                "num_spills": self.num_spills, "matrix_instructions": list(self.matrix_instructions)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Resources:
        return cls(d["shared_bytes"], d["num_regs"], d["num_sgprs"], d["num_spills"],
                   tuple(d["matrix_instructions"]))


@dataclass(frozen=True)
class KernelBinary:
    """One compiled specialization; `to_dict()` holds only msgpack-safe values."""

    kernel: str  # "module:function" in rdnac's kernel library
    key: str  # the specialization key (`KernelCall.key`) a launch looks it up by
    call: KernelCall  # the specialization, with its alignment/divisibility assumptions
    target: str  # rdnac target name ("gfx1201", "sm90")
    triton_version: str  # Triton that built it; another installed version means rebuild
    source_hash: str  # Triton's hash of the kernel source (and the jit functions it uses)
    binary: bytes = field(repr=False)  # hsaco (AMD) or cubin (NVIDIA)
    binary_ext: str  # "hsaco" | "cubin": the key Triton's CompiledKernel reads the binary under
    metadata: dict[str, Any] = field(repr=False)  # Triton's metadata JSON (name, shared, num_warps, target, ...)
    resources: Resources
    sha256: str  # of `binary`, checked at load

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": BINARY_FORMAT_VERSION, "kernel": self.kernel, "key": self.key,
                "call": self.call.to_dict(), "target": self.target, "triton_version": self.triton_version,
                "source_hash": self.source_hash, "binary": bytes(self.binary), "binary_ext": self.binary_ext,
                "metadata": self.metadata, "resources": self.resources.to_dict(), "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KernelBinary:
        from rdnac.errors import PlanError

        if d.get("format_version") != BINARY_FORMAT_VERSION:
            raise PlanError(f"kernel binary {d.get('kernel', '?')} requires binary format version "
                            f"{BINARY_FORMAT_VERSION}; got {d.get('format_version')!r}; do recompile the plan")
        return cls(d["kernel"], d["key"], KernelCall.from_dict(d["call"]), d["target"], d["triton_version"],
                   d["source_hash"], bytes(d["binary"]), d["binary_ext"], dict(d["metadata"]),
                   Resources.from_dict(d["resources"]), d["sha256"])


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
