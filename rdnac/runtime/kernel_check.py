"""A GPU plan's kernels checked against rdnac's kernel library without a device.

`plans/schema.py` checks a plan's fields for type and shape; this checks
what they mean, as far as it can be known without a GPU: each binary record
names a kernel of rdnac's library (resolved only through
`rdnac.kernels.registry`: a plan cannot make the loader import anything
else), for the plan's target, with that kernel's arguments and constexprs,
a specialization key that is the one its call gives, bytes matching their
sha256 and the launch metadata rdnac's launcher needs; each program choice
names the wrapper of its node's op for its phase, at a step key the runtime
looks up. `ModelRunner.load` runs it for every GPU plan before anything else
is done with it (so `--interpret` on a CPU machine refuses what the GPU
loader would), and `AotLauncher` takes its binaries from it.

Whether the bytes are a kernel the GPU runs is the driver's to say, at load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rdnac.errors import PlanError
from rdnac.kernels import registry
from rdnac.kernels.launch import resolve_kernel
from rdnac.plans.binaries import KernelBinary, sha256_hex
from rdnac.targets import Target, get_target

# Triton's signature types of runtime arguments (kernels/launch.py's triton_type picks among these)
_POINTER_TYPES = ("fp32", "fp16", "bf16", "fp64", "fp8e4nv", "fp8e5", "fp8e4b8", "fp8e5b16", "i8", "i16", "i32",
                  "i64", "u8", "u16", "u32", "u64", "i1")
_SCALAR_TYPES = ("i1", "i32", "i64", "u64", "fp32")
_BINARY_EXT = {"cuda": "cubin", "hip": "hsaco"}
_DTYPE_PREFIX = "tl.dtype:"


def check_kernels(body: dict, target_name: str, path: Path | str) -> list[KernelBinary]:
    """The binaries of a GPU plan's body, each checked (see the module docstring); raises PlanError naming
    the plan file, the record and the kernel."""
    target = get_target(target_name)
    if not target.is_gpu or not body.get("kernels"):
        raise PlanError(f"{path}: a GPU plan requires a GPU target and its kernel binaries; got target "
                        f"{target.name} and {len(body.get('kernels') or [])} binaries; the plan file is corrupt: do "
                        f"recompile it")
    binaries = [check_binary(d, target, f"{path}: body.kernels[{i}]") for i, d in enumerate(body["kernels"])]
    keys = [b.key for b in binaries]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise PlanError(f"{path}: body.kernels requires one binary per specialization; got {twice} twice; the plan "
                        f"file is corrupt: do recompile it")
    _check_program(body, path)
    return binaries


def check_binary(d: dict, target: Target, where: str) -> KernelBinary:
    """One binary record (schema-checked) as a KernelBinary of rdnac's library for `target` (a Target)."""
    binary = KernelBinary.from_dict(d)

    def fail(requirement: str, got: Any) -> None:
        raise PlanError(f"{where} (kernel {binary.kernel}) requires {requirement}; got {got}; the plan file is "
                        f"corrupt or was written by another rdnac: do recompile it")

    if binary.target != target.name:
        fail(f"the plan's target {target.name}", binary.target)
    if binary.call.kernel != binary.kernel:
        fail("a call of the same kernel", binary.call.kernel)
    kernel = resolve_kernel(binary.kernel)  # rdnac's kernel library only; PlanError otherwise
    params = kernel.params
    runtime = [p.name for p in params if not p.is_constexpr]
    if list(binary.call.signature) != runtime:
        fail(f"the kernel's runtime arguments in order ({', '.join(runtime)})",
             ", ".join(map(str, binary.call.signature)))
    for arg, ty in binary.call.signature.items():
        if not (ty in _SCALAR_TYPES or (ty.startswith("*") and ty[1:] in _POINTER_TYPES)):
            fail(f"a Triton argument type for {arg} (a pointer *fp32, *bf16, ... or {', '.join(_SCALAR_TYPES)})",
                 repr(ty))
    constexprs = [p.name for p in params if p.is_constexpr]
    if sorted(binary.call.constexprs) != sorted(constexprs):
        fail(f"every constexpr of the kernel ({', '.join(constexprs)})", ", ".join(sorted(binary.call.constexprs)))
    for name, value in binary.call.constexprs.items():
        _check_constexpr(name, value, fail)
    if binary.key != binary.call.key:
        fail(f"the specialization key of its call ({binary.call.key})", binary.key)
    if sha256_hex(binary.binary) != binary.sha256:
        fail(f"bytes matching the recorded sha256 {binary.sha256[:16]}...", f"{sha256_hex(binary.binary)[:16]}...")
    if binary.binary_ext != _BINARY_EXT[target.backend]:
        fail(f"a {_BINARY_EXT[target.backend]} binary for {target.name}", repr(binary.binary_ext))
    _check_metadata(binary, kernel.fn.__name__, target, fail)
    return binary


def _check_constexpr(name: str, value: Any, fail) -> None:
    if isinstance(value, str) and value.startswith(_DTYPE_PREFIX):
        import triton.language as tl

        known = (*tl.dtype.SINT_TYPES, *tl.dtype.UINT_TYPES, *tl.dtype.FP_TYPES, *tl.dtype.OTHER_TYPES)
        if value[len(_DTYPE_PREFIX):] not in known:
            fail(f"constexpr {name} a Triton dtype ({_DTYPE_PREFIX}bf16, ...)", repr(value))
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        fail(f"constexpr {name} a number, a string, a boolean or nil", repr(value))


def _check_metadata(binary: KernelBinary, function: str, target, fail) -> None:
    """What rdnac's launcher reads from Triton's metadata, and the launch features it does not provide."""
    meta = binary.metadata
    if meta.get("name") != function:
        fail(f"metadata.name {function!r} (the function the binary holds)", repr(meta.get("name")))
    if meta.get("num_warps") != binary.call.num_warps or isinstance(meta.get("num_warps"), bool):
        fail(f"metadata.num_warps {binary.call.num_warps} (its call's)", repr(meta.get("num_warps")))
    shared = meta.get("shared")
    if not isinstance(shared, int) or isinstance(shared, bool) or not 0 <= shared < 1 << 24:
        fail("metadata.shared, the bytes of shared memory it uses (an integer < 16 MiB)", repr(shared))
    warp_size = meta.get("warp_size", 32)
    if target.backend == "hip" and ("warp_size" not in meta or warp_size not in (32, 64)):
        fail("metadata.warp_size, its wave size (32 or 64)", repr(meta.get("warp_size")))
    if target.backend == "cuda" and warp_size != 32:
        fail("metadata.warp_size 32", repr(warp_size))
    unsupported = {k: meta.get(k) for k in ("global_scratch_size", "profile_scratch_size") if meta.get(k)}
    if meta.get("num_ctas", 1) != 1 or meta.get("launch_cooperative_grid") or meta.get("launch_pdl"):
        unsupported.update(num_ctas=meta.get("num_ctas"), cooperative=meta.get("launch_cooperative_grid"),
                           pdl=meta.get("launch_pdl"))
    if unsupported:
        fail("no launch feature rdnac's launcher does not provide (its kernels need none)", unsupported)


def _check_program(body: dict, path: Path | str) -> None:
    """Each choice is the wrapper of its node's op for its phase, at a key `phase:bucket` the runtime looks
    up, and every step the plan's limits allow has one. (The step keys are the same for every node:
    plans/schema.py.)"""
    from rdnac.runtime.executor import BUCKETS, bucket_for

    runtime = body["runtime"]
    limits = {"decode": runtime.get("max_num_seqs"), "prefill": runtime.get("max_num_batched_tokens")}
    for node in body["graph"]["nodes"]:
        if node["op"] in registry.VIEW_OPS:
            continue
        where = f"{path}: body.program.{node['name']}"
        if not registry.has_kernel(node["op"]):
            raise PlanError(f"{where} requires a node whose op has a kernel in rdnac's library; got op "
                            f"{node['op']!r}; do run this model from a plan for the cpu target")
        steps = body["program"][node["name"]]
        for key, choice in steps.items():
            phase, _, bucket = key.partition(":")
            if phase not in registry.PHASES or not bucket.isdigit() or int(bucket) not in BUCKETS:
                raise PlanError(f"{where} requires step keys phase:bucket (phase prefill or decode, bucket one of "
                                f"{', '.join(map(str, BUCKETS))}); got {key!r}; the plan file is corrupt: do "
                                f"recompile it")
            registry.wrapper(choice["kernel"])  # one rdnac's kernel library registers, or a PlanError naming it
            wrapper = registry.wrapper_for(node["op"], phase)
            if choice["kernel"] != wrapper:
                raise PlanError(f"{where}.{key} requires kernel wrapper {wrapper!r} (op {node['op']}, {phase}); "
                                f"got {choice['kernel']!r}; the plan file is corrupt: do recompile it")
            for name, value in choice["config"]["constexprs"].items():
                if not (value is None or isinstance(value, (bool, int, float, str))):
                    raise PlanError(f"{where}.{key}.config.constexprs.{name} requires a number, a string, a "
                                    f"boolean or nil; got {value!r}; the plan file is corrupt: do recompile it")
        for phase, limit in limits.items():
            if not isinstance(limit, int) or isinstance(limit, bool):
                continue  # no limit recorded: the engine's own bounds the step
            missing = [b for b in BUCKETS if b <= bucket_for(min(limit, BUCKETS[-1])) and f"{phase}:{b}" not in steps]
            if missing:
                raise PlanError(f"{where} requires a choice for every {phase} step up to the plan's limit {limit} "
                                f"(runtime.max_num_{'seqs' if phase == 'decode' else 'batched_tokens'}); got none "
                                f"for {phase}:{missing[0]}; the plan file is corrupt: do recompile it")
