"""Fuse the FP8 (or int8) activation quantization of `linear_fp8` (`linear_int8`) readers into the `gated_act`
that feeds them (and, per token, into gated attention's `sigmoid_gate`: `sigmoid_gate_quant`).

    m = gated_act(gate_up); out = linear_fp8(m, W, s_w, [b])   (act_scheme dynamic_*)
        ==>   m.fp8, m.fp8_scale = gated_act_quant(gate_up)
              out = linear_fp8(m.fp8, W, s_w, m.fp8_scale, [b])   (act_scheme "prequantized")

The MLP's down projection then reads fp8 values written by the activation
kernel instead of quantizing a bf16 [T, I] tensor in a launch of its own;
the values are the same bit for bit (see `rdnac.kernels.activation_quant`).
The conditions and the reader rewrite are `fuse_norm_quant`'s: every reader
a dynamically quantizing `linear_fp8` with one format and group.
"""

from __future__ import annotations

from rdnac.compiler.passes import CompileState
from rdnac.compiler.passes.fuse_norm_quant import fuse_into_producer, quant_label

NAME = "fuse_act_quant"


def run(state: CompileState) -> None:
    fuse_into_producer(state, NAME, "gated_act", "gated_act_quant", "activation")
    # gated attention's sigmoid output gate feeding o_proj (Qwen3.5, Qwen3-Next): per-token scales only
    fuse_into_producer(state, NAME, "sigmoid_gate", "sigmoid_gate_quant", "output gate",
                       refuse=lambda node, quant: "" if quant[1] == 0 else
                       f"the output gate's kernel writes per-token scales; got {quant_label(*quant)}")
