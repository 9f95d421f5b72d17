"""Capabilities probed by trial compilation with the installed Triton (no GPU needed).

For one target: does a bf16 / FP8 (e4m3fn and e4m3fnuz) / int8 `tl.dot`
compile, and to which matrix instructions (`v_wmma_*`, `v_mfma_*`, `wgmma`,
`mma`)? An FP8 format counts as native only if its dot emitted an FP8 matrix
instruction (Triton also compiles FP8 dots by upcasting to f16, which is
slower than a16w8). Results are cached on disk per target and Triton version
and embed in a plan header via `to_dict()`. A probe that fails to compile
records why instead of raising.

    caps = probe("gfx942")
    caps.fp8_format          # "e4m3fnuz"
    caps.bf16_dot.matrix_instructions   # ("v_mfma_f32_32x32x8_bf16",)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rdnac.targets import Target, get_target

PROBE_VERSION = 1  # bump when the probe kernels or their reading change
# FP8 formats by rdnac name -> Triton pointee type.
FP8_TRITON_TYPES = {"e4m3fn": "fp8e4nv", "e4m3fnuz": "fp8e4b8"}
# Tile of the probe GEMM: big enough for wgmma on NVIDIA (M=64 per warpgroup);
# small on AMD, where emulated FP8 dots compile slowly (minutes at 64^3 on gfx1151 with Triton 3.6).
_PROBE_TILE = {"cuda": (64, 64, 64), "hip": (32, 32, 32)}


def user_cache_dir() -> Path:
    """rdnac's cache root: $XDG_CACHE_HOME/rdnac, else ~/.cache/rdnac."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rdnac"


@dataclass(frozen=True)
class DotProbe:
    """One trial `tl.dot` compile: its operand type and what came out."""

    dtype: str  # Triton operand type: "bf16", "fp8e4nv", "fp8e4b8", "i8"
    compiled: bool
    matrix_instructions: tuple[str, ...] = ()
    shared_bytes: int = 0
    reason: str = ""  # first line of the compile error when it did not compile

    @property
    def is_native(self) -> bool:
        """Compiled to a matrix instruction that takes this operand type directly."""
        return self.compiled and any(_instr_matches(i, self.dtype) for i in self.matrix_instructions)

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "compiled": self.compiled, "is_native": self.is_native,
                "matrix_instructions": list(self.matrix_instructions), "shared_bytes": self.shared_bytes,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DotProbe:
        return cls(d["dtype"], d["compiled"], tuple(d["matrix_instructions"]), d["shared_bytes"], d["reason"])


def _instr_matches(instr: str, dtype: str) -> bool:
    instr = instr.lower()
    if dtype == "bf16":
        return "bf16" in instr
    if dtype == "i8":
        return any(s in instr for s in ("i8", "iu8", "s8", "u8"))
    # FP8: AMD v_*_fp8_fp8 / v_mfma_*_f8f6f4 (gfx950), NVIDIA e4m3 operands.
    return any(s in instr for s in ("fp8", "bf8", "f8f6f4", "e4m3", "e5m2"))


@dataclass(frozen=True)
class Capabilities:
    """What the installed Triton can emit for one target, probed; embeds in a plan header."""

    target: str
    triton_version: str
    bf16_dot: DotProbe
    fp8_dots: tuple[tuple[str, DotProbe], ...]  # (rdnac format name, probe), e4m3fn then e4m3fnuz
    int8_dot: DotProbe
    lds_bytes: int  # shared memory per block
    lds_source: str  # "device" (read from the running GPU) or "target table" (Triton reports none offline)

    @property
    def fp8_format(self) -> str | None:
        """The FP8 format with native matrix instructions, or None (use a16w8)."""
        return next((fmt for fmt, p in self.fp8_dots if p.is_native), None)

    def fp8_dot(self, fmt: str) -> DotProbe:
        return dict(self.fp8_dots)[fmt]

    def to_dict(self) -> dict[str, Any]:
        return {"probe_version": PROBE_VERSION, "target": self.target, "triton_version": self.triton_version,
                "bf16_dot": self.bf16_dot.to_dict(), "fp8_dots": {f: p.to_dict() for f, p in self.fp8_dots},
                "fp8_format": self.fp8_format, "int8_dot": self.int8_dot.to_dict(),
                "lds_bytes": self.lds_bytes, "lds_source": self.lds_source}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Capabilities:
        return cls(d["target"], d["triton_version"], DotProbe.from_dict(d["bf16_dot"]),
                   tuple((f, DotProbe.from_dict(p)) for f, p in d["fp8_dots"].items()),
                   DotProbe.from_dict(d["int8_dot"]), d["lds_bytes"], d["lds_source"])


def probe(target: Target | str, *, refresh: bool = False, cache_dir: Path | None = None) -> Capabilities:
    """Probe `target` (cached in <cache>/probes/<target>-triton<version>.json unless `refresh`)."""
    import triton

    target = get_target(target)
    assert target.is_gpu, f"target {target.name} has no GPU code to probe"
    path = (cache_dir or user_cache_dir()) / "probes" / f"{target.name}-triton{triton.__version__}.json"
    if not refresh and path.exists():
        cached = json.loads(path.read_text())
        if cached.get("probe_version") == PROBE_VERSION:
            return Capabilities.from_dict(cached)
    caps = _run_probes(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(caps.to_dict(), indent=1))
    os.replace(tmp, path)  # atomic: concurrent probes never see half a file
    return caps


def _run_probes(target: Target) -> Capabilities:
    import triton

    lds_bytes, lds_source = _lds_budget(target)
    return Capabilities(
        target=target.name, triton_version=triton.__version__, bf16_dot=_probe_dot(target, "bf16"),
        fp8_dots=tuple((fmt, _probe_dot(target, ty)) for fmt, ty in FP8_TRITON_TYPES.items()),
        int8_dot=_probe_dot(target, "i8"), lds_bytes=lds_bytes, lds_source=lds_source)


def _probe_dot(target: Target, dtype: str) -> DotProbe:
    import warnings

    import triton
    from triton.compiler import ASTSource

    from rdnac.kernels.testing_kernels import matmul_kernel
    from rdnac.targets.compile import COMPILE_OPTIONS, matrix_instructions

    block_m, block_n, block_k = _PROBE_TILE[target.backend]
    signature = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
                 "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32",
                 "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    src = ASTSource(fn=matmul_kernel, signature=signature,
                    constexprs={"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k})
    try:
        with warnings.catch_warnings():
            # Triton warns when it upcasts a foreign FP8 format; the probe records that as "not native".
            warnings.simplefilter("ignore", UserWarning)
            compiled = triton.compile(src, target=target.gpu_target(),
                                      options={"num_warps": 4, "num_stages": 2, **COMPILE_OPTIONS})
    except Exception as e:  # noqa: BLE001 -- any compile failure is the probe's answer, recorded below
        return DotProbe(dtype, False, reason=_first_line(e))
    asm = compiled.asm["amdgcn" if target.backend == "hip" else "ptx"]
    return DotProbe(dtype, True, matrix_instructions(asm), int(compiled.metadata.shared))


def _first_line(e: BaseException) -> str:
    # Triton's CompilationError starts with a source excerpt ("at 1:0: def ..."); the cause is in error_message.
    text = str(getattr(e, "error_message", None) or e.__cause__ or e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _lds_budget(target: Target) -> tuple[int, str]:
    """Shared memory per block: the running GPU's, when it is this target, else the target table's."""
    try:
        import torch
    except ImportError:
        return target.lds_bytes, "target table"
    if not torch.cuda.is_available():
        return target.lds_bytes, "target table"
    from triton.runtime import driver

    current = driver.active.get_current_target()
    if current.backend != target.backend or current.arch != target.arch:
        return target.lds_bytes, "target table"
    device = driver.active.get_current_device()
    return int(driver.active.utils.get_device_properties(device)["max_shared_mem"]), "device"
