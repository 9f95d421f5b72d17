"""INT8 W8A8 on the target: every `linear_int8` needs the target's native int8 matrix instruction.

Runs beside `fp8_layout`, before the fusions. int8 has one format everywhere (no fnuz-like variant) and
its weights keep their bytes, so nothing is converted; what is target-specific is whether the probed
int8 `tl.dot` lowers to an integer matrix instruction (v_wmma_i32_16x16x16_iu8 on RDNA3.5/RDNA4,
v_mfma_i32_*_i8 on CDNA3/4, wgmma/mma s8 on sm90). Where it does not, the compile fails: an int8 plan
that upcast its operands would be slower than bf16, a fallback rdnac does not take silently. The cpu
target's interpreter computes in float32.
"""

from __future__ import annotations

from rdnac.compiler.passes import CompileState
from rdnac.errors import RdnacError

NAME = "int8_layout"


def run(state: CompileState) -> None:
    nodes = [n for n in state.graph.nodes if n.op == "linear_int8"]
    if not nodes:
        return
    names = ", ".join(n.name for n in nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
    if not state.target.is_gpu:
        state.decide(NAME, names, "w8a8 int8, activations per token", "cpu: the reference interpreter computes "
                     "the int8 products in float32")
        return
    probe = state.capabilities.int8_dot
    if not probe.is_native:
        got = ", ".join(probe.matrix_instructions) or probe.reason or "no matrix instruction"
        raise RdnacError(f"node {nodes[0].name!r} (linear_int8) requires a native int8 dot on {state.target.name}; "
                         f"the probe got {got}; compile without --quantize int8 (or with an FP8 scheme) for this "
                         "target")
    state.decide(NAME, names, "w8a8 int8, activations per token",
                 f"probe: tl.dot(int8) on {state.target.name} emits {', '.join(probe.matrix_instructions)} "
                 "(int32 accumulation; the scales apply in the GEMM's epilogue)")
