"""rdnac's Triton kernel library: one kernel family per file.

Each family file holds its Triton kernels, their run-time wrappers, its
config space and one `FAMILY` record (`registry.py`) naming the IR ops it
implements: the one place where an op meets its kernels, read by the
executor, kernel selection, tuning and the cost model. `registry.py` says
how to add an op.

It lives outside `rdnac.compiler` because both sides need it: the compiler
AOT-builds these kernels into plans, and the runtime launches the plan's
binaries through the same Python wrappers (and, when a plan was built by
another Triton version, rebuilds a kernel from here by name).

Every wrapper launches through a `Launcher` (see `launch.py`), so the same
wrapper code runs a kernel JIT-compiled, under the Triton interpreter, from
a plan's precompiled binary, or records which specializations a plan needs.
Kernels call no `@triton.jit` function of Triton's own that the interpreter
cannot run (tl.max, tl.sum: they reduce with `tl.reduce` and the standard
combine functions instead); rdnac's own helpers (`fp8_quant.round_to_fp8_grid`)
they may call: `launch.with_interpreted_helpers` runs those under the
interpreter too.
"""
