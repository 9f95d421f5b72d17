"""`--kv-cache-dtype fp8`: the paged K/V caches in the target's FP8 format, with per-tensor static scales.

Runs after the graph passes, so it finds the caches' final readers and writers
(kv_cache_write or the fused qk_norm_rope_cache; attention or attention_quant).
It changes the declared state (`Graph.state`, ir/state.py) and the cache inputs'
dtype to float8_e4m3fn (gfx1201, gfx950, sm90, sm89, and cpu, whose reference
interpreter runs it) or float8_e4m3fnuz (gfx942), and sets the attrs k_scale /
v_scale on every node that touches a layer's caches: writers divide by them,
readers multiply (`rdnac.ir.ops`, "FP8 KV cache"). Bytes per token halve, so
the tokens a device holds double (`rdnac inspect`).

Scales: one per tensor per layer, static, 1.0 (`DEFAULT_SCALE`). K after the
q/k norm and RoPE, and V, sit well inside e4m3's range (max 448, 240 in fnuz)
for the models rdnac compiles, and e4m3 keeps 3 mantissa bits at every
magnitude above 2**-6, so a scale mainly guards against saturation; calibrated
or per-head scales, and the k_scale/v_scale tensors of FP8 checkpoints, are
not read yet (the decision log says so per plan).

gfx1151 (RDNA3.5) has no FP8 in hardware: the compile is refused there rather
than storing FP8 and converting in software in the attention loop.
"""

from __future__ import annotations

from rdnac.compiler.passes import CompileState
from rdnac.errors import RdnacError
from rdnac.ir.graph import TensorSpec
from rdnac.ir.state import StateSpec

NAME = "kv_cache_dtype"
DEFAULT_SCALE = 1.0
CHOICES = ("auto", "fp8")
# where each op's K and V caches sit among its inputs
CACHE_INPUTS = {"kv_cache_write": (3, 4), "qk_norm_rope_cache": (5, 6), "attention": (1, 2), "attention_quant": (1, 2)}


def kv_fp8_format(target) -> str:
    """The FP8 format the target's KV cache is stored in; refuses a target without FP8."""
    if not target.is_gpu:
        return "e4m3fn"  # the reference interpreter computes in float32 from the stored bits
    if target.fp8_format is None:
        raise RdnacError(f"--kv-cache-dtype fp8 requires a target with FP8 in hardware (gfx1201, gfx942, gfx950, "
                         f"sm90, sm89); got {target.name}, which has none; compile with --kv-cache-dtype auto")
    return target.fp8_format


def run(state: CompileState) -> None:
    opts, graph = state.options, state.graph
    if getattr(opts, "kv_cache_dtype", "auto") == "auto":
        return
    fmt = kv_fp8_format(state.target)
    dtype = f"float8_{fmt}"
    caches = {s.name: s for s in graph.state if s.kind == "paged_kv"}
    if not caches:
        state.decide(NAME, "-", "kept the state as declared", "the model has no paged K/V cache (paged_kv state)")
        return
    users = {name: [] for name in caches}
    for node in graph.nodes:
        for i in CACHE_INPUTS.get(node.op, ()):
            if node.inputs[i] in users:
                users[node.inputs[i]].append(node)
        touched = [n for n in node.inputs if n in caches]
        # a cache read by an op that does not know the scales would read FP8 bits as values
        assert node.op in CACHE_INPUTS or not touched, f"{node.name} ({node.op}) reads {touched}"
    graph.state = [StateSpec(s.name, s.kind, s.layer, dtype, s.shape) if s.name in caches else s
                   for s in graph.state]
    for name in caches:
        graph.inputs[name] = TensorSpec(dtype, graph.inputs[name].shape)
    for node in {id(n): n for ns in users.values() for n in ns}.values():
        node.attrs.update(k_scale=DEFAULT_SCALE, v_scale=DEFAULT_SCALE)
    before, after = caches[next(iter(caches))], next(s for s in graph.state if s.kind == "paged_kv")
    state.decide(NAME, "-", f"K/V caches of {len(caches) // 2} layers in {fmt}, per-tensor static scales "
                            f"{DEFAULT_SCALE} (k_scale, v_scale)",
                 f"--kv-cache-dtype fp8: {before.dtype} -> {dtype} halves the bytes per token ({before.nbytes} -> "
                 f"{after.nbytes} per cache per layer), doubling the tokens a device holds; {fmt} is the target's FP8 "
                 f"format; scale 1.0 because post-norm/RoPE K and V lie within the format's range (calibrated and "
                 f"checkpoint k_scale/v_scale are not read)")
