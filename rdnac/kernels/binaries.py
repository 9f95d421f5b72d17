"""Kernel binaries: the record a plan carries for each compiled kernel, and how one is made.

A `KernelBinary` is one specialization (`KernelCall`) compiled by Triton for
one target: the hsaco/cubin bytes, the metadata Triton's `CompiledKernel`
needs to launch it, and the resources it costs (shared memory, registers,
spills, matrix instructions). It lives here, outside `rdnac.compiler`, because
both sides need it: `rdnac.compiler.build` produces them (cached, in
parallel) and `rdnac.runtime.aot` loads them, or, when the plan was built by
another Triton version, rebuilds one kernel from rdnac's installed library by
name with `compile_call`.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rdnac.kernels.launch import KernelCall, decode_constexpr, resolve_kernel
from rdnac.targets import Target, get_target

BINARY_FORMAT_VERSION = 2  # 2: NVIDIA spills from ptxas -v
# Pinned, not left to Triton's default: Triton 3.10 turns FP fusion off by default.
COMPILE_OPTIONS = {"enable_fp_fusion": True}

_AMD_MATRIX = re.compile(r"\bv_(?:wmma|swmmac|mfma)_\w+")
_NV_MATRIX = re.compile(r"\b(?:wgmma\.mma_async|mma\.sync|tcgen05\.mma)[\w.]*")
_AMD_COUNTS = re.compile(r"\.(vgpr_count|sgpr_count|vgpr_spill_count|sgpr_spill_count|agpr_count):\s+(\d+)")
_NV_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


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


def triton_signature(kernel: Any, call: KernelCall) -> dict[str, str]:
    """Triton's full signature, every parameter in order, constexprs typed "constexpr"."""
    return {p.name: "constexpr" if p.is_constexpr else call.signature[p.name] for p in kernel.params}


def triton_attrs(kernel: Any, call: KernelCall) -> dict[tuple[int, ...], list[list[Any]]]:
    """The assumptions baked into the binary, in the form `ASTSource(attrs=...)` takes (3.6 and 3.9 alike)."""
    assumed = set(call.aligned) | set(call.divisible)
    return {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params) if p.name in assumed}


def triton_compile(call: KernelCall, target: Target | str) -> Any:
    """Triton's CompiledKernel of one specialization for `target` (its `asm` holds the TTGIR, PTX or
    AMDGCN and the binary), built with the installed Triton, no GPU needed."""
    import triton
    from triton.compiler import ASTSource

    target = get_target(target)
    kernel = resolve_kernel(call.kernel)
    src = ASTSource(fn=kernel, signature=triton_signature(kernel, call),
                    constexprs={k: decode_constexpr(v) for k, v in call.constexprs.items()},
                    attrs=triton_attrs(kernel, call))
    options = {"num_warps": call.num_warps, "num_stages": call.num_stages, **COMPILE_OPTIONS}
    return triton.compile(src, target=target.gpu_target(), options=options)


def compile_call(call: KernelCall, target: Target | str) -> KernelBinary:
    """Compile one specialization for `target` with the installed Triton (no GPU needed)."""
    import triton

    target = get_target(target)
    kernel = resolve_kernel(call.kernel)
    compiled = triton_compile(call, target)
    ext = "hsaco" if target.backend == "hip" else "cubin"
    binary = bytes(compiled.asm[ext])
    json_path = next(p for name, p in compiled.metadata_group.items() if name.endswith(".json"))
    metadata = json.loads(Path(json_path).read_text())
    return KernelBinary(kernel=call.kernel, key=call.key, call=call, target=target.name,
                        triton_version=triton.__version__, source_hash=kernel.cache_key, binary=binary,
                        binary_ext=ext, metadata=metadata, resources=read_resources(compiled, target),
                        sha256=sha256_hex(binary))


def read_resources(compiled: Any, target: Target) -> Resources:
    """Resources of a Triton `CompiledKernel`, from its amdgcn text or its ptx + cubin."""
    shared = int(compiled.metadata.shared)
    if target.backend == "hip":
        amdgcn = compiled.asm["amdgcn"]
        counts = {name: int(value) for name, value in _AMD_COUNTS.findall(amdgcn)}
        return Resources(shared, counts.get("vgpr_count"), counts.get("sgpr_count"),
                         counts.get("vgpr_spill_count", 0) + counts.get("sgpr_spill_count", 0),
                         matrix_instructions(amdgcn))
    regs, _stack, _local = nvidia_usage(compiled.asm["cubin"])
    return Resources(shared, regs, None, nvidia_spills(compiled.asm["ptx"], compiled.metadata.target.arch),
                     matrix_instructions(compiled.asm["ptx"]))


_NV_SPILLS = re.compile(r"(\d+) bytes spill stores")


def nvidia_spills(ptx: str, arch: int) -> int:
    """Register spills (4-byte slots) as ptxas reports them.

    Not stack + local bytes: libdevice's precise sin/cos keep a local array for
    their slow argument reduction, which is local memory but not a spill."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch)  # the ptxas Triton itself uses for this arch (3.6 and 3.9)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([ptxas.path, "-v", f"--gpu-name={gpu}", str(path), "-o",
                              str(Path(tmp) / "k.cubin")], capture_output=True, text=True, check=True)
    stores = [int(n) for n in _NV_SPILLS.findall(out.stdout + out.stderr)]
    assert stores, f"ptxas -v printed no spill line:\n{out.stderr}"
    return max(stores) // 4


def matrix_instructions(asm: str) -> tuple[str, ...]:
    """Distinct matrix instructions in amdgcn or ptx text."""
    return tuple(sorted(set(_AMD_MATRIX.findall(asm)) | set(_NV_MATRIX.findall(asm))))


def nvidia_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack bytes, local bytes) per thread of a single-kernel cubin.

    Triton reads n_regs/n_spills only when it loads a kernel on a GPU; cuobjdump
    (shipped inside the Triton wheel) reads the same numbers from the cubin."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    match = _NV_USAGE.search(out)
    assert match, f"cuobjdump printed no resource usage:\n{out}"
    regs, stack, _, local = (int(g) for g in match.groups())
    return regs, stack, local
