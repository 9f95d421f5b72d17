"""Targets as data: what rdnac knows about each GPU it compiles for.

A `Target` is a frozen record of the facts a pass needs (wave size, LDS per
block, FP8 format, bandwidth) and the ordered tuple of passes it runs. The
numbers come from the table in DESIGN.md; what the installed Triton can
actually emit for a target is probed, not assumed (`rdnac.targets.probe`).

    get_target("gfx1201").lds_bytes        # 65536
    get_target("gfx942").fp8_format        # "e4m3fnuz"
    get_target("sm90").gpu_target()        # GPUTarget("cuda", 90, 32)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rdnac.errors import TargetError

BACKENDS = ("hip", "cuda", "cpu")
FP8_FORMATS = ("e4m3fn", "e4m3fnuz")
DEFAULT_PASSES = ("verify",)  # placeholder: the lead fills in each target's pipeline

KIB = 1024


@dataclass(frozen=True)
class Target:
    name: str  # rdnac's name: "gfx1201", "sm90", "cpu"
    backend: str  # "hip" | "cuda" | "cpu"
    arch: str | int | None  # GPUTarget's arch: "gfx1201" (hip), 90 (cuda), None (cpu)
    warp_size: int  # threads per wave/warp
    lds_bytes: int  # LDS (AMD) / shared memory (NVIDIA) one block may use
    fp8_format: str | None  # the FP8 e4m3 flavour the hardware computes in, or None
    has_mxfp4: bool  # microscaled FP4 matrix instructions
    hbm_gbps: float  # device memory bandwidth, GB/s (roofline for the cost model)
    num_compute_units: int  # CUs (AMD) / SMs (NVIDIA); 0 for cpu
    description: str
    passes: tuple[str, ...] = DEFAULT_PASSES

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise TargetError(f"target {self.name!r} requires backend in {BACKENDS}; got {self.backend!r}")
        if self.fp8_format not in (*FP8_FORMATS, None):
            raise TargetError(f"target {self.name!r} requires fp8_format in {FP8_FORMATS} or None; "
                              f"got {self.fp8_format!r}")
        if self.backend != "cpu":
            if self.warp_size not in (32, 64):
                raise TargetError(f"target {self.name!r} requires warp_size 32 or 64; got {self.warp_size}")
            if self.lds_bytes <= 0 or self.num_compute_units <= 0:
                raise TargetError(f"target {self.name!r} requires positive lds_bytes and num_compute_units")
            expected = str if self.backend == "hip" else int
            if not isinstance(self.arch, expected):
                raise TargetError(f"target {self.name!r} requires a {expected.__name__} arch for backend "
                                  f"{self.backend!r}; got {self.arch!r}")
        if not isinstance(self.passes, tuple):
            raise TargetError(f"target {self.name!r} requires passes as a tuple of pass names; got {self.passes!r}")

    @property
    def is_gpu(self) -> bool:
        return self.backend != "cpu"

    @property
    def has_pdl(self) -> bool:
        """Programmatic dependent launch (griddepcontrol): NVIDIA Hopper and newer."""
        return self.backend == "cuda" and self.arch >= 90

    def gpu_target(self) -> Any:
        """Triton's `GPUTarget` for cross-compiling to this target."""
        if not self.is_gpu:
            raise TargetError(f"target {self.name!r} has no GPU code; requires a GPU target, "
                              f"one of {', '.join(gpu_target_names())}")
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.arch, self.warp_size)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "arch": self.arch, "warp_size": self.warp_size,
                "lds_bytes": self.lds_bytes, "fp8_format": self.fp8_format, "has_mxfp4": self.has_mxfp4,
                "hbm_gbps": self.hbm_gbps, "num_compute_units": self.num_compute_units,
                "description": self.description, "passes": list(self.passes)}


_TARGETS = (
    Target("gfx1201", "hip", "gfx1201", 32, 64 * KIB, "e4m3fn", False, 640, 64,
           "AMD RDNA4, Radeon RX 9070 XT, 16 GB; WMMA fp8 (probed)"),
    Target("gfx1151", "hip", "gfx1151", 32, 64 * KIB, None, False, 256, 40,
           "AMD RDNA3.5, Radeon 8060S (Strix Halo), LPDDR5X; no FP8 in hardware (a16w8, int8 WMMA)"),
    Target("gfx942", "hip", "gfx942", 64, 64 * KIB, "e4m3fnuz", False, 5300, 304,
           "AMD CDNA3, Instinct MI300X; MFMA fp8 in e4m3fnuz (not OCP)"),
    Target("gfx950", "hip", "gfx950", 64, 160 * KIB, "e4m3fn", True, 8000, 256,
           "AMD CDNA4, Instinct MI355X; MFMA f8f6f4, MXFP4"),
    Target("sm90", "cuda", 90, 32, 227 * KIB, "e4m3fn", False, 3350, 132,
           "NVIDIA Hopper, H100 SXM (H200: 4.8 TB/s); wgmma fp8"),
    Target("sm89", "cuda", 89, 32, 99 * KIB, "e4m3fn", False, 864, 142,
           "NVIDIA Ada, L40S; mma fp8"),
    Target("sm80", "cuda", 80, 32, 163 * KIB, None, False, 2039, 108,
           "NVIDIA Ampere, A100 80GB SXM; no FP8"),
    Target("cpu", "cpu", None, 1, 0, None, False, 0, 0,
           "no GPU: the reference interpreter runs the plan graph"),
)
TARGETS: dict[str, Target] = {t.name: t for t in _TARGETS}


def target_names() -> list[str]:
    return list(TARGETS)


def gpu_target_names() -> list[str]:
    return [name for name, t in TARGETS.items() if t.is_gpu]


def get_target(name: str | Target) -> Target:
    """The target called `name`; raises TargetError listing the known ones."""
    if isinstance(name, Target):
        return name
    target = TARGETS.get(name)
    if target is None:
        raise TargetError(f"requires a known target; got {name!r}; "
                          f"use one of: {', '.join(TARGETS)} (see `rdnac targets`)")
    return target

