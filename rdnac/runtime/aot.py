"""Launch a plan's precompiled kernels: hsaco/cubin loaded through Triton's driver, never compiled.

`AotLauncher` implements the same `launch(kernel, grid, args, *, constexprs,
num_warps, num_stages)` as the other launchers, so the kernel wrappers run
unchanged over a plan's binaries. At construction it checks the plan's target
against the running GPU, each binary's sha256, and the Triton version that
built it; at each launch it finds the binary by the same specialization key
the compiler's recorder produced and checks the alignment/divisibility the binary
assumes against the actual arguments. A launch with no binary is an error,
never a JIT. Imports nothing from `rdnac.compiler`.

Loading and launching go through the driver API directly (`rdnac.runtime.driver`):
Triton's own launcher would build C host stubs with the system compiler on
first use (Triton 3.6: one per argument signature, 6.6 s for an 8B plan on a
fresh machine), a run-time compile the plan promises not to do.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from rdnac.errors import PlanError, TargetError
from rdnac.kernels.launch import divisible_args, full_constexprs, kernel_name, resolve_kernel, triton_type, with_pdl
from rdnac.plans.binaries import KernelBinary, spec_key
from rdnac.runtime.driver import Kernel, driver_api
from rdnac.runtime.kernel_check import check_binary
from rdnac.targets import get_target


@dataclass
class _Loaded:
    binary: KernelBinary
    kernel: Kernel | None  # loaded into the driver (None only in unit tests of the checks)
    aligned: list[tuple[int, str]]  # (runtime arg index, name) assumed 16-byte aligned
    divisible: list[tuple[int, str]]  # (runtime arg index, name) assumed divisible by 16


def device_arch(device: Any) -> tuple[str, str]:
    """(rdnac-style arch name, GPU name) of a torch cuda device: ("gfx1201", ...) on ROCm, ("sm90", ...) on NVIDIA."""
    import torch

    props = torch.cuda.get_device_properties(device)
    if torch.version.hip:
        return props.gcnArchName.split(":")[0], props.name
    return f"sm{props.major}{props.minor}", props.name


def check_target(target_name: str, device: Any) -> None:
    """Raise TargetError unless the running GPU is the plan's target."""
    target = get_target(target_name)
    arch, gpu = device_arch(device)
    expected = target.arch if target.backend == "hip" else f"sm{target.arch}"
    if arch != expected:
        from rdnac.targets import TARGETS

        fix = f"compile the plan with --target {arch}" if arch in TARGETS else \
            f"run it on a {target.name} GPU ({arch} is not an rdnac target; known: {', '.join(TARGETS)})"
        raise TargetError(f"this plan's kernels require a {target.name} GPU ({target.description}); "
                          f"got {gpu} ({arch}); do {fix}")


def rebuild(binary: dict[str, Any]) -> dict[str, Any]:
    """Recompile one kernel with the installed Triton, from rdnac's installed kernel library (by
    "module:function", never from code in the plan), with the same specialization and target."""
    from rdnac.targets.compile import compile_call  # the one path where the runtime compiles, on request

    old = KernelBinary.from_dict(binary)
    return compile_call(old.call, old.target).to_dict()


def is_stale(binary: KernelBinary) -> str:
    """Why `binary` cannot be loaded as is (another Triton, changed kernel source), or ""."""
    import triton

    if binary.triton_version != triton.__version__:
        return f"built by Triton {binary.triton_version}, installed is {triton.__version__}"
    if resolve_kernel(binary.kernel).cache_key != binary.source_hash:
        return "the installed kernel source differs from the one it was built from"
    return ""


def _arg_class(arg: Any) -> Any:
    """What decides an argument's Triton type (`triton_type`), cheaply: a tensor's dtype, an int's width."""
    t = type(arg)
    if t is int:
        return "i32" if -2147483648 <= arg < 2147483648 else "i64" if -(2**63) <= arg < 2**63 else "u64"
    if t is bool or t is float:
        return t
    return arg.dtype


class AotLauncher:
    """Run kernels from a plan's binaries (dicts as stored in the plan) on one GPU."""

    def __init__(self, binaries: list[dict[str, Any]], device: Any = "cuda", *, allow_rebuild: bool = True,
                 pdl: bool = False, launch_pdl: bool = True, early_meta: bool = False,
                 early_weights: bool = False) -> None:
        """`pdl`: the plan was recorded with programmatic dependent launch (its runtime["pdl"]): launches
        look up their PDL=True binaries. `launch_pdl=False` launches those binaries without the launch
        attribute (their griddepcontrol instructions are then no-ops): for measuring what PDL gains.
        `early_meta`, `early_weights`: the plan's runtime flags of those names (binaries with EARLY_META=True,
        EARLY_WEIGHTS=True: see with_pdl)."""
        import torch

        self.pdl, self.launch_pdl, self.early_meta, self.early_weights = pdl, launch_pdl, early_meta, early_weights
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device(self.device.type, torch.cuda.current_device())
        self._api = driver_api("hip" if torch.version.hip else "cuda")
        self._stream_of = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # device index -> stream handle
        if self._stream_of is None:  # the private fast path is gone: the public one
            self._stream_of = lambda index: torch.cuda.current_stream(index).cuda_stream
        self._current_device = torch.cuda.current_device
        self._kernels: dict[str, _Loaded] = {}
        self._memo: dict[tuple, _Loaded] = {}
        self.rebuilt: list[str] = []  # keys of kernels rebuilt at load, for the engine to report
        for i, d in enumerate(binaries):
            # its name, arguments, key, sha256 and metadata (runtime/kernel_check.py), then the device
            binary = check_binary(d, get_target(d["target"]), f"kernel binary {i}")
            check_target(binary.target, self.device)
            reason = is_stale(binary)
            if reason:
                if not allow_rebuild:
                    raise PlanError(f"kernel {binary.key} requires the Triton and kernel library it was built "
                                    f"with; it was {reason}; do recompile the plan on this machine")
                try:
                    binary = check_binary(rebuild(d), get_target(d["target"]), f"kernel binary {i}")
                except Exception as e:
                    raise PlanError(f"kernel {binary.key} was {reason} and requires a rebuild from rdnac's "
                                    f"installed kernel library; that failed ({type(e).__name__}: {e}); "
                                    f"do recompile the plan on this machine") from e
                self.rebuilt.append(binary.key)
                stale_reason = reason
            self._kernels[binary.key] = self._load(binary)
        if self.rebuilt:  # one warning for the plan, not one per kernel
            warnings.warn(f"rdnac: {len(self.rebuilt)} kernel(s) of this plan were {stale_reason}; rebuilt them "
                          f"from rdnac's installed kernel library (recompile the plan to skip this)", stacklevel=2)

    def _load(self, binary: KernelBinary) -> _Loaded:
        import torch

        meta, call = binary.metadata, binary.call  # checked by check_binary: no unsupported launch feature
        what = f"kernel {binary.kernel} ({binary.key})"
        runtime = [p.name for p in resolve_kernel(binary.kernel).params if not p.is_constexpr]
        with torch.cuda.device(self.device):
            kernel = self._api.load(binary.binary, meta["name"], signature=[call.signature[a] for a in runtime],
                                    num_warps=meta["num_warps"], warp_size=meta.get("warp_size", 32),
                                    shared=meta["shared"], device_index=self.device.index, what=what,
                                    pdl=self.launch_pdl and call.constexprs.get("PDL") is True)
        return _Loaded(binary, kernel,
                       [(runtime.index(a), a) for a in call.aligned],
                       [(runtime.index(a), a) for a in call.divisible])

    @classmethod
    def for_plan(cls, body: dict[str, Any], device: Any = "cuda", **kwargs: Any) -> "AotLauncher":
        """The launcher of a plan's binaries, with the launch flags they were recorded with (its runtime's
        `pdl`, `early_meta` and `early_weights`): every caller that runs a plan goes through here, so none asks
        for binaries it lacks."""
        runtime = body["runtime"]
        return cls(body["kernels"], device, pdl=runtime.get("pdl", False),
                   early_meta=runtime.get("early_meta", False), early_weights=runtime.get("early_weights", False),
                   **kwargs)

    def launch(self, kernel, grid, args, *, constexprs, num_warps=4, num_stages=2):
        constexprs = with_pdl(kernel, constexprs, self.pdl, self.early_meta, self.early_weights)
        divisible = divisible_args(kernel, args)
        memo_key = (id(kernel), tuple(map(_arg_class, args)), tuple(sorted(constexprs.items())),
                    num_warps, num_stages, divisible)
        loaded = self._memo.get(memo_key)
        if loaded is None:
            key = spec_key(kernel_name(kernel), [triton_type(a) for a in args], full_constexprs(kernel, constexprs),
                           num_warps, num_stages, divisible)
            loaded = self._kernels.get(key)
            if loaded is None:
                raise PlanError(self._missing(kernel_name(kernel), key))
            self._memo[memo_key] = loaded
        self._check_assumptions(loaded, args)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        index = self.device.index
        if self._current_device() != index:
            import torch

            with torch.cuda.device(self.device):
                self._api.launch(loaded.kernel, grid, args, self._stream_of(index), index)
        else:
            self._api.launch(loaded.kernel, grid, args, self._stream_of(index), index)

    def _check_assumptions(self, loaded: _Loaded, args) -> None:
        for i, name in loaded.aligned:
            if args[i].data_ptr() % 16:
                raise PlanError(f"kernel {loaded.binary.kernel} requires argument {name} 16-byte aligned (its "
                                f"binary assumes it); got address {args[i].data_ptr():#x}; do pass an aligned "
                                f"tensor (a fresh allocation, not an odd-offset view)")
        for i, name in loaded.divisible:
            if args[i] % 16:
                raise PlanError(f"kernel {loaded.binary.kernel} requires argument {name} divisible by 16 (its "
                                f"binary assumes it); got {args[i]}; do recompile without that assumption")

    def _missing(self, kernel: str, key: str) -> str:
        known = [k for k, v in self._kernels.items() if v.binary.kernel == kernel]
        listing = "\n  ".join(known) if known else "(none for this kernel)"
        return (f"kernel {kernel} requires a precompiled binary for specialization {key}; the plan has:\n  "
                f"{listing}\ndo recompile the plan (this launch was not recorded when it was built)")
