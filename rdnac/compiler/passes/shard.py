"""Shard a plan over `--tp N` ranks (tensor parallelism; `--ep`: experts placed whole per rank).

Runs last among the graph passes (after fusion), when --tp > 1. The result
is one graph that every rank runs, with per-rank weights
(`state.rank_weights`, rank 0's being `state.weights`); each rank's weights
become a sidecar of their own so a rank reads only its own bytes.

- Attention: q/k/v (merged qkv rows, or the separate linears) are
  column-parallel by head: rank r keeps its Hq/N query heads and the KV heads
  they read; each rank's slice of a merged qkv is [its q rows, its k rows,
  its v rows], contiguous. With fewer KV heads than ranks (N a multiple of
  Hk), each rank keeps the one KV head its query heads use (replicated over
  the N/Hk ranks that share it). Head counts of rope / q-k norm / cache
  write / attention nodes and the declared KV state shrink to the rank's.
  o_proj is row-parallel (its input columns of the rank's heads), followed
  by an `all_reduce`; a bias is added on rank 0 only.
- Gated MLP: gate/up (merged [gate; up] rows or two linears) column-parallel
  by blocks of I/N, down_proj row-parallel + `all_reduce`.
- MoE, --tp: every expert's gate/up and down sliced as the MLP's (I/N each);
  --ep: rank r holds experts [r*E/N, (r+1)*E/N) whole, a `shard_ids` node maps
  the routed ids to its experts (-1 for the others, which it skips). Routing
  runs on every rank (the router is replicated), then each rank's partial
  sum is `all_reduce`d: the all-to-all that moves only routed tokens is the
  efficient form at scale; the all-reduce is exact and simpler, and is what
  this pass emits.
- Embedding: vocabulary-parallel, V padded to a multiple of N with zero rows:
  `shard_ids` + masked lookup + `all_reduce`. lm_head (`logits`): the same
  rows, then `all_gather` of the logits columns (the padding dropped).
Everything else (norms, routers, residual adds) is replicated.

Refused, one line each: a --tp that does not divide the query heads, the KV
heads (or is not a multiple of them), the intermediate size or the experts
(--ep); models or schemes whose sharding is not written yet (MLA, linear
attention, FP8, MXFP4).
"""

from __future__ import annotations

import math

import torch

from rdnac.compiler.passes import CompileState
from rdnac.errors import UnsupportedModelError
from rdnac.ir.graph import Node, TensorSpec, WeightSpec
from rdnac.ir.ops import ATTENTION_OPS, OPS
from rdnac.ir.state import StateSpec

NAME = "shard"
VOCAB_START, EXPERT_START = "tp.vocab_start", "tp.expert_start"  # per-rank int64 [1] weights
_NOT_YET = {"linear_fp8": "FP8 linears", "rms_norm_quant": "FP8 linears", "gated_act_quant": "FP8 linears",
            "attention_quant": "FP8 linears", "moe_experts_mxfp4": "MXFP4 experts",
            "moe_experts_fp8_block": "FP8 block experts",
            "mla_cache_write": "MLA attention", "mla_attention": "MLA attention",
            "causal_conv1d": "linear attention (GDN)", "gated_delta_rule": "linear attention (GDN)",
            "gated_rms_norm": "linear attention (GDN)", "sigmoid_gate": "linear attention (GDN)"}


def run(state: CompileState) -> None:
    num_ranks = state.options.tp
    if num_ranks == 1:
        return
    Sharder(state, num_ranks, state.options.ep).run()


class Sharder:
    def __init__(self, state: CompileState, num_ranks: int, ep: bool):
        self.state, self.graph, self.n, self.ep = state, state.graph, num_ranks, ep
        self.full = state.weights  # the unsharded tensors
        self.ranks: list[dict[str, torch.Tensor]] = [dict(state.weights) for _ in range(num_ranks)]
        self.how: dict[str, str] = {}  # weight -> how it was sharded (a tied weight is sharded once)
        self.producer: dict[str, tuple[Node, int]] = {}
        self.readers: dict[str, list[Node]] = {}
        self.after: dict[str, list[Node]] = {}  # node name -> nodes to insert after it

    def fail(self, node: Node, why: str) -> None:
        raise UnsupportedModelError(f"--tp {self.n}{' --ep' if self.ep else ''}: node {node.name!r} ({node.op}) "
                                    f"{why}")

    def run(self) -> None:
        g = self.graph
        for node in g.nodes:
            if node.op in _NOT_YET:
                raise UnsupportedModelError(f"--tp requires a model whose every op can be sharded; node "
                                            f"{node.name!r} ({node.op}): sharding {_NOT_YET[node.op]} comes later; "
                                            "compile without --tp")
            for i, out in enumerate(node.outputs):
                self.producer[out] = (node, i)
            for name in node.inputs:
                self.readers.setdefault(name, []).append(node)
        for node in list(g.nodes):
            if node.op in ATTENTION_OPS:
                self.attention(node)
            elif node.op in ("linear_gated_act", "gated_act"):
                self.mlp(node)
            elif node.op == "moe_experts":
                self.experts(node)
            elif node.op == "embedding":
                self.embedding(node)
            elif node.op == "logits":
                self.logits(node)
        g.nodes = [m for n in g.nodes for m in (n, *self.after.get(n.name, []))]
        g.attrs["mesh"] = {"tp": self.n, "ep": self.ep}
        self.state.weights = self.ranks[0]
        self.state.rank_weights = self.ranks
        replicated = [k for k in self.full if k not in self.how]
        self.state.decide(NAME, "-", f"{self.n} ranks: {len(self.how)} weights sharded, {len(replicated)} "
                          "replicated", "norms, routers and other small weights are the same on every rank")

    # ------------------------------------------------------------ weights

    def shard(self, name: str, how: str, pick) -> None:
        """Rank r's `name` = pick(full tensor, r); the spec takes rank 0's shape (every rank's is the same)."""
        if name in self.how:
            assert self.how[name] == how, f"{name} sharded two ways: {self.how[name]} and {how}"
            return
        self.how[name] = how
        full = self.full[name]
        for r in range(self.n):
            self.ranks[r][name] = pick(full, r).contiguous()
        spec = self.graph.weights[name]
        self.graph.weights[name] = WeightSpec(spec.dtype, tuple(self.ranks[0][name].shape), spec.scheme, spec.source)

    def rows(self, name: str, how: str, index) -> None:
        self.shard(name, how, lambda t, r: t.index_select(0, torch.tensor(index(r), dtype=torch.long)))

    def rank0_only(self, name: str) -> None:
        """A row-parallel layer's bias: added once (rank 0) to the sum."""
        self.shard(name, "rank 0 only", lambda t, r: t if r == 0 else torch.zeros_like(t))

    def per_rank_start(self, name: str, step: int) -> None:
        if name not in self.graph.weights:
            self.graph.weights[name] = WeightSpec("int64", (1,), source=f"rank * {step}")
            for r in range(self.n):
                self.ranks[r][name] = torch.tensor([r * step], dtype=torch.int64)
            self.how[name] = "per rank"

    def reduce_after(self, node: Node, index: int = 0) -> None:
        """all_reduce node's output `index`: the node writes `<out>.partial`, the sum keeps the name."""
        out = node.outputs[index]
        node.outputs[index] = f"{out}.partial"
        self.after.setdefault(node.name, []).append(Node(f"{node.name}.all_reduce", "all_reduce",
                                                         [f"{out}.partial"], [out]))

    def single_linear_reader(self, value: str, node: Node) -> Node:
        readers = self.readers.get(value, [])
        if len(readers) != 1 or readers[0].op != "linear" or readers[0].inputs[0] != value:
            self.fail(node, f"requires its output to feed one row-parallel linear; it feeds "
                            f"{[f'{r.name} ({r.op})' for r in readers]}")
        return readers[0]

    def row_parallel(self, linear: Node, cols) -> None:
        """linear's input columns of rank r (`cols(r)`), its bias on rank 0, then an all_reduce."""
        self.shard(linear.inputs[1], "row-parallel", lambda t, r: t[:, cols(r)])
        if len(linear.inputs) == 3:
            self.rank0_only(linear.inputs[2])
        self.reduce_after(linear)

    # ------------------------------------------------------------ attention

    def attention(self, node: Node) -> None:
        a, n = node.attrs, self.n
        hq, hk, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
        if hq % n:
            self.fail(node, f"has {hq} query heads; --tp must divide them (each rank computes whole heads); "
                            f"choose a --tp that divides {hq}")
        if hk % n and n % hk:
            self.fail(node, f"has {hk} KV heads; --tp must divide them, or be a multiple of them (each rank then "
                            f"keeps the one KV head its query heads read); choose such a --tp")
        hq_l, hk_l, group = hq // n, max(1, hk // n), hq // hk
        q_heads = lambda r: range(r * hq_l, (r + 1) * hq_l)  # noqa: E731
        kv_heads = (lambda r: range(r * hk_l, (r + 1) * hk_l)) if hk >= n else (lambda r: [r * hq_l // group])
        writer = next((w for w in self.graph.nodes if node.inputs[1] in [w.inputs[i] for i in OPS[w.op].in_place]),
                      None)
        if writer is None or writer.op not in ("kv_cache_write", "qk_norm_rope_cache"):
            self.fail(node, "requires its caches written by kv_cache_write or qk_norm_rope_cache")
        k_in, v_in = (writer.inputs[0], writer.inputs[1]) if writer.op == "kv_cache_write" else writer.inputs[1:3]
        sources = {"q": self.trace(node.inputs[0], node), "k": self.trace(k_in, node), "v": self.trace(v_in, node)}
        heads = {"q": (q_heads, hq_l), "k": (kv_heads, hk_l), "v": (kv_heads, hk_l)}
        by_linear: dict[str, list[tuple[str, int]]] = {}  # producing linear or split -> [(part, output index)]
        for part, (src, index, chain) in sources.items():
            for c in chain:
                self.heads_attrs(c, part, hq_l, hk_l)
            by_linear.setdefault(src.name, []).append((part, index))
        for name, parts in by_linear.items():
            src = self.graph.node(name)
            if src.op == "linear":  # one linear per part
                if len(parts) != 1:
                    self.fail(node, f"reads {' and '.join(p for p, _ in parts)} from one linear {name} without a "
                                    "split; this pass cannot tell their rows apart")
                (part, _), = parts
                index = lambda r, f=heads[part][0]: [h * d + i for h in f(r) for i in range(d)]  # noqa: E731
                self.rows(src.inputs[1], f"column-parallel by {part} head", index)
                if len(src.inputs) == 3:
                    self.rows(src.inputs[2], f"column-parallel by {part} head", index)
            else:  # split of a merged qkv linear: each rank's rows are [its q rows, its k rows, its v rows]
                self.merged_heads(src, dict((i, p) for p, i in parts), heads, d, node)
        self.heads_attrs(writer, "kv", hq_l, hk_l)
        self.heads_attrs(node, "kv", hq_l, hk_l)
        if len(node.inputs) == 8:  # sinks [Hq]
            self.rows(node.inputs[7], "by query head", lambda r: list(q_heads(r)))
        for cache in node.inputs[1:3]:
            self.local_state(cache, hk_l, d)
        o_proj = self.single_linear_reader(node.outputs[0], node)
        self.row_parallel(o_proj, lambda r: slice(r * hq_l * d, (r + 1) * hq_l * d))
        kv = f"{hk_l} KV head{'s' if hk_l > 1 else ''}" + ("" if hk >= n else f" (of {hk}, shared by "
                                                                          f"{n // hk} ranks)")
        self.state.decide(NAME, node.name, f"{hq_l} query heads and {kv} per rank; {o_proj.name} row-parallel "
                          "+ all_reduce", "each rank attends with whole heads; o_proj's partial sums add up")

    def trace(self, value: str, attn: Node) -> tuple[Node, int, list[Node]]:
        """(the linear or split producing `value` through rope / norm nodes, its output index, those nodes)."""
        chain = []
        while True:
            if value not in self.producer:
                self.fail(attn, f"reads {value!r}, which no node produces")
            node, index = self.producer[value]
            if node.op in ("linear", "split"):
                return node, index, chain
            if node.op in ("rope", "head_rms_norm", "qk_norm_rope_cache"):
                chain.append(node)
                value = node.inputs[index if node.op == "rope" else 0]
                continue
            self.fail(attn, f"reads {value!r} from {node.name} ({node.op}), which this pass cannot follow to its "
                            "q/k/v projection")

    def heads_attrs(self, node: Node, part: str, hq_l: int, hk_l: int) -> None:
        a = node.attrs
        if node.op == "head_rms_norm":
            a["num_heads"] = hq_l if part == "q" else hk_l
            return
        if "num_heads" in a:
            a["num_heads"] = hq_l
        if "num_kv_heads" in a:
            a["num_kv_heads"] = hk_l

    def merged_heads(self, split: Node, parts: dict[int, str], heads: dict, d: int, attn: Node) -> None:
        src, _ = self.producer[split.inputs[0]]
        if src.op != "linear" or len(parts) != len(split.outputs):
            self.fail(attn, f"reads q/k/v from {split.name}, which requires splitting exactly one merged linear's "
                            "q, k and v")
        offsets = [0]
        for size in split.attrs["sizes"]:
            offsets.append(offsets[-1] + size)

        def index(r: int) -> list[int]:
            rows = []
            for i, part in sorted(parts.items()):
                rows += [offsets[i] + h * d + j for h in heads[part][0](r) for j in range(d)]
            return rows

        how = "column-parallel by head: [q rows, k rows, v rows] of the rank"
        self.rows(src.inputs[1], how, index)
        if len(src.inputs) == 3:
            self.rows(src.inputs[2], how, index)
        split.attrs["sizes"] = [heads[parts[i]][1] * d for i in range(len(split.outputs))]

    def local_state(self, cache: str, hk_l: int, d: int) -> None:
        g = self.graph
        g.state = [StateSpec(s.name, s.kind, s.layer, s.dtype, (hk_l, d)) if s.name == cache else s for s in g.state]
        spec = g.inputs[cache]
        g.inputs[cache] = TensorSpec(spec.dtype, (*spec.shape[:2], hk_l, d))

    # ------------------------------------------------------------ MLP and experts

    def intermediate_block(self, node: Node, inter: int) -> int:
        if inter % self.n:
            self.fail(node, f"has intermediate size {inter}; --tp must divide it (each rank computes a block of "
                            f"I/N gate/up columns and the matching down_proj rows); choose a --tp that divides "
                            f"{inter}")
        return inter // self.n

    def mlp(self, node: Node) -> None:
        """A gated MLP: linear_gated_act, or gated_act of a merged [gate; up] linear or of two linears."""
        if node.op == "linear_gated_act":
            halves = [node]  # rows [gate | up] of one weight
        else:
            halves = [self.producer[v][0] for v in node.inputs]
            if any(s.op != "linear" for s in halves):
                self.fail(node, "requires its gate and up from linears")
        inter = self.graph.weights[halves[0].inputs[1]].shape[0] // (2 if len(halves) == 1 else 1)
        block = self.intermediate_block(node, inter)
        if len(halves) == 1:
            how, index = "column-parallel block: [gate rows, up rows] of the rank", \
                lambda r: [*range(r * block, (r + 1) * block), *range(inter + r * block, inter + (r + 1) * block)]
        else:
            how, index = "column-parallel block", lambda r: list(range(r * block, (r + 1) * block))
        for linear in halves:
            for w in linear.inputs[1:]:  # weight (and bias)
                self.rows(w, how, index)
        down = self.single_linear_reader(node.outputs[0], node)
        self.row_parallel(down, lambda r: slice(r * block, (r + 1) * block))
        self.state.decide(NAME, node.name, f"gate/up columns and {down.name} rows in blocks of {block} of {inter} "
                          "per rank; all_reduce after down", "column- then row-parallel: one all_reduce per MLP")

    def experts(self, node: Node) -> None:
        w13, w2 = node.inputs[3:5]
        num_experts, two_i, _ = self.graph.weights[w13].shape
        inter = two_i // 2
        biases = node.inputs[5:]
        if self.ep:
            if num_experts % self.n:
                self.fail(node, f"has {num_experts} experts; --ep requires --tp to divide them (each rank holds "
                                f"E/N whole experts); choose a --tp that divides {num_experts}")
            local = num_experts // self.n
            for w in (w13, w2, *biases):
                self.shard(w, "expert-parallel", lambda t, r: t[r * local:(r + 1) * local])
            self.per_rank_start(EXPERT_START, local)
            ids = f"{node.name}.local_ids"
            self.after.setdefault(self.producer[node.inputs[2]][0].name, []).append(
                Node(f"{node.name}.shard_ids", "shard_ids", [node.inputs[2], EXPERT_START], [ids], {"size": local}))
            node.inputs[2] = ids
            what = f"experts [r*{local}, (r+1)*{local}) whole on rank r; routed ids of other ranks' experts skipped"
        else:
            block = self.intermediate_block(node, inter)
            rows = [lambda r: [*range(r * block, (r + 1) * block), *range(inter + r * block, inter + (r + 1) * block)]]
            self.shard(w13, "expert gate/up block", lambda t, r: t[:, rows[0](r)])
            self.shard(w2, "expert down block", lambda t, r: t[:, :, r * block:(r + 1) * block])
            if biases:
                self.shard(biases[0], "expert gate/up block", lambda t, r: t[:, rows[0](r)])
                self.rank0_only(biases[1])
            what = f"every expert's gate/up and down in blocks of {block} of {inter} per rank"
        self.reduce_after(node)
        self.state.decide(NAME, node.name, what + "; all_reduce of the partial sums",
                          "routing runs on every rank (router replicated); an all-to-all of the routed tokens "
                          "would move less at scale, the all_reduce is exact and simpler")

    # ------------------------------------------------------------ vocabulary

    def vocab_rows(self, node: Node, weight: str) -> int:
        vocab = self.full[weight].shape[0]  # a tied table may be sharded already: its spec is the rank's
        local = math.ceil(vocab / self.n)

        def pick(t: torch.Tensor, r: int) -> torch.Tensor:
            part = t[r * local:(r + 1) * local]
            pad = local - part.shape[0]
            return torch.cat([part, part.new_zeros(pad, *part.shape[1:])]) if pad else part

        self.shard(weight, f"vocabulary-parallel: {local} rows per rank (zero rows pad {vocab} to "
                           f"{local * self.n})", pick)
        return local

    def embedding(self, node: Node) -> None:
        local = self.vocab_rows(node, node.inputs[1])
        self.per_rank_start(VOCAB_START, local)
        ids = f"{node.name}.local_ids"
        shard_node = Node(f"{node.name}.shard_ids", "shard_ids", [node.inputs[0], VOCAB_START], [ids],
                          {"size": local})
        self.graph.nodes.insert(self.graph.nodes.index(node), shard_node)
        node.inputs[0] = ids
        self.reduce_after(node)
        self.state.decide(NAME, node.name, f"vocabulary-parallel: {local} rows per rank, masked lookup + all_reduce",
                          "a rank holds only its rows of the table")

    def logits(self, node: Node) -> None:
        width = self.full[node.inputs[2]].shape[0]  # the logits' columns before sharding
        self.vocab_rows(node, node.inputs[2])
        out = node.outputs[0]
        node.outputs[0] = f"{out}.shard"
        self.after.setdefault(node.name, []).append(Node(f"{node.name}.all_gather", "all_gather", [f"{out}.shard"],
                                                         [out], {"size": width}))
        self.state.decide(NAME, node.name, "vocabulary-parallel lm_head + all_gather of the logits columns",
                          "each rank computes its vocabulary rows' logits; the sampler needs them all")

