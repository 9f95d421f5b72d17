"""Load and launch kernel binaries through the GPU driver API (libcuda / libamdhip64), with ctypes.

Why not Triton's launcher: Triton 3.6 builds its host-side helpers (the
driver utilities and one C launcher stub per argument signature) with the
system C compiler on first use. On a fresh machine that is seconds of
compiling at `rdnac run` start-up (6.6 s for an 8B plan on an H100), against
the promise that a plan compiles nothing at run time. A launch needs only
`cuModuleLoadData` + `cuModuleGetFunction` once, and `cuLaunchKernel` with a
`void**` of argument slots per call; this module does that and nothing else.

The kernel ABI is Triton's: every non-constexpr parameter in order (pointers
as 64-bit device addresses, ints at their width, fp32 as a 4-byte float),
then the hidden pointers Triton's lowering appends (global scratch, profile
scratch; null when the metadata asks for no scratch). On CUDA the parameter
count and sizes are read back from the binary (`cuFuncGetParamInfo`) and
checked at load, so an ABI change in a future Triton is a load error, not a
corrupt launch.

Thread use: each `Kernel` packs its arguments into one reusable buffer; the
driver copies the parameters at launch, so reuse is safe, but one kernel
must not be launched from two threads at once (the runtime launches from one).
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from typing import Any

from rdnac.errors import PlanError

# Triton signature type -> struct code of the parameter's bytes (pointers: 64-bit device addresses).
_CODES = {"i1": "b", "i8": "b", "i16": "h", "i32": "i", "i64": "q",
          "u1": "B", "u8": "B", "u16": "H", "u32": "I", "u64": "Q", "fp32": "f", "f32": "f", "fp64": "d"}
_SLOT = 8  # every argument gets an 8-byte-aligned slot in the packed buffer
_CUDA_ERROR_INVALID_CONTEXT = 201
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("value_rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]
HIDDEN_POINTERS = 2  # global scratch, profile scratch: appended by Triton >= 3.5 to every kernel


def arg_codes(signature: list[str]) -> list[str]:
    """The struct code of each runtime argument of a kernel with Triton `signature` types."""
    codes = []
    for ty in signature:
        if ty.startswith("*"):
            codes.append("Q")
        elif ty in _CODES:
            codes.append(_CODES[ty])
        else:
            raise PlanError(f"argument type {ty!r} has no driver-launch encoding (supported: pointers, "
                            f"{', '.join(sorted(_CODES))})")
    return codes


def pack_format(codes: list[str]) -> str:
    """A little-endian struct format laying each argument in its own 8-byte slot."""
    return "<" + "".join(c + (f"{_SLOT - struct.calcsize('<' + c)}x" if struct.calcsize("<" + c) < _SLOT else "")
                         for c in codes)


@dataclass
class Kernel:
    """One loaded kernel function, ready to launch with runtime arguments in parameter order."""

    name: str
    function: int  # CUfunction / hipFunction_t
    threads: int  # per block: num_warps x warp size
    shared: int  # dynamic shared memory bytes
    codes: list[str]
    tensors: tuple[int, ...]  # runtime-argument positions that are pointers (tensors: pass data_ptr())
    fmt: str
    buffer: Any  # ctypes char array, one 8-byte slot per parameter (hidden ones stay zero)
    params: Any  # ctypes void* array pointing into buffer
    pdl: bool = False  # launch with programmatic stream serialization (the binary waits on griddepcontrol)
    config: Any = None  # the CUlaunchConfig of a PDL launch, grid and stream filled per launch


class DriverApi:
    """The handful of driver entry points rdnac needs, for one backend ("cuda" or "hip")."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.lib = _open_library(backend)
        p, i, u, vp = ctypes.POINTER, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p
        prefix = "cu" if backend == "cuda" else "hip"
        self._fn = {}
        signatures = {
            "ModuleLoadData": [p(vp), ctypes.c_char_p],
            "ModuleGetFunction": [p(vp), vp, ctypes.c_char_p],
            "ModuleLaunchKernel" if backend == "hip" else "LaunchKernel":
                [vp, u, u, u, u, u, u, u, vp, p(vp), p(vp)],
            "FuncGetAttribute": [p(i), i, vp],
        }
        if backend == "cuda":
            signatures.update({"CtxGetCurrent": [p(vp)], "CtxSetCurrent": [vp],
                               "DevicePrimaryCtxRetain": [p(vp), i], "DeviceGet": [p(i), i],
                               "DeviceGetAttribute": [p(i), i, i], "FuncSetAttribute": [vp, i, i],
                               "FuncSetCacheConfig": [vp, i], "GetErrorName": [i, p(ctypes.c_char_p)]})
            signatures["LaunchKernelEx"] = [ctypes.POINTER(_LaunchConfig), vp, p(vp), p(vp)]
            if hasattr(self.lib, "cuFuncGetParamInfo"):  # CUDA >= 12.4
                signatures["FuncGetParamInfo"] = [vp, ctypes.c_size_t, p(ctypes.c_size_t), p(ctypes.c_size_t)]
        else:
            signatures["GetErrorName"] = [i]
        for name, argtypes in signatures.items():
            fn = getattr(self.lib, prefix + name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_char_p if (backend == "hip" and name == "GetErrorName") else ctypes.c_int
            self._fn[name] = fn
        self._launch = self._fn["ModuleLaunchKernel" if backend == "hip" else "LaunchKernel"]

    # -- errors

    def error_name(self, code: int) -> str:
        if self.backend == "hip":
            return (self._fn["GetErrorName"](code) or b"?").decode()
        name = ctypes.c_char_p()
        self._fn["GetErrorName"](code, ctypes.byref(name))
        return (name.value or b"?").decode()

    def check(self, code: int, what: str) -> None:
        if code != 0:
            raise PlanError(f"{what} failed: {self.error_name(code)} ({code})")

    # -- loading

    def ensure_context(self, device_index: int) -> None:
        """Make the device's primary context (the one torch uses) current on this thread (CUDA only)."""
        if self.backend != "cuda":
            return
        ctx = ctypes.c_void_p()
        self.check(self._fn["CtxGetCurrent"](ctypes.byref(ctx)), "cuCtxGetCurrent")
        if ctx.value:
            return
        dev = ctypes.c_int()
        self.check(self._fn["DeviceGet"](ctypes.byref(dev), device_index), "cuDeviceGet")
        self.check(self._fn["DevicePrimaryCtxRetain"](ctypes.byref(ctx), dev.value), "cuDevicePrimaryCtxRetain")
        self.check(self._fn["CtxSetCurrent"](ctx), "cuCtxSetCurrent")

    def load(self, image: bytes, name: str, *, signature: list[str], num_warps: int, warp_size: int,
             shared: int, device_index: int, what: str, pdl: bool = False) -> Kernel:
        """Load one binary image (cubin / hsaco) and find kernel `name` in it; `what` names it in errors.
        `pdl`: launch it with programmatic stream serialization (a binary built with PDL=True)."""
        if pdl and self.backend != "cuda":
            raise PlanError(f"{what} requires programmatic dependent launch, which only CUDA has; do recompile "
                            f"the plan for this GPU")
        self.ensure_context(device_index)
        module = ctypes.c_void_p()
        self.check(self._fn["ModuleLoadData"](ctypes.byref(module), image), f"loading the binary of {what}")
        function = ctypes.c_void_p()
        self.check(self._fn["ModuleGetFunction"](ctypes.byref(function), module, name.encode()),
                   f"finding function {name} in the binary of {what}")
        if self.backend == "cuda":
            self._allow_shared(function, shared, device_index, what)
            self._check_params(function, signature, what)
        codes = arg_codes(signature)
        n = len(codes) + HIDDEN_POINTERS
        buffer = ctypes.create_string_buffer(n * _SLOT)
        base = ctypes.addressof(buffer)
        params = (ctypes.c_void_p * n)(*[base + k * _SLOT for k in range(n)])
        kernel = Kernel(name, function.value, num_warps * warp_size, shared, codes,
                        tuple(k for k, ty in enumerate(signature) if ty.startswith("*")), pack_format(codes),
                        buffer, params)
        if pdl:
            attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
            kernel.pdl, kernel.config = True, _LaunchConfig(blockDimX=kernel.threads, blockDimY=1, blockDimZ=1,
                                                            sharedMemBytes=shared, attrs=ctypes.pointer(attr),
                                                            numAttrs=1)
            kernel.config._attr = attr  # keep the attribute alive with the config
        return kernel

    def _allow_shared(self, function: ctypes.c_void_p, shared: int, device_index: int, what: str) -> None:
        """Opt in to more than 48 KiB of dynamic shared memory, as Triton's loader does."""
        if shared <= 49152:
            return
        optin, static = ctypes.c_int(), ctypes.c_int()
        self.check(self._fn["DeviceGetAttribute"](ctypes.byref(optin), 97, device_index),  # ..._PER_BLOCK_OPTIN
                   "cuDeviceGetAttribute")
        self.check(self._fn["FuncGetAttribute"](ctypes.byref(static), 1, function), "cuFuncGetAttribute")  # SHARED
        if shared + static.value > optin.value:
            raise PlanError(f"{what} requires {shared + static.value} bytes of shared memory per block; this GPU "
                            f"allows {optin.value}; do recompile the plan for this GPU")
        self.check(self._fn["FuncSetCacheConfig"](function, 1), "cuFuncSetCacheConfig")  # PREFER_SHARED
        self.check(self._fn["FuncSetAttribute"](function, 8, optin.value - static.value),  # MAX_DYNAMIC_SHARED
                   f"allowing {shared} bytes of shared memory for {what}")

    def _check_params(self, function: ctypes.c_void_p, signature: list[str], what: str) -> None:
        """The binary's own parameter list must be the runtime args + the hidden pointers, at our sizes."""
        info = self._fn.get("FuncGetParamInfo")
        if info is None:
            return
        sizes = [struct.calcsize("<" + c) for c in arg_codes(signature)] + [8] * HIDDEN_POINTERS
        found = []
        offset, size = ctypes.c_size_t(), ctypes.c_size_t()
        while info(function, len(found), ctypes.byref(offset), ctypes.byref(size)) == 0:
            found.append(size.value)
            if len(found) > len(sizes) + 8:
                break
        if found != sizes:
            raise PlanError(f"{what}: its binary takes parameters of sizes {found}; rdnac's launcher passes "
                            f"{sizes} (runtime arguments + {HIDDEN_POINTERS} hidden scratch pointers); the "
                            f"installed Triton's kernel ABI differs: do report it with the Triton version")

    # -- launching

    def launch(self, kernel: Kernel, grid: tuple[int, int, int], args: tuple[Any, ...], stream: int,
               device_index: int) -> None:
        """Launch on `stream` (a raw handle) of the current device, which must be `device_index`."""
        if grid[0] * grid[1] * grid[2] == 0:
            return
        values = list(args)
        for k in kernel.tensors:
            values[k] = values[k].data_ptr()
        struct.pack_into(kernel.fmt, kernel.buffer, 0, *values)
        code = self._launch_once(kernel, grid, stream)
        if code == _CUDA_ERROR_INVALID_CONTEXT and self.backend == "cuda":  # a thread torch has not used yet
            self.ensure_context(device_index)
            code = self._launch_once(kernel, grid, stream)
        if code != 0:
            raise PlanError(f"launching {kernel.name} on grid {grid} failed: {self.error_name(code)} ({code})")


    def _launch_once(self, kernel: Kernel, grid: tuple[int, int, int], stream: int) -> int:
        if kernel.pdl:
            c = kernel.config
            c.gridDimX, c.gridDimY, c.gridDimZ, c.hStream = grid[0], grid[1], grid[2], stream
            return self._fn["LaunchKernelEx"](ctypes.byref(c), kernel.function, kernel.params, None)
        return self._launch(kernel.function, grid[0], grid[1], grid[2], kernel.threads, 1, 1, kernel.shared,
                            stream, kernel.params, None)


def _open_library(backend: str) -> ctypes.CDLL:
    names = ["libcuda.so.1", "libcuda.so"] if backend == "cuda" else ["libamdhip64.so", "libamdhip64.so.6",
                                                                      "libamdhip64.so.7"]
    if backend == "hip":  # ROCm torch wheels carry their own copy, already loaded by torch
        import os

        import torch

        names.insert(0, os.path.join(os.path.dirname(torch.__file__), "lib", "libamdhip64.so"))
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(f"{name}: {e}")
    raise PlanError(f"launching plan kernels requires the {backend.upper()} driver library; none loaded "
                    f"({'; '.join(errors)})")


_APIS: dict[str, DriverApi] = {}


def driver_api(backend: str) -> DriverApi:
    """The process-wide driver API of `backend` ("cuda" or "hip"), opened once."""
    api = _APIS.get(backend)
    if api is None:
        api = _APIS[backend] = DriverApi(backend)
    return api
