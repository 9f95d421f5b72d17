"""Fuse o_proj's FP8 activation quantization into the `attention` that feeds it.

    a = attention(q, caches, ...); out = linear_fp8(a, W, s_w, [b])   (act_scheme dynamic_group)
        ==>   a.fp8, a.fp8_scale = attention_quant(q, caches, ...)
              out = linear_fp8(a.fp8, W, s_w, a.fp8_scale, [b])       (act_scheme "prequantized")

At decode the attention kernel writes the fp8 values and their scales from the
registers that hold each head's output (`rdnac.kernels.attention`), so o_proj's
quantization launch goes; prefill runs attention and then that quantization.
The bits are the unfused pair's. Only where a quantization group is exactly one
head (group == head_dim, e.g. 128 for block-128 FP8 checkpoints at head_dim
128): a program holds whole heads, never a whole token's row, so per-token
scales and groups spanning heads stay with the linear, the reason logged.
The reader conditions and rewrite are `fuse_norm_quant`'s.
"""

from __future__ import annotations

from rdnac.compiler.passes import CompileState
from rdnac.compiler.passes.fuse_norm_quant import fuse_into_producer, quant_label
from rdnac.ir.graph import Node

NAME = "fuse_attention_quant"


def run(state: CompileState) -> None:
    fuse_into_producer(state, NAME, "attention", "attention_quant", "attention", refuse=_whole_heads,
                              how="per-head scales from its output registers at decode")


def _whole_heads(node: Node, quant: tuple[str, int]) -> str:
    head_dim = node.attrs["head_dim"]
    if quant[1] == head_dim:
        return ""
    return f"the attention kernel quantizes whole heads: {quant_label(*quant)} is not one head of {head_dim}"
