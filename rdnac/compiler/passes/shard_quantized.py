"""Sharding 8-bit linears (`linear_fp8`, `linear_int8`, `gated_act_linear_fp8`) with their scales, and the check
that FP8 block experts (`moe_experts_fp8_block`) split on their scale blocks, for the shard pass (shard.py,
whose `Sharder` calls these where it shards a linear's rows or columns, or experts by intermediate block).

Weight scales (rdnac.ir.fp8.dequantize_weight):
- per-tensor [1]: the same on every rank (exact: a slice of W * s is the slice of W times s);
- per-channel [N]: a column-parallel split takes the rows it keeps; row-parallel keeps them all;
- block [ceil(N/bn), ceil(K/bk)]: a column-parallel split takes the rows of the whole bn-row blocks it
  keeps, and must keep whole blocks (a block's one scale cannot be split between ranks, nor a rank's
  slice start mid-block); a row-parallel split takes the K-block columns of its slice, which must start
  and end on bk boundaries.

Activation quantization:
- column-parallel linears read the whole (replicated) input: their per-token, per-group or static
  scales, and an rms_norm_quant producing them, are those of one rank, exactly;
- row-parallel linears read the rank's K slice: per-group scales (dynamic_group, or a prequantized
  input with attr group > 0 from attention_quant, gated_act_quant, gated_act_linear_fp8,
  gated_rms_norm_quant or sigmoid_gate_quant) cover the same columns as on one rank when the slice falls
  on group boundaries (required: refused otherwise), so the partial sums are exact; per-token scales
  (dynamic_token, or prequantized with group 0) are the amax over the rank's slice, not the whole row:
  finer than one rank's, so not bit-identical but within the format's rounding (recorded as a decision).
- FP8 block experts (--tp): each rank quantizes its I/N block of the down input in 128-column groups, one
  rank's groups exactly when I/N is a multiple of 128 (required, with the weights' scale blocks).
"""

from __future__ import annotations

from rdnac.ir.graph import Node

LINEARS = ("linear", "linear_fp8", "linear_int8")  # the ops a column- or row-parallel split applies to
QUANTIZED = ("linear_fp8", "linear_int8", "gated_act_linear_fp8")


def weight_inputs(node: Node) -> tuple[str, str | None, str | None]:
    """(weight, weight scale or None, bias or None) of a linear, linear_gated_act or 8-bit linear."""
    if node.op not in QUANTIZED:
        return node.inputs[1], None, node.inputs[2] if len(node.inputs) == 3 else None
    return node.inputs[1], node.inputs[2], node.inputs[-1] if node.attrs.get("has_bias") else None


def column_parallel_scales(s, node: Node, how: str, index) -> None:
    """The weight scale rows of rank r's output rows `index(r)` (a per-tensor scale stays whole)."""
    if node.op not in QUANTIZED:
        return
    scheme, scale = node.attrs["weight_scheme"], node.inputs[2]
    if scheme == "channel":
        s.rows(scale, how, index)
    elif scheme == "block":
        bn, bk = node.attrs["block_size"]
        n = s.full[node.inputs[1]].shape[0]
        blocks = []
        for r in range(s.n):
            rows = list(index(r))
            mine = [rows[j] // bn for j in range(0, len(rows), bn)]
            if rows != [b * bn + i for b in mine for i in range(min(bn, n - b * bn))]:
                s.fail(node, f"has a block-scaled weight ({bn}x{bk} blocks, one scale each) split column-parallel "
                             f"({how}); each rank must keep whole {bn}-row blocks, but rank {r}'s {len(rows)} rows "
                             f"(from row {rows[0]}) do not fall on {bn}-row boundaries; choose a --tp whose "
                             f"per-rank heads / intermediate block are a multiple of {bn} rows, or compile "
                             "without --tp")
            blocks.append(mine)
        s.rows(scale, f"{how}: whole {bn}-row scale blocks", lambda r: blocks[r])


def expert_scale_blocks(s, node: Node, inter: int, block: int) -> None:
    """moe_experts_fp8_block split --tp into blocks of `block` of the intermediate size `inter`: each rank's
    gate/up rows must be whole bn-row scale blocks and its down columns whole bk-column ones, which are also
    the groups its down input is quantized in (then exactly one rank's groups); the shard pass slices the
    scales with the blocks."""
    bn, bk = node.attrs["block_size"]
    if block % bn or block % bk:
        s.fail(node, f"has FP8 block-scaled experts ({bn}x{bk} blocks, one scale each) of intermediate size {inter} "
                     f"split into {block} per rank; each rank must keep whole blocks ({bn} gate/up rows, {bk} down "
                     f"columns, the groups its down input is quantized in); choose a --tp that divides {inter} into "
                     f"multiples of {max(bn, bk)}, or --ep (whole experts per rank), or compile without --tp")


def row_parallel_scales(s, node: Node, cols) -> None:
    """Rank r reads input columns `cols(r)` (a slice): the K-block columns of a block scale, a check that
    per-group activation scales fall on the split, and a decision where per-token ones cover the slice."""
    if node.op not in QUANTIZED:
        return
    a, k = node.attrs, s.full[node.inputs[1]].shape[1]
    width = cols(0).stop - cols(0).start
    if a["weight_scheme"] == "block":
        bk = a["block_size"][1]
        if width % bk:
            s.fail(node, f"has a block-scaled weight (blocks of {bk} input columns, one scale each) split "
                         f"row-parallel into {width} of {k} columns per rank; each rank must keep whole "
                         f"{bk}-column blocks; choose a --tp that divides {k} into multiples of {bk}, or compile "
                         "without --tp")
        s.shard(node.inputs[2], f"row-parallel: the rank's {width // bk} {bk}-column scale blocks",
                lambda t, r: t[:, cols(r).start // bk:-(-cols(r).stop // bk)])
    scheme = "prequantized" if node.op == "gated_act_linear_fp8" else a["act_scheme"]
    group = a["block_size"][1] if scheme == "dynamic_group" else a.get("group", 0) if scheme == "prequantized" else 0
    if group and width % group:
        s.fail(node, f"quantizes its input in groups of {group} columns; split row-parallel into {width} of {k} "
                     f"columns per rank, a group would straddle two ranks; choose a --tp that divides {k} into "
                     f"multiples of {group}, or compile without --tp")
    if scheme in ("dynamic_token", "prequantized") and not group:
        s.state.decide("shard", node.name, f"per-token activation scales over the rank's {width} of {k} input "
                       "columns", "a row-parallel rank holds only its slice of the row; its amax is the slice's "
                       "(finer than the whole row's): the sum differs from one rank's by 8-bit rounding only")
