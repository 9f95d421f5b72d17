"""Compile one kernel specialization for a target, and read what the binary costs there.

`compile_call` turns a `KernelCall` (rdnac.plans.binaries) into a
`KernelBinary` with the installed Triton, on any machine (no GPU needed), and
reads its resources from Triton's outputs: shared memory, registers, spills
(the amdgcn text on AMD; ptxas -v and cuobjdump on NVIDIA) and the matrix
instructions it uses. The compiler's build (`rdnac.compiler.build`: parallel,
cached) calls it for every specialization a plan needs; the capability probe
uses the same options and instruction scan; and the runtime calls it for the
one case where it compiles, on request: rebuilding a plan's kernel that another
Triton built, from rdnac's installed kernel library by name.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from rdnac.kernels.launch import decode_constexpr, resolve_kernel
from rdnac.plans.binaries import KernelBinary, KernelCall, Resources, sha256_hex
from rdnac.targets import Target, get_target

# Pinned, not left to Triton's default: Triton 3.10 turns FP fusion off by default.
COMPILE_OPTIONS = {"enable_fp_fusion": True}

_AMD_MATRIX = re.compile(r"\bv_(?:wmma|swmmac|mfma)_\w+")
_NV_MATRIX = re.compile(r"\b(?:wgmma\.mma_async|mma\.sync|tcgen05\.mma)[\w.]*")
_AMD_COUNTS = re.compile(r"\.(vgpr_count|sgpr_count|vgpr_spill_count|sgpr_spill_count|agpr_count):\s+(\d+)")
_NV_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


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
