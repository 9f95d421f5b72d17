"""`--kv-cache-dtype fp8`: the paged K/V caches in the target's FP8 format, with per-tensor static scales.

Runs after the graph passes, so it finds the caches' final readers and writers
(kv_cache_write or the fused qk_norm_rope_cache; attention or attention_quant).
It changes the declared state (`Graph.state`, ir/state.py) and the cache inputs'
dtype to float8_e4m3fn (gfx1201, gfx950, sm90, sm89, and cpu, whose reference
interpreter runs it) or float8_e4m3fnuz (gfx942), and sets the attrs k_scale /
v_scale on every node that touches a layer's caches: writers divide by them,
readers multiply (`rdnac.ir.ops`, "FP8 KV cache"). Bytes per token halve, so
the tokens a device holds double (`rdnac inspect`).

Scales: one per tensor per layer, static. A checkpoint that carries them
(vLLM's FP8 checkpoints: `layers.N.self_attn.k_scale` / `v_scale`, or one
`kv_scale` for both; `checkpoint_scales`) gives them, multiplied by 448/240 on
e4m3fnuz targets (they are calibrated as amax / 448). Otherwise 1.0
(`DEFAULT_SCALE`): K after the q/k norm and RoPE, and V, sit well inside
e4m3's range (max 448, 240 in fnuz) for trained models, and e4m3 keeps 3
mantissa bits at every magnitude above 2**-6, so a scale mainly guards
against saturation. Calibrated and per-head scales are not computed.

gfx1151 (RDNA3.5) has no FP8 in hardware: the compile is refused there rather
than storing FP8 and converting in software in the attention loop.
"""

from __future__ import annotations

import re

from rdnac.compiler.passes import CompileState
from rdnac.errors import RdnacError
from rdnac.ir.fp8 import FP8_MAX
from rdnac.ir.graph import TensorSpec
from rdnac.ir.ops import KV_CACHE_INPUTS
from rdnac.ir.state import StateSpec

NAME = "kv_cache_dtype"
DEFAULT_SCALE = 1.0
CHOICES = ("auto", "fp8")


def kv_fp8_format(target) -> str:
    """The FP8 format the target's KV cache is stored in; refuses a target without FP8."""
    if not target.is_gpu:
        return "e4m3fn"  # the reference interpreter computes in float32 from the stored bits
    if target.fp8_format is None:
        raise RdnacError(f"--kv-cache-dtype fp8 requires a target with FP8 in hardware (gfx1201, gfx942, gfx950, "
                         f"sm90, sm89); got {target.name}, which has none; compile with --kv-cache-dtype auto")
    return target.fp8_format


_SCALE_NAME = re.compile(r"(?:.*\.)?layers\.(\d+)\.self_attn\.(k_scale|v_scale|kv_scale)")


def checkpoint_scales(checkpoint) -> dict[int, tuple[float, float]]:
    """layer -> (k_scale, v_scale) from the checkpoint's KV-cache scale tensors (one value each); {} if none."""
    found: dict[int, dict[str, float]] = {}
    for name in checkpoint.tensors.names():
        m = _SCALE_NAME.fullmatch(name)
        if m is None:
            continue
        t = checkpoint.tensors.load(name).float()
        if t.numel() != 1 or not bool(t.isfinite().all()) or float(t.reshape(())) <= 0:
            raise RdnacError(f"{checkpoint.path}: tensor {name} requires one positive finite value (a per-tensor "
                             f"KV-cache scale); got shape {tuple(t.shape)}; compile with --kv-cache-dtype auto")
        for key in (("k_scale", "v_scale") if m[2] == "kv_scale" else (m[2],)):
            found.setdefault(int(m[1]), {})[key] = float(t.reshape(()))
    incomplete = sorted(layer for layer, d in found.items() if len(d) != 2)
    if incomplete:
        raise RdnacError(f"{checkpoint.path}: KV-cache scales require k_scale and v_scale per layer; layers "
                         f"{incomplete} have one; compile with --kv-cache-dtype auto")
    return {layer: (d["k_scale"], d["v_scale"]) for layer, d in found.items()}


def run(state: CompileState) -> None:
    opts, graph = state.options, state.graph
    if opts.kv_cache_dtype == "auto":
        return
    fmt = kv_fp8_format(state.target)
    dtype = f"float8_{fmt}"
    caches = {s.name: s for s in graph.state if s.kind == "paged_kv"}
    if not caches:
        state.decide(NAME, "-", "kept the state as declared", "the model has no paged K/V cache (paged_kv state)")
        return
    users = {name: [] for name in caches}
    for node in graph.nodes:
        for i in KV_CACHE_INPUTS.get(node.op, ()):
            if node.inputs[i] in users:
                users[node.inputs[i]].append(node)
        touched = [n for n in node.inputs if n in caches]
        # a cache read by an op that does not know the scales would read FP8 bits as values
        assert node.op in KV_CACHE_INPUTS or not touched, f"{node.name} ({node.op}) reads {touched}"
    graph.state = [StateSpec(s.name, s.kind, s.layer, dtype, s.shape) if s.name in caches else s
                   for s in graph.state]
    for name in caches:
        graph.inputs[name] = TensorSpec(dtype, graph.inputs[name].shape)
    # checkpoint scales are calibrated as amax / 448 (OCP e4m3fn): the same amax maps to fnuz's 240
    factor = FP8_MAX["e4m3fn"] / FP8_MAX[fmt]
    layers = {s.layer for s in caches.values()}
    from_checkpoint = {layer: state.kv_scales[layer] for layer in layers if layer in state.kv_scales}
    for name, nodes in users.items():
        layer = caches[name].layer
        k_scale, v_scale = ((from_checkpoint[layer][0] * factor, from_checkpoint[layer][1] * factor)
                            if layer in from_checkpoint else (DEFAULT_SCALE, DEFAULT_SCALE))
        for node in nodes:
            node.attrs.update(k_scale=k_scale, v_scale=v_scale)
    before, after = caches[next(iter(caches))], next(s for s in graph.state if s.kind == "paged_kv")
    if from_checkpoint:
        source = (f"the checkpoint's k_scale/v_scale for layers {_ranges(sorted(from_checkpoint))}"
                  + (f", times 448/240 for {fmt}" if factor != 1 else "")
                  + (f"; {DEFAULT_SCALE} for layers {_ranges(sorted(layers - set(from_checkpoint)))}"
                     if len(from_checkpoint) < len(layers) else ""))
        why = "the checkpoint was calibrated for an FP8 KV cache"
    else:
        source = f"{DEFAULT_SCALE}"
        why = ("scale 1.0: post-norm/RoPE K and V of trained models lie within the format's range (the checkpoint "
               "carries no k_scale/v_scale; calibrated and per-head scales are not computed)")
    state.decide(NAME, "-", f"K/V caches of {len(layers)} layers in {fmt}, per-tensor static scales {source}",
                 f"--kv-cache-dtype fp8: {before.dtype} -> {dtype} takes {after.nbytes} instead of {before.nbytes} "
                 f"bytes per token per cache per layer, so a device holds {before.nbytes // after.nbytes}x the tokens; "
                 f"{fmt} is the target's FP8 format; {why}")


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, start = [], None
    for i, layer in enumerate(layers):
        start = layer if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            out.append(f"{start}-{layer}" if layer != start else f"{layer}")
            start = None
    return ", ".join(out)
