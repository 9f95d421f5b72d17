"""rdnac's Triton kernel library: one kernel family per file.

It lives outside `rdnac.compiler` because both sides need it: the compiler
AOT-builds these kernels into plans, and the runtime launches the plan's
binaries through the same Python wrappers (and, when a plan was built by
another Triton version, rebuilds a kernel from here by name).

Every wrapper launches through a `Launcher` (see `launch.py`), so the same
wrapper code runs a kernel JIT-compiled, under the Triton interpreter, from
a plan's precompiled binary, or records which specializations a plan needs.
Kernels never call other `@triton.jit` functions: the interpreter path
(`InterpretedFunction(fn.fn)`) cannot follow such calls.
"""
