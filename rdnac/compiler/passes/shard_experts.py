"""Sharding the fused MoE experts (moe_experts, its MXFP4 and FP8 block forms), for the shard pass (shard.py,
whose `Sharder` calls `experts`): --tp slices every expert's intermediate dimension (gate/up rows, down
columns, their scales in whole scale blocks); --ep places E/N whole experts on each rank and maps the routed
ids to them (`shard_ids`). The partial sums are all-reduced, or, with --ep-dispatch all-to-all, the layer is
rewritten by shard_dispatch.py.
"""

from __future__ import annotations

from rdnac.compiler.passes import shard_quantized as q8
from rdnac.ir.graph import Node

NAME = "shard"
EXPERT_START = "tp.expert_start"  # the per-rank int64 [1] weight: the rank's first expert (shard.py reads it too)


def experts(s, node: Node) -> None:
    """moe_experts, or moe_experts_mxfp4 (w13 and w2 as blocks and scales: their rows sliced alike, w2's
    I columns in whole scale blocks of 32 weights, 16 bytes of e2m1 pairs each), or moe_experts_fp8_block
    (w13 and w2 with their 128x128 scales: a scale row per 128 w13 rows, a scale column per 128 of w2's I)."""
    mx, fp8 = node.op == "moe_experts_mxfp4", node.op == "moe_experts_fp8_block"
    w13s, w2s = (node.inputs[3:5], node.inputs[5:7]) if mx or fp8 else (node.inputs[3:4], node.inputs[4:5])
    num_experts, two_i, _ = s.graph.weights[w13s[0]].shape
    inter = two_i // 2
    biases = node.inputs[7:] if mx or fp8 else node.inputs[5:]
    if s.ep:
        if num_experts % s.n:
            s.fail(node, f"has {num_experts} experts; --ep requires --tp to divide them (each rank holds "
                         f"E/N whole experts); choose a --tp that divides {num_experts}")
        local = num_experts // s.n
        for w in (*w13s, *w2s, *biases):
            s.shard(w, "expert-parallel", lambda t, r: t[r * local:(r + 1) * local])
        s.per_rank_start(EXPERT_START, local)
        ids = f"{node.name}.local_ids"
        s.after.setdefault(s.producer[node.inputs[2]][0].name, []).append(
            Node(f"{node.name}.shard_ids", "shard_ids", [node.inputs[2], EXPERT_START], [ids], {"size": local}))
        node.inputs[2] = ids
        what = f"experts [r*{local}, (r+1)*{local}) whole on rank r; routed ids of other ranks' experts skipped"
    else:
        block = s.intermediate_block(node, inter)
        if mx and block % 32:
            s.fail(node, f"has MXFP4 experts of intermediate size {inter}; --tp must divide it into blocks "
                         f"of a multiple of 32 (one e8m0 scale covers 32 weights along it), got {block}; "
                         "choose a smaller --tp")
        if fp8:
            q8.expert_scale_blocks(s, node, inter, block)

        def rows(r: int, per: int = 1) -> list[int]:
            """Rank r's gate rows and up rows of w13, in units of `per` rows (FP8 block scales: 128)."""
            return [*range(r * block // per, (r + 1) * block // per),
                    *range((inter + r * block) // per, (inter + (r + 1) * block) // per)]

        for w in w13s:  # 2I rows (bits, MXFP4 scales) or 2I/128 (FP8 block scales)
            per = two_i // s.graph.weights[w].shape[1]
            s.shard(w, "expert gate/up block", lambda t, r, per=per: t[:, rows(r, per)])
        for w in w2s:  # the last dim is I, I/2 (e2m1 pairs), I/32 (MXFP4 scales) or I/128 (FP8 block scales)
            per = inter // s.graph.weights[w].shape[-1]
            s.shard(w, "expert down block",
                       lambda t, r, per=per: t[:, :, r * block // per:(r + 1) * block // per])
        if biases:
            s.shard(biases[0], "expert gate/up block", lambda t, r: t[:, rows(r)])
            s.rank0_only(biases[1])
        what = f"every expert's gate/up and down in blocks of {block} of {inter} per rank"
        if fp8:
            what += " with their scale blocks" + ("; down's input quantized in the same 128-column groups as "
                                                  "one rank's" if node.attrs["act_scheme"] != "none" else "")
    s.reduce_after(node)
    if s.ep and s.state.options.ep_dispatch == "all-to-all":  # shard_dispatch rewrites it, and says so
        s.state.decide(NAME, node.name, what, "--ep-dispatch all-to-all: tokens go to the experts' ranks")
        return
    s.state.decide(NAME, node.name, what + "; all_reduce of the partial sums",
                      "routing runs on every rank (router replicated); exact, and under tensor-parallel "
                      "attention fewer bytes than the all-to-all form (--ep-dispatch, shard_dispatch.py)")
